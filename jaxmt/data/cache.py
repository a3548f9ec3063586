"""Pre-tokenised cache: each direction's train split tokenised once, in seqio's cache format.

``jaxmt data cache`` (:func:`build`) runs every Task of a Mixture through its
pre-cache preprocessors (SentencePiece tokenisation, the same ops as on the fly) and
writes the token ids to sharded TFRecord files laid out exactly as seqio's offline
cache (``seqio.scripts.cache_tasks_main``) lays them out, without needing Apache Beam:

    CACHE_DIR/TASK/train.tfrecord-00000-of-00016 ...   tf.train.Example: inputs, targets
    CACHE_DIR/TASK/info.train.json                     features and shard count
    CACHE_DIR/TASK/stats.train.json                    examples and token counts
    CACHE_DIR/TASK/jaxmt_cache.json                    what the cache was built from
    CACHE_DIR/TASK/COMPLETED                           written last

Training reads it with :func:`cached_examples`, given the directory explicitly
(``train_batches(cache_dir=...)``): the post-cache step (EOS after trimming) still
runs, files are read in a new seeded order per epoch, and a multi-host run gives each
host its own subset of the files when a Task has at least as many files as there are
hosts (sharding examples otherwise), as seqio's reader does. seqio's own cached data
source (``get_dataset(use_cached=True)`` after ``seqio.utils.set_global_cache_dirs``)
reads the same files too; jaxmt never sets seqio's global cache directories. Examples
are written in a seeded full shuffle, dealt round-robin to the files, so each file is
a random sample of the split and a reader's file shuffle plus its shuffle buffer mix
well.

A cache is used only when it is *fresh*: its fingerprint (SentencePiece model bytes,
or every file of an imported tokenizer, and every source example, in order) matches
the registered Task's. A missing cache
means tokenising on the fly; a stale or partial one is an error that says how to
rebuild it, never silently different data. A Task directory is written under a
temporary name and renamed into place, so a crash never leaves a half-written cache
that looks complete.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import seqio  # noqa: E402

from jaxmt.data import signals, tfdata  # noqa: E402
from jaxmt.data.tfdata import tf  # noqa: E402  (hidden from accelerators there)

CACHE_VERSION = 1
MANIFEST = "jaxmt_cache.json"
FEATURES = ("inputs", "targets")
SPLIT = "train"  # evaluation reads the text references, so only train is cached


def task_dir(cache_dir: str | Path, task_name: str) -> str:
    """Where seqio looks for ``task_name``'s cache under ``cache_dir``."""
    return os.path.join(str(cache_dir), seqio.utils.get_task_dir_from_name(task_name))


def _file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def vocab_digest(vocab: str | Path | signals.TextFormat) -> str:
    """The digest of what a cache's ids are tokenised with.

    A SentencePiece model's path: the SHA-256 of its bytes. A
    :class:`~jaxmt.data.signals.TextFormat`: of its one file with no ``salt`` the
    same (so a jaxmt model's ``spm.model`` keeps its digest either way), else a digest
    of every file (name and bytes, in order: all of Marian's ``source.spm``,
    ``target.spm`` and ``vocab.json``) and the salt. The template needs no place here:
    it is in the source examples :func:`fingerprint` hashes.
    """
    if not isinstance(vocab, signals.TextFormat):
        return _file_sha256(vocab)
    if len(vocab.files) == 1 and not vocab.salt:
        return _file_sha256(vocab.files[0])
    h = hashlib.sha256(f"jaxmt-vocab:{vocab.kind}:{vocab.salt}:".encode())
    for path in vocab.files:
        h.update(f"{os.path.basename(path)}={_file_sha256(path)};".encode())
    return h.hexdigest()


def fingerprint(task: seqio.Task, vocab_sha: str, split: str = SPLIT) -> str:
    """What a Task's cached ids depend on: the vocabulary and its source examples.

    Hashes every source example's ``inputs`` and ``targets`` strings in source order
    (the cache's shuffle seed is recorded separately), so a changed corpus file, a
    changed cleaning limit or a changed language tag all make the cache stale.
    """
    h = hashlib.sha256(f"jaxmt-cache-v{CACHE_VERSION}:{vocab_sha}:".encode())
    ds = task.source.get_dataset(split=split, shuffle=False)
    for batch in ds.batch(16384).as_numpy_iterator():
        for key in FEATURES:
            h.update(key.encode())
            h.update(b"\x00".join(batch[key].tolist()))
            h.update(np.asarray([len(x) for x in batch[key]], np.int64).tobytes())
    return h.hexdigest()


