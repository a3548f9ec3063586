"""Token-budget bucketing (jaxmt.data.bucketing): shapes, the shared schedule, the
batches' features, bounded queues, the pipeline's resume, and the compile bound."""

import collections
import hashlib
import itertools

import numpy as np
import pytest

from jaxmt.data import bucketing
from jaxmt.data.packing import BATCH_KEYS

LENGTHS = (16, 32, 64)


def _stream(n, seed, max_len=64):
    """Synthetic (src, tgt) examples, EOS-terminated, lengths spread over the buckets."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        ls = int(np.clip(rng.lognormal(3.0, 0.6), 1, max_len + 8))  # some need trimming
        lt = int(np.clip(ls * rng.uniform(0.6, 1.4), 1, max_len + 8))
        src, tgt = rng.integers(2, 500, ls).astype(np.int32), rng.integers(2, 500, lt).astype(np.int32)
        src[-1] = tgt[-1] = 1
        yield src, tgt


def _key(src, tgt):
    return tuple(int(x) for x in src), tuple(int(x) for x in tgt)


def _rows(batch):
    """The (src, tgt) of each row, checked against the unpacked feature definition."""
    assert tuple(sorted(batch)) == tuple(sorted(BATCH_KEYS))
    shape = batch["encoder_input_tokens"].shape
    out = []
    for k in BATCH_KEYS:
        assert batch[k].dtype == np.int32 and batch[k].shape == shape, k
    for r in range(shape[0]):
        row = {k: batch[k][r] for k in BATCH_KEYS}
        ns, nt = int(np.count_nonzero(row["encoder_input_tokens"])), int(np.count_nonzero(
            row["decoder_target_tokens"]))
        src, tgt = row["encoder_input_tokens"][:ns], row["decoder_target_tokens"][:nt]
        for side, n in (("encoder", ns), ("decoder", nt)):
            seg = (np.arange(shape[1]) < n).astype(np.int32)
            np.testing.assert_array_equal(row[f"{side}_segment_ids"], seg)
            np.testing.assert_array_equal(row[f"{side}_positions"], np.arange(shape[1]) * seg)
        assert not row["encoder_input_tokens"][ns:].any() and not row["decoder_target_tokens"][nt:].any()
        # Shifted right within the example, as the packer does (seqio's unpacked
        # converter also shifts the EOS into the first padding slot; the model masks it).
        np.testing.assert_array_equal(row["decoder_input_tokens"],
                                      np.concatenate([[0], tgt[:-1], np.zeros(shape[1] - nt)]))
        np.testing.assert_array_equal(row["decoder_loss_weights"],
                                      (row["decoder_target_tokens"] != 0).astype(np.int32))
        out.append((src, tgt))
    return out


# ------------------------------------------------------------------ bucket_shapes


def test_bucket_shapes_share_a_token_budget_and_divide():
    assert bucketing.bucket_shapes(LENGTHS, 32, 64, 8) == [(128, 16), (64, 32), (32, 64)]
    # Rounded down to the multiple, never below it.
    shapes = bucketing.bucket_shapes((10, 24, 48), 12, 48, 8)
    assert shapes == [(56, 10), (24, 24), (8, 48)]
    assert all(r % 8 == 0 and r * n <= 12 * 48 for r, n in shapes)
    assert bucketing.bucket_shapes((2, 64), 1, 64, 4) == [(32, 2), (4, 64)]
    for lengths, msg in (((16, 16, 64), "strictly increasing"), ((16, 32), "must equal"),
                         ((0, 64), "positive"), ((), "at least one")):
        with pytest.raises(ValueError, match=msg):
            bucketing.bucket_shapes(lengths, 32, 64, 8)
    with pytest.raises(ValueError, match="positive"):
        bucketing.bucket_shapes(LENGTHS, 32, 64, 0)


def test_config_field_and_old_configs():
    from jaxmt import config as cfglib

    assert cfglib.DataConfig().batching == "pack"
    with pytest.raises(ValueError, match="DataConfig.bucket_lengths"):
        cfglib.DataConfig(batching="bucket", src_len=128, tgt_len=64)
    with pytest.raises(ValueError, match="DataConfig.batching"):
        cfglib.DataConfig(batching="packed")
    assert cfglib.DataConfig(batching="bucket", bucket_lengths=[8, 64]).bucket_lengths == (8, 64)
    old = cfglib.to_json(data=cfglib.DataConfig()).replace('"batching": "pack"', '"pack": false')
    assert cfglib.from_json(old)["data"].batching == "pad"


# ------------------------------------------------------------------ schedule_weights


def test_schedule_weights():
    shapes = [(128, 16), (64, 32), (32, 64)]
    sample = [10] * 300 + [20] * 400 + [50] * 300
    w = bucketing.schedule_weights(sample, shapes, margin=1.2, min_share=0.0)
    want = np.array([0.3 / 128, 0.4 / 64 * 1.2, 0.3 / 32 * 1.2])
    np.testing.assert_allclose(w, want / want.sum())
    # No sample example needs bucket 32: never scheduled (its rows would all be promoted).
    assert bucketing.schedule_weights([10] * 5 + [50] * 5, shapes)[1] == 0
    # The longest is always scheduled; too-rare short buckets hand their share on.
    w = bucketing.schedule_weights([10] * 2 + [20] * 98, shapes, margin=1.0, min_share=0.05)
    assert w[0] == 0 and w[2] > 0
    np.testing.assert_allclose(w[1] / w[2], (1.0 / 64) / (0.01 / 32))
    # An empty sample: the same token share for every bucket.
    np.testing.assert_allclose(bucketing.schedule_weights([], shapes, margin=1.0),
                               np.array([1 / 128, 1 / 64, 1 / 32]) / (7 / 128))
    with pytest.raises(ValueError, match="margin"):
        bucketing.schedule_weights(sample, shapes, margin=0.9)


# ------------------------------------------------------------------ bucketed_batches


def test_bucketed_batches_place_keep_and_feature_every_example():
    shapes = bucketing.bucket_shapes(LENGTHS, 8, 64, 4)  # (32, 16), (16, 32), (8, 64)
    sample = [max(len(s[:64]), len(t[:48])) for s, t in _stream(1000, seed=1)]
    weights = bucketing.schedule_weights(sample, shapes)
    assert np.all(weights > 0)
    stats = bucketing.BucketStats()
    it = bucketing.bucketed_batches(_stream(10 ** 9, seed=1), shapes, weights, seed=3,
                                    src_len=64, tgt_len=48, stats=stats)
    emitted, promoted, seen_shapes = [], 0, set()
    for batch in itertools.islice(it, 300):
        rows, length = batch["encoder_input_tokens"].shape
        seen_shapes.add((rows, length))
        b = LENGTHS.index(length)
        for src, tgt in _rows(batch):
            own = int(np.searchsorted(LENGTHS, max(len(src), len(tgt))))
            assert own <= b  # its smallest fitting bucket, or (promoted) a longer one
            promoted += own < b
            emitted.append(_key(src, tgt))
    assert seen_shapes == set(shapes) and promoted == stats.promoted > 0
    assert len(emitted) == sum(r * s for (r, _), s in zip(shapes, stats.steps))
    # Nothing lost or duplicated: emitted = the consumed prefix less what is still queued.
    prefix = collections.Counter(_key(s[:64], t[:48]) for s, t in _stream(stats.read, seed=1))
    out = collections.Counter(emitted)
    assert not out - prefix and sum((prefix - out).values()) == stats.queued
    # A finite stream ends the iterator (dropping the partial batch).
    assert len(list(bucketing.bucketed_batches(_stream(500, seed=1), shapes, weights, seed=3,
                                               src_len=64, tgt_len=48))) < 500 / 8


def test_hosts_share_the_schedule_and_queues_stay_bounded():
    shapes = bucketing.bucket_shapes(LENGTHS, 8, 64, 4)
    weights = bucketing.schedule_weights(
        [max(len(s), len(t)) for s, t in _stream(2048, seed=9)], shapes)
    hosts = []
    for data_seed in (1, 2):  # two hosts: different data, the same schedule seed
        stats = bucketing.BucketStats()
        it = bucketing.bucketed_batches(_stream(10 ** 9, data_seed), shapes, weights, seed=5,
                                        src_len=64, tgt_len=64, stats=stats)
        seq, queued, digest = [], [], hashlib.sha256()
        for step in range(3000):
            batch = next(it)
            seq.append(batch["encoder_input_tokens"].shape)
            queued.append(stats.queued)
            if step < 50:
                digest.update(batch["encoder_input_tokens"].tobytes())
        hosts.append((seq, digest.hexdigest(), stats, np.reshape(queued, (3, 1000))))
    (seq_a, dig_a, stats_a, _), (seq_b, dig_b, stats_b, _) = hosts
    assert seq_a == seq_b and dig_a != dig_b
    # Each bucket ran close to its scheduled share of the steps.
    np.testing.assert_allclose(np.array(stats_a.steps) / 3000, weights, atol=2e-3)
    other = bucketing.bucketed_batches(_stream(10 ** 9, 1), shapes, weights, seed=6,
                                       src_len=64, tgt_len=64)
    assert [next(other)["encoder_input_tokens"].shape for _ in range(100)] != seq_a[:100]
    for _, _, stats, queued in hosts:
        print(f"queued: peak {stats.peak_queued} of {stats.read} read; mean, min and peak per "
              f"1000 steps {queued.mean(1).round()} {queued.min(1)} {queued.max(1)}; promoted {stats.promoted}")
        # Bounded: a few batches' worth, and still drained late in the run (a queue
        # that grew with the run would not come back down to one batch's rows).
        assert stats.peak_queued <= 12 * shapes[0][0]
        assert queued[0].min() <= shapes[0][0] and queued[2].min() <= shapes[0][0]


# ------------------------------------------------------------------ the pipeline

seqio = pytest.importorskip("seqio")
from jaxmt.data import pipeline, tasks  # noqa: E402


@pytest.fixture(scope="module")
def mixture(spm_path):
    return tasks.register(spm_path, ("en", "de"), pivot="en", prefix="t_bucket")


def _digest(batch):
    return hashlib.sha256(b"".join(k.encode() + batch[k].tobytes() for k in sorted(batch))
                          ).hexdigest()


@pytest.mark.slow
def test_bucketed_stream_is_the_same_shape_on_every_host_and_resumes(mixture):
    shapes = bucketing.bucket_shapes((32, 64, 128), 4, 128, 2)
    local = [(r // 2, n) for r, n in shapes]
    k, n = 6, 4
    runs = {}
    for shard in (0, 1):
        kw = dict(seed=7, shard_index=shard, num_shards=2, batching="bucket", buckets=local)
        full = pipeline.train_batches(mixture, 128, 128, 2, **kw)
        batches = [next(full) for _ in range(k + n)]
        for b in batches:
            _rows(b)
        runs[shard] = ([b["encoder_input_tokens"].shape for b in batches],
                       [_digest(b) for b in batches])
    assert runs[0][0] == runs[1][0] and len(set(runs[0][0])) > 1  # same shapes, several
    assert set(runs[0][0]) <= set(local)
    assert not set(runs[0][1]) & set(runs[1][1])  # different data
    resumed = pipeline.train_batches(mixture, 128, 128, 2, seed=7, shard_index=1, num_shards=2,
                                     batching="bucket", buckets=local, start_batch=k)
    assert [_digest(next(resumed)) for _ in range(n)] == runs[1][1][k:]
    with pytest.raises(ValueError, match="must equal"):
        pipeline.train_batches(mixture, 128, 128, 2, seed=0, batching="bucket",
                               buckets=[(8, 32), (4, 64)])
    with pytest.raises(ValueError, match="batching"):
        pipeline.train_batches(mixture, 128, 128, 2, seed=0, batching="packed")


@pytest.mark.slow
def test_bucketing_never_compiles_more_shapes_than_configured(mixture, tmp_path):
    from jaxmt.checkpoint import Checkpointer
    from jaxmt.config import MeshConfig, ModelConfig, TrainConfig
    from jaxmt.sharding.partitioning import Partitioner
    from jaxmt.train.loop import train_loop
    from jaxmt.train.trainer import Trainer

    model_cfg = ModelConfig(vocab_size=2048, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                            num_encoder_layers=1, num_decoder_layers=1, precision="fp32")
    train_cfg = TrainConfig(steps=12, batch_size=8, warmup_steps=1, log_every=4,
                            checkpoint_every=1000, keep_checkpoints=1)
    partitioner = Partitioner(MeshConfig(data=8))
    trainer = Trainer(model_cfg, train_cfg, partitioner, 128, 128)
    shapes = bucketing.bucket_shapes((32, 64, 128), train_cfg.batch_size, 128,
                                     partitioner.data_parallel_size)
    assert shapes == [(32, 32), (16, 64), (8, 128)]
    seen = []

    def batches():
        for b in pipeline.train_batches(mixture, 128, 128, 8, seed=0, batching="bucket",
                                        buckets=shapes):
            seen.append(b["encoder_input_tokens"].shape)
            yield b

    ckpt = Checkpointer(str(tmp_path), keep=1, async_save=False)
    state = trainer.init_state(0)
    assert trainer.compiled_shapes() == 0
    _, last = train_loop(trainer, batches(), str(tmp_path), ckpt, state, 0, progress=False)
    ckpt.close()
    print(f"shapes seen {collections.Counter(seen)}; compiled {trainer.compiled_shapes()}; "
          f"fill {last['src_fill']:.2f}/{last['tgt_fill']:.2f}")
    assert len(seen) == 12 and set(seen) <= set(shapes) and len(set(seen)) > 1
    assert trainer.compiled_shapes() == len(set(seen)) <= len(shapes)
    assert last["compiled_shapes"] == trainer.compiled_shapes()
    assert 0 < last["src_fill"] <= 1 and 0 < last["tgt_fill"] <= 1
