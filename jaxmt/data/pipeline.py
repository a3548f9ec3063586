"""Training batches from a registered seqio Mixture, as numpy dicts for the JAX trainer.

Every batch has the same keys however it is made. Packed and padded batches also
have the same static shapes, so the trainer compiles one step function; bucketed
batches (``batching="bucket"``) take one of a few shapes, one compilation each.

Deterministic, shardable, resumable: the stream of batches is a function of
``(seed, shard_index, num_shards)`` and the batch shape alone. The direction
shuffles, the Mixture's sampling (``tf.data.Dataset.sample_from_datasets``, which
seqio seeds with the same ``seed``) and packing are seeded or pure, and tf.data runs
with ``options.deterministic = True``. A run that resumes from a checkpoint restarts
the same stream at the batch it had reached (``train_batches(start_batch=k)``); the
position is a small JSON record (:func:`position_record`) that the trainer stores in
the checkpoint's ``meta`` item, next to the parameters.
"""

from __future__ import annotations

import itertools
import logging
import os
from typing import Callable, Iterator, Mapping, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from jaxmt.data import bucketing, packing, tfdata  # noqa: E402  (tfdata hides GPUs from TF)
from jaxmt.data.packing import BATCH_KEYS, LANG_KEYS, NO_LANG  # noqa: E402

log = logging.getLogger(__name__)

# Version of the data-position record in checkpoints (see position_record).
POSITION_VERSION = 1

# Arguments of jaxmt.data.packing.pack_rows for packed batches. Part of the stream's
# definition: changing them changes the batches a resumed run skips to.
PACKING = {"max_open_rows": 512, "close_at": 0.97}
# Bucketed batches: the schedule's weights come from the lengths of the first `sample`
# examples of the unsharded stream (jaxmt.data.bucketing.schedule_weights' other
# arguments). Part of the stream's definition too.
BUCKETING = {"sample": 2048, "margin": 1.2, "min_share": 0.05}

# Language-adapter routing: (src_lang, tgt_lang) -> (encoder id, decoder id), e.g.
# jaxmt.config.AdapterConfig.route_ids; -1 = no adapter.
Route = Callable[[str, str], tuple[int, int]]


