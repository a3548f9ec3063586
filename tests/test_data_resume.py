"""Exact resume: the data stream is fixed by (seed, process index, process count), its
position is saved in the checkpoint next to the model, and a run that crashes and
resumes takes the same batches, and ends with the same parameters, as one that did not.
"""

import hashlib
import logging
import os
import shutil
import time

import gin
import jax
import numpy as np
import pytest

seqio = pytest.importorskip("seqio")
from jaxmt.gin_files import parse_gin  # noqa: E402
from jaxmt.checkpoint import Checkpointer, checkpoint_dir  # noqa: E402
from jaxmt.data import pipeline, tasks  # noqa: E402

from compile_cache import persistent_compile_cache  # noqa: E402

LANGS = ("en", "de", "ru")
STEPS, CRASH_AT = 6, 3  # checkpoint every 3 steps; the crashed run dies fetching batch 4
REAL_TRAIN_BATCHES = pipeline.train_batches

# The vocabulary is conftest's session spm_path (2000 pieces of LANGS), shared with the
# other data tests.
BINDINGS = [
    "ModelConfig.vocab_size = 2048", "ModelConfig.emb_dim = 32", "ModelConfig.num_heads = 2",
    "ModelConfig.head_dim = 16", "ModelConfig.mlp_dim = 64",
    "ModelConfig.num_encoder_layers = 1", "ModelConfig.num_decoder_layers = 1",
    "ModelConfig.precision = 'fp32'", "ModelConfig.dropout_rate = 0.1",
    "MeshConfig.data = 2", "MeshConfig.fsdp = 2", "MeshConfig.tensor = 2",
    f"DataConfig.langs = {LANGS!r}", "DataConfig.src_len = 32", "DataConfig.tgt_len = 32",
    "TrainConfig.batch_size = 8", "TrainConfig.warmup_steps = 2", "TrainConfig.log_every = 3",
    f"TrainConfig.checkpoint_every = {CRASH_AT}", f"TrainConfig.steps = {STEPS}",
]


def _digest(batch):
    return hashlib.sha256(b"".join(k.encode() + batch[k].tobytes() for k in sorted(batch))
                          ).hexdigest()


@pytest.fixture(scope="module")
def mixture(spm_path):
    # Two languages (two directions, still a sampled Mixture) keep iterator start-up short.
    return tasks.register(spm_path, LANGS[:2], pivot="en", temperature=5.0, prefix="t_resume")


# ------------------------------------------------------------------ the pipeline


@pytest.mark.slow
@pytest.mark.parametrize("batching, shards", [("pack", ((0, 1), (0, 2), (1, 2))),
                                              ("pad", ((0, 1), (1, 2)))])
def test_start_batch_continues_the_same_stream(mixture, batching, shards):
    k, n = 5, 4
    for shard_index, num_shards in shards:
        kw = dict(seed=7, shard_index=shard_index, num_shards=num_shards, batching=batching)
        full = pipeline.train_batches(mixture, 32, 32, 4, **kw)
        want = [_digest(next(full)) for _ in range(k + n)]
        assert len(set(want)) == k + n  # the stream moves on
        if shard_index == 0 and num_shards == 1:  # a fresh iterator replays it exactly
            again = pipeline.train_batches(mixture, 32, 32, 4, **kw)
            assert [_digest(next(again)) for _ in range(k + n)] == want
        # Starting at batch k is the same stream from k on (itself a fresh iterator).
        resumed = pipeline.train_batches(mixture, 32, 32, 4, start_batch=k, **kw)
        assert [_digest(next(resumed)) for _ in range(n)] == want[k:]
    with pytest.raises(ValueError, match="start_batch"):
        pipeline.train_batches(mixture, 32, 32, 4, seed=0, start_batch=-1)


def test_resume_position_records(caplog):
    rec = pipeline.position_record(3, 12, 1)
    assert rec == {"seed": 3, "batches": 12, "process_count": 1, "cached": False, "version": 1}
    with caplog.at_level(logging.WARNING, logger=pipeline.log.name):
        # The saved stream and position win over the run's seed.
        assert pipeline.resume_position({"data": rec}, seed=0, step=12, process_count=1) == rec
        assert not caplog.records
        # A checkpoint without a position: the old behaviour (reseed), with a warning.
        old = pipeline.resume_position({"step": 20, "data_seed": 0}, seed=0, step=20,
                                       process_count=1)
        assert old == pipeline.position_record(20, 0, 1)
        assert "no data position" in caplog.text
        caplog.clear()
        moved = pipeline.resume_position({"data": rec}, seed=0, step=12, process_count=2)
        assert moved == pipeline.position_record(3, 12, 2)
        assert "saved by 1 process(es), this run has 2" in caplog.text
        caplog.clear()
        # Switching to the pre-tokenised cache is another stream: same position, a warning.
        cached = pipeline.resume_position({"data": rec}, seed=0, step=12, process_count=1,
                                          cached=True)
        assert cached == pipeline.position_record(3, 12, 1, cached=True)
        assert "this run reads the pre-tokenised cache" in caplog.text
    with pytest.raises(ValueError, match="unknown data position"):
        pipeline.resume_position({"data": dict(rec, version=99)}, seed=0, step=12,
                                 process_count=1)