def task_status(cache_dir: str | Path, task: seqio.Task, vocab_sha: str,
                expected: str | None = None) -> tuple[str, str]:
    """``("fresh"|"missing"|"stale", why)`` of one Task's cache under ``cache_dir``.

    ``expected`` is the Task's :func:`fingerprint` (computed here when ``None``).
    """
    path = task_dir(cache_dir, task.name)
    if not os.path.exists(os.path.join(path, "COMPLETED")):
        return "missing", f"{path}: no completed cache"
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        return "stale", f"{path}/{MANIFEST}: unreadable ({e})"
    if manifest.get("version") != CACHE_VERSION:
        return "stale", (f"{path}: cache format version {manifest.get('version')}, this jaxmt "
                         f"writes {CACHE_VERSION}")
    if manifest.get("vocab_sha256") != vocab_sha:
        return "stale", (f"{path}: built with another SentencePiece model (or another "
                         "tokenizer's files)")
    if manifest.get("fingerprint") != (expected or fingerprint(task, vocab_sha)):
        return "stale", f"{path}: the source examples changed since it was built"
    return "fresh", path


def _example_bytes(inputs: np.ndarray, targets: np.ndarray) -> bytes:
    feature = {k: tf.train.Feature(int64_list=tf.train.Int64List(value=v))
               for k, v in (("inputs", inputs), ("targets", targets))}
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_task(task: seqio.Task, out_dir: str | Path, *, vocab_sha: str, fp: str,
               num_shards: int = 16, seed: int = 0,
               progress: Callable[[int], None] | None = None) -> dict:
    """Tokenises ``task``'s train split and writes its cache to ``out_dir`` (replaced).

    Returns:
        The stats written to ``stats.train.json``, plus ``seconds``.
    """
    if num_shards <= 0:
        raise ValueError(f"num_shards must be positive, got {num_shards}")
    out_dir = str(out_dir)
    t0 = time.perf_counter()
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    prefix = seqio.utils.get_cached_tfrecord_prefix(tmp, SPLIT)
    writers = [tf.io.TFRecordWriter(f"{prefix}-{i:05d}-of-{num_shards:05d}")
               for i in range(num_shards)]
    ds = task.source.get_dataset(split=SPLIT, shuffle=True, seed=seed)  # full shuffle
    ds = task.preprocess_precache(ds, seed=seed)  # the on-the-fly tokenisation, once
    ds = ds.map(lambda ex: {k: ex[k] for k in FEATURES}, num_parallel_calls=tf.data.AUTOTUNE)
    n, tokens, longest = 0, dict.fromkeys(FEATURES, 0), dict.fromkeys(FEATURES, 0)
    try:
        for ex in ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
            writers[n % num_shards].write(_example_bytes(ex["inputs"], ex["targets"]))
            for k in FEATURES:
                tokens[k] += len(ex[k])
                longest[k] = max(longest[k], len(ex[k]))
            n += 1
            if progress is not None and n % 4096 == 0:
                progress(4096)
    finally:
        for w in writers:
            w.close()
    if progress is not None:
        progress(n % 4096)
    info = {"num_shards": num_shards, "seqio_version": seqio.__version__,
            "features": {k: {"shape": [None], "dtype": "int32"} for k in FEATURES}}
    stats = {"examples": n, **{f"{k}_tokens": tokens[k] for k in FEATURES},
             **{f"{k}_max_tokens": longest[k] for k in FEATURES}}
    manifest = {"version": CACHE_VERSION, "task": task.name, "split": SPLIT,
                "vocab_sha256": vocab_sha, "fingerprint": fp, "seed": seed,
                "num_shards": num_shards, "examples": n}
    for name, obj in ((seqio.utils.get_cached_info_path(tmp, SPLIT), info),
                      (seqio.utils.get_cached_stats_path(tmp, SPLIT), stats),
                      (os.path.join(tmp, MANIFEST), manifest)):
        with open(name, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
    Path(tmp, "COMPLETED").touch()
    # Swap into place: the old cache (if any) is moved aside before the new one lands,
    # so a reader sees either a complete cache or none.
    old = f"{out_dir}.old-{os.getpid()}"
    if os.path.exists(out_dir):
        os.replace(out_dir, old)
    os.makedirs(os.path.dirname(out_dir) or ".", exist_ok=True)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return dict(stats, seconds=time.perf_counter() - t0)


def _mixture_tasks(mixture: str) -> list[seqio.Task]:
    provider = seqio.get_mixture_or_task(mixture)
    return list(provider.tasks) if isinstance(provider, seqio.Mixture) else [provider]


def build(cache_dir: str | Path, mixture: str, vocab_path: str | Path | signals.TextFormat, *,
          num_shards: int = 16, seed: int = 0, overwrite: bool = False,
          progress: bool = True) -> list[dict]:
    """Caches every Task of a registered Mixture (``jaxmt data cache``).

    Tasks whose cache is already fresh are kept unless ``overwrite``.

    Args:
        cache_dir: Root of the cache (``DataConfig.cache_dir``, by default
            ``MODEL_DIR/data_cache``).
        mixture: A Mixture or Task registered by :mod:`jaxmt.data.tasks`.
        vocab_path: The SentencePiece model its Tasks tokenise with, or the
            :class:`~jaxmt.data.signals.TextFormat` they were registered with
            (:func:`vocab_digest` fingerprints every file of it).
        num_shards: Files per Task. A multi-host run reads one subset of the files per
            host when this is at least the number of hosts.
        seed: Seed of the write-time shuffle.
        overwrite: Rebuild fresh caches too.
        progress: Show a progress bar (examples).

    Returns:
        One dict per Task: ``task``, ``status`` ("built" or "fresh"), ``examples``,
        ``inputs_tokens``, ``targets_tokens``, ``seconds``, ``path``.
    """
    from tqdm import tqdm

    vocab_sha = vocab_digest(vocab_path)
    todo = _mixture_tasks(mixture)
    total = sum(t.num_input_examples(SPLIT) or 0 for t in todo)
    bar = tqdm(total=total, desc="cache", unit="ex", disable=not progress, dynamic_ncols=True)
    rows = []
    for task in todo:
        fp = fingerprint(task, vocab_sha)
        path = task_dir(cache_dir, task.name)
        state, _ = task_status(cache_dir, task, vocab_sha, fp)
        if state == "fresh" and not overwrite:
            with open(seqio.utils.get_cached_stats_path(path, SPLIT), encoding="utf-8") as f:
                stats = json.load(f)
            bar.update(stats["examples"])
            rows.append(dict(stats, task=task.name, status="fresh", seconds=0.0, path=path))
            continue
        stats = write_task(task, path, vocab_sha=vocab_sha, fp=fp, num_shards=num_shards,
                           seed=seed, progress=bar.update)
        rows.append(dict(stats, task=task.name, status="built", path=path))
    bar.close()
    return rows


def is_usable(cache_dir: str | Path, mixture: str,
              vocab_path: str | Path | signals.TextFormat) -> bool:
    """Whether every Task of ``mixture`` has a fresh cache under ``cache_dir``.

    A check only: nothing global changes; training reads the cache by passing
    ``cache_dir`` on (``train_batches(cache_dir=...)``). ``vocab_path``: as in
    :func:`build`.

    Returns:
        True when training should read the cache, False when no Task has one
        (tokenise on the fly).

    Raises:
        ValueError: Some Tasks have a cache and others not, or a cache is stale; the
            message names them and the command that rebuilds them.
    """
    if not os.path.isdir(cache_dir):
        return False
    vocab_sha = vocab_digest(vocab_path)
    states = {t.name: task_status(cache_dir, t, vocab_sha) for t in _mixture_tasks(mixture)}
    if all(s == "missing" for s, _ in states.values()):
        return False
    bad = {name: why for name, (s, why) in states.items() if s != "fresh"}
    if bad:
        raise ValueError(
            f"the pre-tokenised cache in {cache_dir} does not match the data: "
            + "; ".join(f"{n}: {why}" for n, why in bad.items())
            + ". Rebuild it with `jaxmt data cache` (same --gin_file/--model_dir as the "
              "run), or delete the directory to tokenise on the fly.")
    return True


# ---------------------------------------------------------------- the fast reader

def _parse_fn():
    desc = {k: tf.io.RaggedFeature(tf.int64, row_splits_dtype=tf.int64) for k in FEATURES}

    @tf.autograph.experimental.do_not_convert
    def parse(protos):
        ex = tf.io.parse_example(protos, desc)
        return {k: tf.cast(ex[k], tf.int32) for k in FEATURES}
    return parse


def _host_files(task_name: str, cache_dir: str, shard_index: int, num_shards: int
                ) -> tuple[list[str], bool]:
    """This host's files of a Task, and whether it must also keep every k-th example.

    One file subset per host when there are at least as many files as hosts (as seqio
    shards a file source); otherwise every host reads every file and keeps the
    examples ``i % num_shards == shard_index`` of the same, seeded, order.
    """
    path = task_dir(cache_dir, task_name)
    with open(seqio.utils.get_cached_info_path(path, SPLIT), encoding="utf-8") as f:
        n_files = json.load(f)["num_shards"]
    prefix = seqio.utils.get_cached_tfrecord_prefix(path, SPLIT)
    files = [f"{prefix}-{i:05d}-of-{n_files:05d}" for i in range(n_files)]
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise FileNotFoundError(f"{path}: {len(missing)} of {n_files} cache files are missing, "
                                f"e.g. {missing[0]}; rebuild with `jaxmt data cache`")
    if n_files >= num_shards:
        return files[shard_index::num_shards], False
    return files, True


def _task_examples(task_name: str, cache_dir: str, seed: int, shard_index: int,
                   num_shards: int, window: int, threads: int):
    """Endless (inputs, targets) id arrays of one Task's cache on this host, no EOS.

    Each epoch reads this host's files in a new seeded order, 4096 records at a time
    (batched parsing: one parse per block instead of per example, ~50x faster than
    seqio's per-example reader), and fully permutes windows of ``window`` examples.
    """
    files, every_kth = _host_files(task_name, cache_dir, shard_index, num_shards)
    key = int.from_bytes(hashlib.sha256(task_name.encode()).digest()[:4], "little")
    parse = _parse_fn()
    for epoch in itertools.count():
        rng = np.random.default_rng([seed, key, epoch])
        order = [files[i] for i in rng.permutation(len(files))]
        ds = (tf.data.TFRecordDataset(order, num_parallel_reads=1).batch(4096)
              .map(parse, num_parallel_calls=threads).prefetch(2)
              .with_options(tfdata.options(threads)))
        buf: list[tuple[np.ndarray, np.ndarray]] = []
        seen = 0
        for block in ds.as_numpy_iterator():
            pairs = list(zip(block["inputs"], block["targets"]))
            if every_kth:
                start = (shard_index - seen) % num_shards
                seen += len(pairs)
                pairs = pairs[start::num_shards]
            buf.extend(pairs)
            while len(buf) >= window:
                head, buf = buf[:window], buf[window:]
                for i in rng.permutation(window):
                    yield head[i]
        for i in rng.permutation(len(buf)):
            yield buf[i]


def cached_examples(mixture: str, cache_dir: str | Path, *, seed: int,
                    src_len: int, tgt_len: int, shard_index: int = 0, num_shards: int = 1,
                    window: int = 16384, threads: int = 2,
                    task_label: Callable[[str], object] | None = None) -> Iterator[tuple]:
    """The training example stream of a Mixture, read from its cache.

    What ``Mixture.get_dataset(use_cached=True)`` gives, without its per-example
    tf.data cost: each Task's examples (:func:`_task_examples`) are sampled at the
    Mixture's rates by a seeded draw per example, then trimmed to ``src_len`` /
    ``tgt_len`` with EOS appended after trimming (seqio's ``append_eos_after_trim``).
    Fully determined by the arguments other than ``threads``.

    Args:
        task_label: Called once per Task name: its result is the third element of each
            of that Task's examples (the pipeline's routing ids). The examples and
            their order are the same with or without it.

    Yields:
        ``(inputs, targets)`` int32 arrays, or ``(inputs, targets, label)``.
    """
    provider = seqio.get_mixture_or_task(mixture)
    task_list = _mixture_tasks(mixture)
    rates = np.asarray([provider.get_rate(t) if isinstance(provider, seqio.Mixture) else 1.0
                        for t in task_list], np.float64)
    rates /= rates.sum()
    eos = [{k: t.output_features[k].vocabulary.eos_id for k in FEATURES} for t in task_list]
    streams = [_task_examples(t.name, str(cache_dir), seed, shard_index, num_shards, window,
                              threads) for t in task_list]
    rng = np.random.default_rng([seed, 0x5EC10])
    cut = {"inputs": src_len - 1, "targets": tgt_len - 1}
    labels = [(task_label(t.name),) for t in task_list] if task_label else [()] * len(task_list)
    while True:
        for i in rng.choice(len(task_list), size=4096, p=rates):
            src, tgt = next(streams[i])
            yield (np.append(src[:cut["inputs"]], np.int32(eos[i]["inputs"])),
                   np.append(tgt[:cut["targets"]], np.int32(eos[i]["targets"])), *labels[i])


def summary(rows: list[Mapping]) -> str:
    """A table of :func:`build`'s rows."""
    lines = [f"{'task':<32} {'status':<6} {'examples':>10} {'src tokens':>12} "
             f"{'tgt tokens':>12} {'seconds':>8}"]
    for r in rows:
        lines.append(f"{r['task']:<32} {r['status']:<6} {r['examples']:>10,} "
                     f"{r['inputs_tokens']:>12,} {r['targets_tokens']:>12,} "
                     f"{r['seconds']:>8.1f}")
    return "\n".join(lines)