def train_batches(mixture_name: str, src_len: int, tgt_len: int, batch_size: int, seed: int,
                  shard_index: int = 0, num_shards: int = 1, batching: str = "pack", *,
                  buckets: Sequence[tuple[int, int]] = (),
                  bucket_stats: bucketing.BucketStats | None = None,
                  start_batch: int = 0, threads: int | None = None,
                  cache_dir: str | None = None, route: Route | None = None
                  ) -> Iterator[dict[str, np.ndarray]]:
    """An infinite iterator over this host's training batches.

    The batches are fully determined by the arguments other than ``threads``: two
    iterators made with the same ones yield identical batches, in any process.

    Args:
        mixture_name: A Mixture (or Task) registered by :func:`jaxmt.data.tasks.register`.
        src_len: Encoder length; longer inputs are trimmed (EOS kept), shorter padded.
        tgt_len: Decoder length, likewise.
        batch_size: Rows per batch *on this host*: the global batch divided by
            ``num_shards``. The caller divides, since only it knows the global batch.
        seed: Shuffling and mixture-sampling seed; the same seed gives the same batches.
        shard_index: This host's index (``jax.process_index()``).
        num_shards: Number of hosts (``jax.process_count()``); each sees a disjoint
            slice of every direction's examples.
        batching: How examples become rows (``DataConfig.batching``):

            * ``"pack"``: several examples per row, by the best-fit packer of
              :mod:`jaxmt.data.packing` (``PACKING`` sets its pool), which gives the
              features ``EncDecFeatureConverter(pack=True)`` would, with fuller rows
              (>= 90% non-padding on the embedded corpus at 64 and 128 tokens).
            * ``"bucket"``: one example per row, in batches of the ``buckets`` shapes
              (token-budget bucketing, :mod:`jaxmt.data.bucketing`): each example in
              the shortest bucket it fits, each step's shape from a seeded schedule
              that is the same on every host. The schedule's weights come from the
              lengths of the first ``BUCKETING["sample"]`` examples of the *unsharded*
              stream (shard 0 of 1, same seed), so every host computes the same ones
              (:func:`sample_lengths`; it costs about a second at start-up).
            * ``"pad"``: one example per row, padded to ``src_len`` / ``tgt_len``
              (a packed row of one segment: seqio's unpacked features, except that
              ``decoder_input_tokens`` is 0 rather than EOS at the first padding
              position, which is masked).
        buckets: ``"bucket"`` only: this host's ``(rows, length)`` of each bucket
            (:func:`jaxmt.data.bucketing.bucket_shapes`, rows divided by
            ``num_shards``), lengths increasing, the last ``max(src_len, tgt_len)``.
            Both sides of a batch are ``length`` long. ``batch_size`` is then unused.
        bucket_stats: ``"bucket"`` only: updated with the queue sizes as batches are
            made (:class:`jaxmt.data.bucketing.BucketStats`).
        start_batch: Start at this batch of the stream: the iterator yields exactly
            what an iterator made with ``start_batch=0`` yields after its first
            ``start_batch`` batches. This is how a resumed run continues. Cost: the
            skipped batches are still produced (read, tokenised, sampled, packed) and
            discarded before the first batch arrives. Measured by
            ``benchmarks/data_pipeline.py`` on the 2-core dev CPU: 12 ms per packed
            batch of 24 x (128 + 128) tokens tokenising on the fly, 1.7 ms from the
            pre-tokenised cache (``cache_dir``).
        threads: tf.data worker threads (default: :func:`default_threads`).
        cache_dir: Read token ids from this pre-tokenised cache (``jaxmt data
            cache``; the caller checks it is fresh with
            :func:`jaxmt.data.cache.is_usable`) instead of tokenising the text. A
            different stream from the on-the-fly one, equally determined by the
            arguments, and several times faster (``benchmarks/data_pipeline.py``).
        route: Language-adapter routing (``AdapterConfig.route_ids``): called once per
            direction ``(src, tgt)`` of the Mixture's Tasks, it gives the direction's
            ``(encoder id, decoder id)``; the batches then also have
            :data:`~jaxmt.data.packing.LANG_KEYS`. A direction it cannot map (it
            raises ``LookupError`` or ``ValueError``) or a Task of unknown direction
            (not registered by :mod:`jaxmt.data.tasks`) gets -1 ids, with a warning.
            The examples, their batching and the other keys are those without it.

    Returns:
        An endless iterator of dicts of int32 arrays of shape [batch_size, src_len] (``encoder_*``) or
        [batch_size, tgt_len] (``decoder_*``) with exactly the keys in
        :data:`BATCH_KEYS` (bucketed: [rows, length] of the step's bucket, both
        sides). Segment ids number the examples in a row from 1 and are 0 on padding;
        positions restart at 0 in each example. With ``route``, also
        :data:`~jaxmt.data.packing.LANG_KEYS` (same shapes): each token's example's
        encoder / decoder routing id, -1 on padding.

    Raises:
        ValueError: Non-positive sizes, a shard index out of range, a negative
            ``start_batch``, an unknown ``batching`` or invalid ``buckets``.
    """
    if min(src_len, tgt_len, batch_size, num_shards) <= 0:
        raise ValueError(f"src_len, tgt_len, batch_size and num_shards must be positive, got "
                         f"{(src_len, tgt_len, batch_size, num_shards)}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index} is not in [0, {num_shards})")
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    if batching not in bucketing.BATCHINGS:
        raise ValueError(f"unknown batching {batching!r}; choose one of {bucketing.BATCHINGS}")
    if batching == "bucket":
        buckets = [(int(r), int(n)) for r, n in buckets]
        err = bucketing.lengths_error([n for _, n in buckets], max(src_len, tgt_len))
        if err or any(r <= 0 for r, _ in buckets):
            raise ValueError(f"buckets {buckets}: {err or 'rows must be positive'}")
    threads = threads or default_threads()
    examples = _examples(mixture_name, src_len, tgt_len, seed, shard_index, num_shards,
                         threads, cache_dir, route)
    keys = BATCH_KEYS + (LANG_KEYS if route is not None else ())
    if batching == "bucket":
        return _bucketed_batches(examples, mixture_name, src_len, tgt_len, seed, buckets,
                                 start_batch, bucket_stats, threads, cache_dir, keys)
    if batching == "pack":
        return _packed_batches(examples, src_len, tgt_len, batch_size, start_batch, keys)
    return _padded_batches(examples, src_len, tgt_len, batch_size, start_batch, keys)


