"""One training process for tests/test_reliability.py (a subprocess, not collected).

Trains a tiny model with the real Trainer, train_loop, Checkpointer (async saves) and
resume logic (``jaxmt.train.run.resume_state``) on synthetic batches that depend only
on the step, so an interrupted and resumed run sees the same batches as an
uninterrupted one. No seqio, no TensorFlow: a start takes a few seconds, and a
persistent XLA cache (``--xla_cache``) makes restarts skip compilation.

Prints ``batch N`` as each batch is taken and ``saving N`` before each save, so the
test can time its signals, and ``resumed N`` at the start. At the end (normal or
after a signal) writes ``--out`` (.npz of the final parameters, process 0) and prints
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VOCAB, LEN, BATCH = 64, 16, 8


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model_dir", required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--checkpoint_every", type=int, default=2)
    ap.add_argument("--keep", type=int, default=3)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--out", default=None, help=".npz of the final parameters")
    ap.add_argument("--xla_cache", default=None)
    ap.add_argument("--step_sleep", type=float, default=0.0, help="seconds per batch")
    ap.add_argument("--coordinator_address")
    ap.add_argument("--num_processes", type=int)
    ap.add_argument("--process_id", type=int)
    args = ap.parse_args()

    from jaxmt.sharding import multihost
    multihost.initialize(args.coordinator_address, args.num_processes, args.process_id,
                         initialization_timeout=60)
    import jax
    import numpy as np

    if args.xla_cache:
        jax.config.update("jax_compilation_cache_dir", args.xla_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    from jaxmt.checkpoint import Checkpointer
    from jaxmt.config import MeshConfig, ModelConfig, TrainConfig
    from jaxmt.sharding.partitioning import Partitioner
    from jaxmt.train.loop import train_loop
    from jaxmt.train.run import resume_state
    from jaxmt.train.trainer import Trainer

    model_cfg = ModelConfig(vocab_size=VOCAB, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                            num_encoder_layers=1, num_decoder_layers=1,
                            precision=args.precision)
    train_cfg = TrainConfig(steps=args.steps, batch_size=BATCH, warmup_steps=2, log_every=5,
                            checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep,
                            learning_rate=1e-2)
    trainer = Trainer(model_cfg, train_cfg, Partitioner(MeshConfig()), LEN, LEN)
    ckpt = Checkpointer(args.model_dir, keep=args.keep)
    state, start, _ = resume_state(trainer, ckpt)
    print(f"resumed {start}", flush=True)
    rows = trainer.partitioner.host_local_batch_size(BATCH)

    def batches():
        step = start
        while True:
            full = trainer.model.random_batch(BATCH, LEN, LEN, seed=step)
            lo = jax.process_index() * rows
            print(f"batch {step}", flush=True)
            if args.step_sleep:
                import time
                time.sleep(args.step_sleep)
            yield {k: v[lo:lo + rows] for k, v in full.items()}
            step += 1

    save = ckpt.save

    def announced_save(step, *a, **kw):
        print(f"saving {step}", flush=True)
        save(step, *a, **kw)

    ckpt.save = announced_save
    state, last = train_loop(trainer, batches(), args.model_dir, ckpt, state, start,
                             progress=False)
    ckpt.close()
    if args.out and jax.process_index() == 0:
        flat = {jax.tree_util.keystr(k): np.asarray(jax.device_get(v))
                for k, v in jax.tree_util.tree_flatten_with_path(state.params)[0]}
        np.savez(args.out, **flat)
    print(json.dumps({"start": start, "step": int(jax.device_get(state.step)),
                      "stopped_by": last.get("stopped_by"),
                      "stopped_at": last.get("stopped_at"),
                      "skipped_total": last.get("skipped_steps_total")}), flush=True)


if __name__ == "__main__":
    main()
