"""The pre-tokenised cache: `jaxmt data cache` writes seqio's cache format, seqio and
jaxmt's fast reader both read back exactly the on-the-fly examples, each host reads its
own files, training uses a fresh cache and refuses a stale one, and a crash mid-write
never leaves a cache that looks complete."""

import collections
import hashlib
import json
import os
import shutil

import gin
import numpy as np
import pytest

seqio = pytest.importorskip("seqio")
from jaxmt import cli  # noqa: E402
from jaxmt.data import cache, pipeline, tasks, vocab  # noqa: E402

LANGS = ("en", "de")
FILES = 4
BIG = {"inputs": 4096, "targets": 4096}  # no trimming


@pytest.fixture(scope="module")
def built(spm_path, tmp_path_factory):
    """The en<->de mixture of the embedded corpus, cached in 4 files per direction."""
    mixture = tasks.register(spm_path, LANGS, pivot="en", prefix="t_cache")
    root = str(tmp_path_factory.mktemp("cache"))
    rows = cache.build(root, mixture, spm_path, num_shards=FILES, seed=3, progress=False)
    yield mixture, root, rows


CORPUS_PAIRS = 400


@pytest.fixture(scope="module")
def corpus_tsv(tmp_path_factory):
    """A few hundred en-de pairs of the embedded corpus as a file of one's own
    (DataConfig.corpora): for tests that need a cache to rebuild, not 58k examples."""
    from jaxmt.data import embedded

    path = tmp_path_factory.mktemp("corpus") / "en-de.tsv"
    pairs = embedded.parallel_pairs("en", "de", "train")[0][:CORPUS_PAIRS]
    path.write_text("".join(f"{en}\t{de}\n" for en, de in pairs), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def small_built(spm_path, corpus_tsv, tmp_path_factory):
    """That file's two directions, cached in 2 files each."""
    mixture = tasks.register_corpus([{"path": corpus_tsv, "src_lang": "en", "tgt_lang": "de"}],
                                    spm_path, prefix="t_cache_small")
    root = str(tmp_path_factory.mktemp("small_cache"))
    rows = cache.build(root, mixture, spm_path, num_shards=2, progress=False)
    assert [r["examples"] for r in rows] == [CORPUS_PAIRS] * 2
    return mixture, root, rows


def _multiset(examples):
    return collections.Counter((tuple(map(int, a)), tuple(map(int, b))) for a, b in examples)


def _seqio_examples(task, use_cached, cache_dir=None, **kw):
    # seqio finds a cache only through its global cache directories, which jaxmt never
    # sets (its reader takes the directory): point them here for this read only.
    if use_cached:
        seqio.utils.set_global_cache_dirs([cache_dir])
    try:
        ds = task.get_dataset(BIG, split="train", use_cached=use_cached, shuffle=False,
                              try_in_mem_cache=False, **kw)
        # Whole blocks into Python (the same examples, in order): per-example iteration
        # costs seconds per 29k.
        ds = ds.map(lambda ex: {k: ex[k] for k in ("inputs", "targets")}).ragged_batch(4096)
        return [pair for block in ds.as_numpy_iterator()
                for pair in zip(block["inputs"], block["targets"])]
    finally:
        if use_cached:
            seqio.utils.set_global_cache_dirs([])


@pytest.mark.slow
def test_cache_holds_exactly_the_on_the_fly_examples(built, spm_path):
    mixture, root, rows = built
    assert [r["status"] for r in rows] == ["built", "built"]
    assert cache.is_usable(root, mixture, spm_path)
    assert not seqio.utils.get_global_cache_dirs()  # a check, no global side effect
    for row in rows:
        task = seqio.get_mixture_or_task(row["task"])
        path = cache.task_dir(root, task.name)
        assert sorted(os.listdir(path)) == sorted(
            ["COMPLETED", "info.train.json", "stats.train.json", cache.MANIFEST]
            + [f"train.tfrecord-{i:05d}-of-{FILES:05d}" for i in range(FILES)])
        fly = _seqio_examples(task, use_cached=False)
        assert len(fly) == row["examples"] == task.num_input_examples("train")
        if row is rows[0]:  # the format, for one direction (the same writer wrote both)
            # seqio's own reader of its cache format (Task.get_dataset(use_cached=True)) ...
            cached = _seqio_examples(task, use_cached=True, cache_dir=root)
            assert _multiset(cached) == _multiset(fly)
        # ... and jaxmt's batched reader: one epoch of it is the same examples (no EOS yet).
        it = cache._task_examples(task.name, root, seed=0, shard_index=0, num_shards=1,
                                  window=1000, threads=1)
        epoch = [next(it) for _ in range(row["examples"])]
        assert _multiset((np.append(a, 1), np.append(b, 1)) for a, b in epoch) == _multiset(fly)
        with open(os.path.join(path, "stats.train.json")) as f:
            stats = json.load(f)
        assert stats["examples"] == len(fly)
        assert stats["targets_tokens"] == sum(len(b) - 1 for _, b in fly)  # EOS is post-cache


@pytest.mark.slow
@pytest.mark.parametrize("hosts", [2, 5])
def test_each_host_reads_its_own_files(built, hosts):
    # 5 hosts: more than FILES, and 4096-record blocks do not split evenly 5 ways, so
    # the every-k-th selection must carry its offset from one block to the next.
    mixture, root, rows = built
    name, n = rows[0]["task"], rows[0]["examples"]
    files = [cache._host_files(name, root, h, hosts) for h in range(hosts)]
    if hosts <= FILES:  # one file subset per host
        assert all(not every_kth for _, every_kth in files)
        every = [f for fs, _ in files for f in fs]
        assert len(every) == len(set(every)) == FILES  # disjoint, and all of them
    else:  # fewer files than hosts: every host reads all, keeps every k-th example
        assert all(every_kth for _, every_kth in files)
    parts = []
    for h in range(hosts):
        if files[h][1]:
            count = len(range(h, n, hosts))
        else:
            count = sum(_count_records(f) for f in files[h][0])
        it = cache._task_examples(name, root, seed=5, shard_index=h, num_shards=hosts,
                                  window=512, threads=1)
        parts.append(_multiset(next(it) for _ in range(count)))
    whole = sum(parts, collections.Counter())
    it = cache._task_examples(name, root, seed=5, shard_index=0, num_shards=1, window=512,
                              threads=1)
    assert whole == _multiset(next(it) for _ in range(n))  # the hosts split one epoch


def _count_records(path):
    import tensorflow as tf
    return sum(len(b) for b in tf.data.TFRecordDataset(path).batch(4096).as_numpy_iterator())


def _digest(batch):
    return hashlib.sha256(b"".join(k.encode() + batch[k].tobytes() for k in sorted(batch))
                          ).hexdigest()


def test_cached_stream_is_deterministic_resumable_and_sampled_at_the_rates(built, spm_path):
    mixture, root, _ = built
    kw = dict(seed=7, cache_dir=root)
    full = pipeline.train_batches(mixture, 32, 32, 4, **kw)
    want = [_digest(next(full)) for _ in range(8)]
    assert len(set(want)) == 8
    again = pipeline.train_batches(mixture, 32, 32, 4, **kw)
    assert [_digest(next(again)) for _ in range(8)] == want
    resumed = pipeline.train_batches(mixture, 32, 32, 4, start_batch=5, **kw)
    assert [_digest(next(resumed)) for _ in range(3)] == want[5:]
    # Not the on-the-fly stream, but the same kind of batches.
    fly = next(pipeline.train_batches(mixture, 32, 32, 4, seed=7))
    assert _digest(fly) != want[0]
    assert set(fly) == set(next(pipeline.train_batches(mixture, 32, 32, 4, **kw)))
    # Mixing: each direction's share of the examples is its Mixture rate (the source's
    # first id is the target-language tag).
    sp = vocab.load_processor(spm_path)
    ex = cache.cached_examples(mixture, root, seed=1, src_len=32, tgt_len=32)
    firsts = collections.Counter(int(next(ex)[0][0]) for _ in range(6000))
    mix = seqio.get_mixture_or_task(mixture)
    for task in mix.tasks:
        tgt = task.name.rsplit("_", 1)[1]
        share = firsts[vocab.tag_id(sp, tgt)] / 6000
        assert abs(share - mix.get_rate(task)) < 0.03, (task.name, share)
    # Trimming keeps EOS last, as seqio's append_eos_after_trim does.
    src, tgt = next(cache.cached_examples(mixture, root, seed=1, src_len=4, tgt_len=3))
    assert len(src) <= 4 and len(tgt) <= 3 and src[-1] == 1 and tgt[-1] == 1


@pytest.mark.slow
def test_stale_partial_and_missing_caches(small_built, spm_path, tmp_path):
    mixture, root, rows = small_built
    assert not cache.is_usable(str(tmp_path / "nothing"), mixture, spm_path)
    # Another vocabulary: stale, named, with the command that rebuilds it.
    other = tmp_path / "other.model"
    shutil.copy(spm_path, other)
    with open(other, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="another SentencePiece model.*jaxmt data cache"):
        cache.is_usable(root, mixture, str(other))
    # A changed corpus (one direction fewer examples): stale.
    copy = str(tmp_path / "copy")
    shutil.copytree(root, copy)
    first = cache.task_dir(copy, rows[0]["task"])
    manifest = json.load(open(os.path.join(first, cache.MANIFEST)))
    json.dump(dict(manifest, fingerprint="0" * 64), open(os.path.join(first, cache.MANIFEST), "w"))
    with pytest.raises(ValueError, match=f"{rows[0]['task']}.*source examples changed"):
        cache.is_usable(copy, mixture, spm_path)
    # One direction missing: partial, an error rather than half the data from the cache.
    shutil.rmtree(first)
    with pytest.raises(ValueError, match="no completed cache"):
        cache.is_usable(copy, mixture, spm_path)
    # build() redoes only what is not fresh.
    again = cache.build(copy, mixture, spm_path, num_shards=2, progress=False)
    assert [r["status"] for r in again] == ["built", "fresh"]
    assert cache.is_usable(copy, mixture, spm_path)


def test_a_crash_mid_write_leaves_the_old_cache_or_none(small_built, spm_path, tmp_path,
                                                         monkeypatch):
    mixture, root, rows = small_built
    copy = str(tmp_path / "copy")
    shutil.copytree(root, copy)
    task = seqio.get_mixture_or_task(rows[0]["task"])
    sha = cache._file_sha256(spm_path)
    real, calls = cache._example_bytes, []

    def dying(*a):
        calls.append(1)
        if len(calls) > 100:
            raise KeyboardInterrupt("killed mid-write")
        return real(*a)
    monkeypatch.setattr(cache, "_example_bytes", dying)
    for where in (copy, str(tmp_path / "fresh")):
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            cache.write_task(task, cache.task_dir(where, task.name), vocab_sha=sha, fp="x",
                             num_shards=2)
    # The old cache is untouched and still fresh; the new place has no cache at all.
    assert cache.task_status(copy, task, sha) == ("fresh", cache.task_dir(copy, task.name))
    assert cache.task_status(str(tmp_path / "fresh"), task, sha)[0] == "missing"
    assert cache.is_usable(root, mixture, spm_path)


BINDINGS = [
    "ModelConfig.vocab_size=2048", "ModelConfig.emb_dim=32", "ModelConfig.num_heads=2",
    "ModelConfig.head_dim=16", "ModelConfig.mlp_dim=64", "ModelConfig.num_encoder_layers=1",
    "ModelConfig.num_decoder_layers=1", "ModelConfig.precision='fp32'",
    "MeshConfig.data=8", f"DataConfig.langs={LANGS!r}", "DataConfig.src_len=32",
    "DataConfig.tgt_len=32", "TrainConfig.batch_size=8", "TrainConfig.steps=2",
    "TrainConfig.log_every=1", "TrainConfig.checkpoint_every=2",
]


@pytest.mark.slow
def test_jaxmt_data_cache_then_train_reads_it(spm_path, corpus_tsv, tmp_path, capsys):
    # The run's data is a small file of its own (DataConfig.corpora: the same command
    # paths as the embedded corpus, through tasks.register_from_config), so the command
    # tokenises a few hundred pairs rather than the 58k the `built` fixture already
    # cached through cache.build.
    model_dir = str(tmp_path / "run")
    os.makedirs(model_dir)
    shutil.copy(spm_path, os.path.join(model_dir, "spm.model"))
    corpora = f"[{{'path': '{corpus_tsv}', 'src_lang': 'en', 'tgt_lang': 'de'}}]"
    flags = [f"--gin.{b}" for b in BINDINGS] + [f"--gin.DataConfig.corpora={corpora}"]
    gin.clear_config()
    try:
        assert cli.main(["data", "cache", "--model_dir", model_dir, "--num_shards", "2",
                         "--json"] + flags) == 0
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert out["cache_dir"] == os.path.join(model_dir, "data_cache")
        assert [t["status"] for t in out["tasks"]] == ["built", "built"]  # en->de, de->en
        assert [t["examples"] for t in out["tasks"]] == [CORPUS_PAIRS] * 2
        gin.clear_config()
        assert cli.main(["train", "--model_dir", model_dir] + flags) == 0
        printed = capsys.readouterr().out
        assert f"data: reading the pre-tokenised cache in {model_dir}/data_cache" in printed
    finally:
        gin.clear_config()
    from jaxmt.checkpoint import Checkpointer
    import orbax.checkpoint as ocp
    ck = Checkpointer(model_dir, async_save=False)
    meta = ck.manager.restore(2, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    ck.close()
    assert meta["data"]["cached"] is True and meta["data"]["batches"] == 2