class _Router:
    """``route`` memoised per direction, with -1 ids for what it cannot map."""

    def __init__(self, route: Route) -> None:
        self._route = route
        self._ids: dict = {}

    def __call__(self, src: str | bytes | None, tgt: str | bytes | None) -> tuple[int, int]:
        ids = self._ids.get((src, tgt))
        if ids is None:
            ids = self._ids[(src, tgt)] = self._lookup(src, tgt)
        return ids

    def _lookup(self, src, tgt) -> tuple[int, int]:
        src, tgt = (x.decode() if isinstance(x, bytes) else x for x in (src, tgt))
        if src is None or tgt is None:
            log.warning("routing ids: examples of unknown direction (a Task not registered "
                        "by jaxmt.data.tasks) get routing ids %d", NO_LANG)
            return NO_LANG, NO_LANG
        try:
            got = self._route(src, tgt)
        except (LookupError, ValueError) as e:
            log.warning("routing ids: %s->%s has none (%r); its examples get %d",
                        src, tgt, e, NO_LANG)
            return NO_LANG, NO_LANG
        enc, dec = got
        ids = (int(enc), int(dec))
        if min(ids) < NO_LANG:
            raise ValueError(f"route({src!r}, {tgt!r}) = {got!r}: ids must be >= {NO_LANG}")
        log.info("routing ids of %s->%s: encoder %d, decoder %d", src, tgt, *ids)
        return ids


def _task_directions(name: str) -> Mapping[str, tuple[str, str]]:
    """Task name -> (src, tgt) of a Mixture (or Task) registered by jaxmt.data.tasks."""
    from jaxmt.data import tasks

    if name in tasks.MIXTURES:
        return tasks.MIXTURES[name].directions
    for info in tasks.MIXTURES.values():
        if name in info.directions:
            return {name: info.directions[name]}
    return {}


def _examples(mixture_name: str, src_len: int, tgt_len: int, seed: int, shard_index: int,
              num_shards: int, threads: int, cache_dir: str | None, route: Route | None = None
              ) -> Iterator[tuple]:
    """This host's endless stream of (inputs, targets) ids: tokenised, trimmed to
    ``src_len``/``tgt_len`` with EOS appended, in the Mixture's sampled order. With
    ``route``, ``(inputs, targets, (enc_id, dec_id))`` triples of the same stream."""
    router = _Router(route) if route is not None else None
    if cache_dir:
        # Token ids from `jaxmt data cache`, read in blocks and mixed in numpy
        # (jaxmt.data.cache.cached_examples): no tokenising, no per-example tf.data.
        from jaxmt.data import cache
        dirs = _task_directions(mixture_name) if router is not None else {}

        def label(task: str) -> tuple[int, int]:  # each Task's direction's ids
            return router(*dirs.get(task, (None, None)))

        return cache.cached_examples(
            mixture_name, cache_dir, seed=seed, src_len=src_len, tgt_len=tgt_len,
            shard_index=shard_index, num_shards=num_shards, threads=threads,
            task_label=label if router is not None else None)
    import seqio  # here, not at the top: seqio loads Flax (through clu), the batching does not

    provider = seqio.get_mixture_or_task(mixture_name)
    langs = ()
    if router is not None:
        from jaxmt.data.tasks import LANG_FEATURES

        langs = LANG_FEATURES
    # A Mixture keeps only the output features and those passed through; a Task keeps all.
    extra = {"passthrough_features": langs} if langs and isinstance(provider, seqio.Mixture) else {}
    # Not seqio.get_dataset(): it cannot pass try_in_mem_cache=False, and seqio's
    # in-memory cache would freeze the source's first shuffled epoch (see tasks.py).
    ds = provider.get_dataset(
        {"inputs": src_len, "targets": tgt_len}, split="train", use_cached=False,
        shuffle=True, seed=seed, shard_info=seqio.ShardInfo(shard_index, num_shards),
        num_epochs=None, try_in_mem_cache=False, **extra)
    langs = tuple(k for k in langs if k in ds.element_spec)
    # The Task's preprocessors tokenise, trim and append EOS; batching is numpy, here.
    ds = ds.map(lambda ex: {k: ex[k] for k in ("inputs", "targets") + langs},
                num_parallel_calls=None)
    ds = ds.prefetch(256).with_options(tfdata.options(threads))
    if router is None:
        return ((ex["inputs"], ex["targets"]) for ex in ds.as_numpy_iterator())
    if not langs:
        return ((ex["inputs"], ex["targets"], router(None, None))
                for ex in ds.as_numpy_iterator())
    return ((ex["inputs"], ex["targets"], router(ex["src_lang"], ex["tgt_lang"]))
            for ex in ds.as_numpy_iterator())