# ------------------------------------------------------------------ through train()


class Crash(RuntimeError):
    pass


class Recorder:
    """Wraps the real ``pipeline.train_batches`` that ``train()`` calls: records its
    arguments and a digest of every batch the loop takes, and can die mid-run."""

    def __init__(self, monkeypatch, crash_before: int | None = None):
        self.calls, self.digests = [], []
        real = REAL_TRAIN_BATCHES

        def wrapped(*args, **kwargs):
            self.calls.append(kwargs)
            it = real(*args, **kwargs)

            def gen():
                for i, batch in enumerate(it):
                    if crash_before is not None and i == crash_before:
                        raise Crash(f"simulated crash before batch {i + 1}")
                    self.digests.append(_digest(batch))
                    yield batch
            return gen()
        monkeypatch.setattr(pipeline, "train_batches", wrapped)


def _train(model_dir, spm_path):
    os.makedirs(model_dir, exist_ok=True)
    shutil.copy(spm_path, os.path.join(model_dir, "spm.model"))  # no vocabulary training
    gin.clear_config()
    parse_gin([], [f"--gin.{b.replace(' = ', '=')}" for b in BINDINGS])
    from jaxmt.train.run import train
    try:
        return train(model_dir=model_dir, progress=False)
    finally:
        gin.clear_config()


@pytest.fixture
def compile_cache(tmp_path):
    """A persistent XLA cache for this test only, so the three train() calls of the
    same configuration compile once (each Trainer jits afresh); restored afterwards."""
    with persistent_compile_cache(tmp_path / "xla_cache"):
        yield


def _restore(model_dir, step):
    ck = Checkpointer(model_dir, async_save=False)
    import orbax.checkpoint as ocp
    out = ck.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(), opt_state=ocp.args.StandardRestore(),
        meta=ocp.args.JsonRestore()))
    ck.close()
    return jax.device_get(out["params"]), jax.device_get(out["opt_state"]), dict(out["meta"])


def _wait_for_checkpoint(model_dir, step, timeout=60.0):
    """The crashed run left its last async save in flight; wait until Orbax commits it."""
    final = os.path.join(checkpoint_dir(model_dir), str(step))
    deadline = time.monotonic() + timeout
    while not os.path.isdir(final):
        assert time.monotonic() < deadline, f"checkpoint {final} never appeared"
        time.sleep(0.1)


@pytest.mark.slow
def test_crash_and_resume_matches_uninterrupted_run(tmp_path, spm_path, monkeypatch, capsys,
                                                    compile_cache):
    straight = Recorder(monkeypatch)
    _train(str(tmp_path / "straight"), spm_path)
    assert len(straight.digests) == STEPS
    assert straight.calls[0]["start_batch"] == 0

    crashed_dir = str(tmp_path / "crashed")
    crashed = Recorder(monkeypatch, crash_before=CRASH_AT)
    with pytest.raises(Crash):
        _train(crashed_dir, spm_path)
    assert crashed.digests == straight.digests[:CRASH_AT]
    _wait_for_checkpoint(crashed_dir, CRASH_AT)
    meta = _restore(crashed_dir, CRASH_AT)[2]
    assert meta["data"] == pipeline.position_record(0, CRASH_AT, jax.process_count())

    resumed = Recorder(monkeypatch)
    capsys.readouterr()
    _train(crashed_dir, spm_path)
    out = capsys.readouterr().out
    assert f"resuming from step {CRASH_AT}" in out
    assert resumed.calls[0]["seed"] == 0 and resumed.calls[0]["start_batch"] == CRASH_AT
    # The batches after the resume are the uninterrupted run's ...
    assert resumed.digests == straight.digests[CRASH_AT:]
    # ... and so are the final parameters, optimizer state and data position: exactly.
    p_a, o_a, m_a = _restore(str(tmp_path / "straight"), STEPS)
    p_b, o_b, m_b = _restore(crashed_dir, STEPS)
    assert m_a["data"] == m_b["data"] == pipeline.position_record(0, STEPS, jax.process_count())
    for a, b in ((p_a, p_b), (o_a, o_b)):
        assert jax.tree.structure(a) == jax.tree.structure(b)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # The run did learn something, so equal parameters are not trivially equal.
    p0 = _restore(str(tmp_path / "straight"), CRASH_AT)[0]
    assert any(not np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(p0), jax.tree.leaves(p_a)))
