"""One process of tests/test_multihost.py (run as a subprocess, not collected by pytest).

Trains a tiny model for a few steps on real data over a 4-device fsdp mesh, either as
one of 2 processes x 2 CPU devices (``--num_processes=2``: reads its own data shard)
or as 1 process x 4 devices (reads both shards itself and concatenates them in
process order, so it sees the same global batches). Writes an Orbax checkpoint with
the real ``train_loop``, then the final train state as .npz (process 0). With
``--restore_dir`` it also restores another run's checkpoint onto its own mesh, once
the ``--restore_after`` file exists (so it can train while that run is writing).
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LANGS = ("en", "de")
SRC_LEN = TGT_LEN = 32
GLOBAL_BATCH = 8
STEPS = 3
SHARDS = 2  # the data shards of the 2-process run
_T0 = time.time()


def _digest(a) -> str:
    import numpy as np
    return hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def _flat(tree) -> dict:
    import jax
    import numpy as np
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _tick(what: str) -> None:
    """Progress on stderr, which the test shows when a worker fails or times out."""
    print(f"[worker {time.time() - _T0:6.1f}s] {what}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--coordinator_address")
    ap.add_argument("--num_processes", type=int)
    ap.add_argument("--process_id", type=int)
    ap.add_argument("--vocab", required=True)
    ap.add_argument("--model_dir", required=True)
    ap.add_argument("--out", required=True, help="directory for state .npz files")
    ap.add_argument("--restore_dir", help="restore this run's checkpoint after training")
    ap.add_argument("--restore_after", help="first wait for this file (the writers are done)")
    args = ap.parse_args()

    from jaxmt.sharding import multihost
    where = multihost.initialize(args.coordinator_address, args.num_processes,
                                 args.process_id, initialization_timeout=60)
    again = multihost.initialize(args.coordinator_address, args.num_processes, args.process_id)
    _tick("initialized")
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from jaxmt.checkpoint import Checkpointer
    from jaxmt.config import MeshConfig, ModelConfig, TrainConfig
    from jaxmt.data import pipeline, tasks
    from jaxmt.sharding.partitioning import Partitioner
    from jaxmt.train.loop import train_loop
    from jaxmt.train.trainer import Trainer

    _tick("imported")
    pi, pc = jax.process_index(), jax.process_count()
    mixture = tasks.register(args.vocab, LANGS, pivot="en", prefix="mh_bible")
    _tick("registered")
    model_cfg = ModelConfig(vocab_size=1024, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
                            num_encoder_layers=1, num_decoder_layers=1, precision="fp32")
    train_cfg = TrainConfig(steps=STEPS, batch_size=GLOBAL_BATCH, warmup_steps=1, log_every=1,
                            checkpoint_every=STEPS, keep_checkpoints=1)
    # fsdp over all 4 devices: parameters are split across the processes, so gradients
    # cross processes and each process writes its own shards of the checkpoint.
    partitioner = Partitioner(MeshConfig(data=1, fsdp=-1))
    trainer = Trainer(model_cfg, train_cfg, partitioner, SRC_LEN, TGT_LEN)
    _tick("trainer")
    host_rows = partitioner.host_local_batch_size(GLOBAL_BATCH)

    def shard(i: int):
        return pipeline.train_batches(mixture, SRC_LEN, TGT_LEN, GLOBAL_BATCH // SHARDS,
                                      seed=0, shard_index=i, num_shards=SHARDS, threads=1)

    local_digests, half_digests = [], []
    if pc == SHARDS:
        assert host_rows == GLOBAL_BATCH // SHARDS
        own = shard(pi)

        def batches():
            while True:
                b = next(own)
                local_digests.append(_digest(b["encoder_input_tokens"]))
                yield b
    else:
        assert pc == 1 and host_rows == GLOBAL_BATCH
        its = [shard(i) for i in range(SHARDS)]

        def batches():
            while True:
                parts = [next(it) for it in its]
                half_digests.append([_digest(p["encoder_input_tokens"]) for p in parts])
                # Process order: what make_array_from_process_local_data does in the
                # 2-process run is checked by the test, through the digests.
                yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    losses, global_digests = [], []
    step = trainer.step_fn()

    def recording_step(state, batch, rng):
        tokens = multihost_utils.process_allgather(batch["encoder_input_tokens"], tiled=True)
        global_digests.append(_digest(tokens))
        state, metrics = step(state, batch, rng)
        losses.append(float(metrics["loss"]))  # replicated: readable on every process
        return state, metrics

    trainer.step_fn = lambda: recording_step
    ckpt = Checkpointer(args.model_dir, keep=1, async_save=True)
    _tick("ckpt manager")
    state = trainer.init_state(train_cfg.seed)
    _tick("init_state")
    state, last = train_loop(trainer, batches(), args.model_dir, ckpt, state, 0,
                             meta={"data_seed": 0}, progress=False)
    ckpt.close()

    _tick("trained")
    params = multihost_utils.process_allgather(state.params, tiled=True)
    opt_state = multihost_utils.process_allgather(state.opt_state, tiled=True)
    tag = f"p{pc}"
    if pi == 0:
        np.savez(os.path.join(args.out, f"{tag}_params.npz"), **_flat(params))
        np.savez(os.path.join(args.out, f"{tag}_opt_state.npz"), **_flat(opt_state))

    _tick("gathered")
    result = {"where": where, "again": again, "process_index": pi, "process_count": pc,
              "devices": jax.device_count(), "local_devices": jax.local_device_count(),
              "losses": losses, "last_loss": last.get("loss"),
              "global_digests": global_digests, "local_digests": local_digests,
              "half_digests": half_digests}

    if args.restore_dir:
        deadline = time.time() + 300
        while args.restore_after and not os.path.exists(args.restore_after):
            if time.time() > deadline:
                raise TimeoutError(f"{args.restore_after} did not appear")
            time.sleep(0.1)
        other = Checkpointer(args.restore_dir, async_save=False)
        restored_step = other.latest_step()
        restored, meta = trainer.restore_state(other, restored_step)
        other.close()
        np.savez(os.path.join(args.out, "restored_params.npz"), **_flat(restored.params))
        np.savez(os.path.join(args.out, "restored_opt_state.npz"), **_flat(restored.opt_state))
        result.update(restored_step=restored_step, restored_meta=meta,
                      restored_state_step=int(restored.step),
                      restored_mesh=dict(jax.tree.leaves(restored.params)[0].sharding.mesh.shape))
    _tick("restored")
    result["seconds"] = round(time.time() - _T0, 1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