def default_threads() -> int:
    """tf.data threads: half the host's cores, at least 2 (or 1 on a 1-core host).

    Half leaves the other cores to the trainer's host work (dispatch, checkpoints);
    on a 2-core machine that is 2, since the input pipeline is then the scarce part.
    """
    cores = os.cpu_count() or 1
    return max(min(2, cores), cores // 2)


def _packed_batches(examples: Iterator[tuple], src_len: int, tgt_len: int, batch_size: int,
                    start_batch: int, keys: Sequence[str] = BATCH_KEYS
                    ) -> Iterator[dict[str, np.ndarray]]:
    # The packer is a pure function of the (deterministic) example stream, so skipping
    # its first `start_batch` batches gives exactly an uninterrupted run's position.
    for i, batch in enumerate(packing.packed_batches(examples, src_len, tgt_len, batch_size,
                                                     **PACKING)):
        if i >= start_batch:
            yield {k: batch[k] for k in keys}


def sample_lengths(mixture_name: str, src_len: int, tgt_len: int, seed: int,
                   threads: int | None = None, cache_dir: str | None = None) -> np.ndarray:
    """``max(len(inputs), len(targets))`` (trimmed) of the first ``BUCKETING["sample"]``
    examples of the unsharded stream: the same on every host, whatever its shard.
    Bucketing's schedule weights come from them (see :func:`train_batches`)."""
    examples = _examples(mixture_name, src_len, tgt_len, seed, 0, 1,
                         threads or default_threads(), cache_dir)
    return np.array([max(len(s), len(t))
                     for s, t in itertools.islice(examples, BUCKETING["sample"])])


def _bucketed_batches(examples: Iterator[tuple], mixture_name: str,
                      src_len: int, tgt_len: int, seed: int,
                      buckets: Sequence[tuple[int, int]], start_batch: int,
                      stats: bucketing.BucketStats | None, threads: int,
                      cache_dir: str | None, keys: Sequence[str] = BATCH_KEYS
                      ) -> Iterator[dict[str, np.ndarray]]:
    # Like packing, a pure function of the example stream (and of the schedule, which
    # depends on the seed and the unsharded sample only): replaying and skipping the
    # first `start_batch` batches reaches an uninterrupted run's position.
    weights = bucketing.schedule_weights(
        sample_lengths(mixture_name, src_len, tgt_len, seed, threads, cache_dir), buckets,
        margin=BUCKETING["margin"], min_share=BUCKETING["min_share"])
    for i, batch in enumerate(bucketing.bucketed_batches(examples, buckets, weights, seed,
                                                         src_len, tgt_len, stats=stats)):
        if i >= start_batch:
            yield {k: batch[k] for k in keys}


def _padded_batches(examples: Iterator[tuple], src_len: int, tgt_len: int, batch_size: int,
                    start_batch: int, keys: Sequence[str] = BATCH_KEYS
                    ) -> Iterator[dict[str, np.ndarray]]:
    # One example per row: a packed row of one segment has exactly the unpacked features
    # (and the example's routing ids, when it has them).
    for i in itertools.count():
        rows = [tuple([x] for x in ex) for ex in itertools.islice(examples, batch_size)]
        if i >= start_batch:
            batch = packing.row_features(rows, src_len, tgt_len)
            yield {k: batch[k] for k in keys}


def position_record(seed: int, batches: int, process_count: int, cached: bool = False) -> dict:
    """The data position a checkpoint stores (JSON): the stream and how far it got.

    ``seed`` names the stream, ``batches`` counts the batches every process has taken
    from it, and ``process_count`` is the number of shards it was cut into. One
    record serves every process: each process's stream is fixed by the seed, its
    ``jax.process_index()`` and the process count, and all processes take one batch
    per step, so they are always at the same position. ``cached`` says whether the
    stream was read from the pre-tokenised cache (a different stream from the text's).
    """
    return {"seed": int(seed), "batches": int(batches), "process_count": int(process_count),
            "cached": bool(cached), "version": POSITION_VERSION}


def resume_position(meta: Mapping, *, seed: int, step: int, process_count: int,
                    cached: bool = False) -> dict:
    """Where a run resuming at checkpoint ``step`` continues its data stream.

    Args:
        meta: The checkpoint's ``meta`` item.
        seed: ``TrainConfig.seed`` of the resuming run (used only for an old checkpoint).
        step: The checkpoint's step.
        process_count: ``jax.process_count()`` of the resuming run.
        cached: Whether the resuming run reads the pre-tokenised cache.

    Returns:
        A :func:`position_record`: pass its ``seed`` and ``batches`` (as
        ``start_batch``) to :func:`train_batches`.

        * With the checkpoint's ``meta["data"]``, the saved stream and position (the
          saved seed wins over ``seed``): the batches after the resume are those an
          uninterrupted run would have taken.
        * A checkpoint without it (saved before data positions existed) gets the old
          behaviour, with a logged warning: a fresh stream seeded ``seed + step``,
          which does not replay the batches already seen but is not the
          uninterrupted run's.
        * A different process count is logged as a warning: every process's shard of
          each direction (``ShardInfo(index, count)``) and its local batch size
          change, so the resumed batches are not an uninterrupted run's. Each
          process still skips the saved number of batches of its new stream, so the
          run goes on about as far into each epoch as it had come.
        * A switch between the text and the pre-tokenised cache is likewise a
          warning: the two are different streams (records older than the cache
          count as text).

    Raises:
        ValueError: A record of an unknown version, or with a negative position.
    """
    rec = meta.get("data")
    if rec is None:
        log.warning(
            "checkpoint step %d has no data position (saved by an older jaxmt): reseeding "
            "the shuffle with seed %d + %d; the batches after this resume differ from an "
            "uninterrupted run's", step, seed, step)
        return position_record(seed + step, 0, process_count, cached)
    if rec.get("version") != POSITION_VERSION or int(rec.get("batches", -1)) < 0:
        raise ValueError(f"checkpoint step {step}: unknown data position record {dict(rec)} "
                         f"(this jaxmt reads version {POSITION_VERSION})")
    if int(rec["process_count"]) != process_count:
        log.warning(
            "checkpoint step %d was saved by %d process(es), this run has %d: each process "
            "now reads a different shard of every direction, so the batches after this "
            "resume are not an uninterrupted run's (each process skips %d batches of its "
            "new stream)", step, rec["process_count"], process_count, rec["batches"])
    if bool(rec.get("cached", False)) != cached:
        how = {True: "the pre-tokenised cache", False: "the text, tokenised on the fly"}
        log.warning(
            "checkpoint step %d read %s, this run reads %s: a different stream, so the "
            "batches after this resume are not an uninterrupted run's (skipping %d batches "
            "of the new stream)", step, how[bool(rec.get("cached", False))], how[cached],
            rec["batches"])
    return position_record(rec["seed"], rec["batches"], process_count, cached)
