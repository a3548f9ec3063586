"""Training batches from a registered seqio Mixture, as numpy dicts for the JAX trainer.

Every batch has the same static shapes and keys whether or not examples are
packed, so the trainer compiles one step function.
"""

from __future__ import annotations

import os
from typing import Iterator

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402

from jaxmt.data import tasks  # noqa: E402,F401  (hides accelerators from TF on import)
from jaxmt.model import BATCH_KEYS  # noqa: E402



def _unpacked_segments(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Segment ids and positions for unpacked rows: one segment per row, 0 on padding.

    The decoder's mask comes from its targets: ``decoder_input_tokens`` starts with
    id 0 (the shifted-in start token), which is not padding.
    """
    out = dict(batch)
    for side, tokens in (("encoder", batch["encoder_input_tokens"]),
                         ("decoder", batch["decoder_target_tokens"])):
        seg = (tokens != 0).astype(np.int32)
        out[f"{side}_segment_ids"] = seg
        out[f"{side}_positions"] = (np.arange(tokens.shape[1], dtype=np.int32)[None, :] * seg)
    return out


def _options(threads: int) -> tf.data.Options:
    options = tf.data.Options()
    # A private pool keeps tf.data from spreading over every core the trainer needs.
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
    options.autotune.cpu_budget = threads
    options.deterministic = True
    return options


def train_batches(mixture_name: str, src_len: int, tgt_len: int, batch_size: int, seed: int,
                  shard_index: int = 0, num_shards: int = 1, pack: bool = True, *,
                  threads: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """An infinite iterator over this host's training batches.

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
        pack: Pack several examples per row (``EncDecFeatureConverter(pack=True)``).
        threads: tf.data worker threads (default: min(2, CPU count)).

    Returns:
        An endless iterator of dicts of int32 arrays of shape [batch_size, src_len] (``encoder_*``) or
        [batch_size, tgt_len] (``decoder_*``) with exactly the keys in
        :data:`BATCH_KEYS`. Segment ids number the examples in a row from 1 and are 0
        on padding; positions restart at 0 in each example.

    Raises:
        ValueError: Non-positive sizes or a shard index out of range.
    """
    if min(src_len, tgt_len, batch_size, num_shards) <= 0:
        raise ValueError(f"src_len, tgt_len, batch_size and num_shards must be positive, got "
                         f"{(src_len, tgt_len, batch_size, num_shards)}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index} is not in [0, {num_shards})")
    threads = threads or max(1, min(2, os.cpu_count() or 1))
    lengths = {"inputs": src_len, "targets": tgt_len}
    provider = seqio.get_mixture_or_task(mixture_name)
    # Not seqio.get_dataset(): it cannot pass try_in_mem_cache=False, and seqio's
    # in-memory cache would freeze the source's first shuffled epoch (see tasks.py).
    ds = provider.get_dataset(
        lengths, split="train", use_cached=False, shuffle=True, seed=seed,
        shard_info=seqio.ShardInfo(shard_index, num_shards), num_epochs=None,
        try_in_mem_cache=False)
    ds = seqio.EncDecFeatureConverter(pack=pack)(ds, task_feature_lengths=lengths)
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.prefetch(2).with_options(_options(threads))
    return _numpy_batches(ds, pack)


def _numpy_batches(ds: tf.data.Dataset, pack: bool) -> Iterator[dict[str, np.ndarray]]:
    # A separate generator so train_batches() checks its arguments when called.
    for batch in ds.as_numpy_iterator():
        if not pack:
            batch = _unpacked_segments(batch)
        yield {k: np.asarray(batch[k], dtype=np.int32) for k in BATCH_KEYS}
