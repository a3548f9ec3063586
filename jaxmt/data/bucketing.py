"""Token-budget bucketing: one example per row, rows of a few lengths, equal tokens per batch.

The fairseq/tensor2tensor alternative to packing. Each bucket ``b`` has a length
``L_b`` and a row count ``R_b`` chosen so that every batch holds about the same number
of token slots (``R_b * L_b``); an example goes into the shortest bucket it fits, so a
short sentence is padded to 16 tokens rather than to 128. The trainer compiles one step
per bucket shape, a bound known before the run (the number of buckets).

Multi-host: every process must feed the same shape at the same step, although each
reads its own shard of the data. So the bucket of each step is not chosen by the data:
it comes from a schedule seeded by the run's seed alone (:func:`bucketed_batches`),
with the frequencies of :func:`schedule_weights`. A process fills the step's rows from
its own queues, and a step whose bucket has too few examples is completed with shorter
examples (which fit any longer bucket), so no process ever waits. Longer examples
wait in their bucket's queue, which the schedule keeps bounded (peaks of 500-1,500
examples, a few dozen steps' worth, at 32-row batches of the embedded corpus).

Pure numpy and Python, no TensorFlow. Deterministic: the batches are a function of the
example stream, the shapes, the weights and the seed.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Iterable, Iterator, Sequence

import numpy as np

from jaxmt.data import packing

# DataConfig.batching values: best-fit packing, token-budget buckets, one padded row each.
BATCHINGS = ("pack", "bucket", "pad")

# Mixed into the schedule's seed so that it is not the stream of another seeded generator.
_SCHEDULE_KEY = 0x6275636B  # "buck"
_PHI = (5 ** 0.5 - 1) / 2  # golden ratio: the lowest-discrepancy Weyl sequence

Example = packing.Example


def lengths_error(lengths: Sequence[int], max_len: int) -> str | None:
    """Why ``lengths`` are not valid bucket lengths for rows of ``max_len``, or None."""
    lengths = tuple(lengths)
    if not lengths:
        return "needs at least one length"
    if any(not isinstance(n, (int, np.integer)) or n <= 0 for n in lengths):
        return f"lengths must be positive integers, got {lengths}"
    if any(a >= b for a, b in zip(lengths, lengths[1:])):
        return f"lengths must be strictly increasing, got {lengths}"
    if lengths[-1] != max_len:
        return (f"the last length must equal max(src_len, tgt_len) = {max_len} (every "
                f"example must fit the longest bucket), got {lengths}")
    return None


def bucket_shapes(lengths: Sequence[int], batch_size: int, max_len: int,
                  multiple: int = 1) -> list[tuple[int, int]]:
    """The global ``(rows, length)`` of each bucket's batches: the same token budget.

    The budget is ``batch_size * max_len`` token slots per side, what a batch of the
    longest bucket holds. Bucket ``b`` gets ``floor(budget / L_b / multiple) * multiple``
    rows (at least ``multiple``), so every shape splits evenly over the devices.

    Args:
        lengths: Bucket lengths, strictly increasing, the last equal to ``max_len``.
        batch_size: Global rows of the longest bucket (``TrainConfig.batch_size``).
        max_len: ``max(src_len, tgt_len)``.
        multiple: Every row count is a multiple of this: the lcm of
            replica x data x fsdp x num_microbatches and the process count.

    Returns:
        ``[(rows, length), ...]`` in the order of ``lengths``. A host's share of a
        batch is ``rows // jax.process_count()`` rows.

    Raises:
        ValueError: Invalid lengths, or a non-positive ``batch_size`` or ``multiple``.
    """
    if batch_size <= 0 or multiple <= 0:
        raise ValueError(f"batch_size and multiple must be positive, got {(batch_size, multiple)}")
    err = lengths_error(lengths, max_len)
    if err:
        raise ValueError(f"bucket lengths: {err}")
    budget = batch_size * max_len
    return [(max(multiple, budget // (n * multiple) * multiple), int(n)) for n in lengths]


def schedule_weights(sample_lengths: Sequence[int], shapes: Sequence[tuple[int, int]],
                     margin: float = 1.2, min_share: float = 0.05) -> np.ndarray:
    """How often each bucket is scheduled: ``P(b)`` proportional to ``share_b / R_b``.

    ``share_b`` is the share of sample examples whose smallest fitting bucket is ``b``;
    dividing by the rows per batch makes bucket ``b`` consume examples at the rate
    they arrive. Every scheduled bucket but the shortest is then multiplied by
    ``margin``: it is scheduled a little more often than its own examples need, and
    the surplus rows are filled from shorter buckets' queues. This gives every queue
    a negative drift, so queued examples stay bounded however long the run (the
    shortest scheduled bucket's examples fit every step and never queue). The drift
    is about ``share_shortest * (margin - 1)`` of the arrivals, so it must beat the
    sample's error on the shares: with 2048 sample examples of the embedded corpus,
    ``margin`` 1.1 let the queues grow slowly (1.3k to 4.5k examples over 20k steps at
    lengths 32/64/128), 1.2 held them at ~1.5k. A larger margin also pads more.

    A bucket no sample example needs gets weight 0: scheduling it would only fill its
    rows with shorter examples, padding every one. So do the shortest buckets while
    fewer than ``min_share`` of the examples fit them (their share moves to the first
    bucket kept): a step of such a bucket reads ``R_b / share`` examples to find its
    rows and queues the rest at once (at lengths 16/32/64 the embedded corpus has 1.1%
    of its examples in bucket 16: one 128-row step would queue ~11k examples). The
    longest bucket is always kept, counted as if it held at least one sample example:
    it is the only bucket every example fits. An empty sample schedules every bucket
    for the same token share.

    Args:
        sample_lengths: ``max(len(src), len(tgt))`` of sample examples (after trimming).
        shapes: ``(rows, length)`` per bucket (global or host-local: only ratios matter).
        margin: Over-scheduling factor of the longer buckets; must be >= 1.
        min_share: The smallest share of examples that a bucket and the shorter ones
            together must hold to be scheduled; in [0, 1).

    Returns:
        float64 probabilities, one per bucket, summing to 1.
    """
    if margin < 1.0 or not 0.0 <= min_share < 1.0:
        raise ValueError(f"need margin >= 1 and 0 <= min_share < 1, got {(margin, min_share)}")
    rows = np.array([r for r, _ in shapes], np.float64)
    lengths = np.array([n for _, n in shapes], np.int64)
    sample = np.minimum(np.asarray(sample_lengths, np.int64).reshape(-1), lengths[-1])
    counts = np.bincount(np.searchsorted(lengths, sample, side="left"),
                         minlength=len(shapes)).astype(np.float64)
    if counts.sum() == 0:
        counts[:] = 1.0
    counts[-1] = max(counts[-1], 1.0)
    share = counts / counts.sum()
    cum = np.cumsum(share)
    first = int(np.argmax(cum >= min_share))  # the shortest bucket kept
    share[first], share[:first] = cum[first], 0.0
    w = share / rows
    w[np.flatnonzero(w)[1:]] *= margin
    return w / w.sum()


def expected_rows(shapes: Sequence[tuple[int, int]], weights: Sequence[float]) -> float:
    """Mean rows (examples) per step of a schedule."""
    return float(np.dot(np.asarray(weights, np.float64), [r for r, _ in shapes]))


@dataclasses.dataclass
class BucketStats:
    """What :func:`bucketed_batches` has done so far (it updates the object in place).

    Attributes:
        read: Examples taken from the stream.
        queued: Examples waiting in the queues now (read, not yet in a batch).
        peak_queued: The most examples ever waiting at once.
        promoted: Examples put in a batch longer than their own bucket.
        steps: Batches emitted per bucket.
    """

    read: int = 0
    queued: int = 0
    peak_queued: int = 0
    promoted: int = 0
    steps: list[int] = dataclasses.field(default_factory=list)


def bucketed_batches(examples: Iterable[Example], shapes: Sequence[tuple[int, int]],
                     weights: Sequence[float], seed: int, src_len: int, tgt_len: int, *,
                     stats: BucketStats | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Batches of one example per row, each of one bucket's shape, on a seeded schedule.

    Step ``k``'s bucket is where ``(u + k * phi) mod 1`` falls in the cumulative
    ``weights``, with ``u`` drawn by ``np.random.default_rng([seed, key])`` and ``phi``
    the golden ratio: the same on every process, whatever its data. Independent draws
    would make each bucket's step count a random walk (std ~ sqrt(steps)) that the
    queues absorb (queue peaks 4-11x higher over 3000 steps, on the embedded corpus's
    lengths); this low-discrepancy sequence keeps every bucket within a step or two of
    its share at any point.

    The step's rows are filled, oldest first, from this process's queue of that bucket,
    then from the queues of shorter buckets (longest first: they pad least), then from
    the stream, which queues the examples of longer buckets until a step of theirs.

    Args:
        examples: (input ids, target ids), already tokenised with EOS appended, or
            triples with the example's ``(enc_id, dec_id)`` routing ids (the batches
            then add :data:`jaxmt.data.packing.LANG_KEYS`). A side longer than
            ``src_len`` / ``tgt_len`` is trimmed to it.
        shapes: ``(rows, length)`` of each bucket *on this process*, lengths strictly
            increasing, the last at least ``max(src_len, tgt_len)``.
        weights: The schedule's probability of each bucket (:func:`schedule_weights`);
            the longest bucket's must be positive. An example goes into the shortest
            bucket with positive weight that it fits.
        seed: Seeds the schedule; every process must pass the same one.
        src_len: Encoder trim length.
        tgt_len: Decoder trim length.
        stats: Updated as batches are made (queue sizes, see :class:`BucketStats`).

    Yields:
        Dicts of int32 ``[rows_b, length_b]`` arrays (both sides) with the features of
        :func:`jaxmt.data.packing.row_features` for one segment per row: segment ids
        1 on the example and 0 on padding, positions from 0, decoder inputs the
        targets shifted right with 0 first, loss weights ``targets != 0``, and the
        routing ids of examples that carry them. Ends with the stream, dropping a
        partial batch and the queued examples.
    """
    lengths = np.array([n for _, n in shapes], np.int64)
    w = np.asarray(weights, np.float64)
    if (len(w) != len(shapes) or not len(shapes) or np.any(w < 0) or w[-1] <= 0
            or any(r <= 0 for r, _ in shapes) or np.any(np.diff(lengths) <= 0)):
        raise ValueError(f"bucketing needs positive rows, strictly increasing lengths and "
                         f"as many non-negative weights, the last positive; got shapes "
                         f"{list(shapes)}, weights {list(w)}")
    if lengths[-1] < max(src_len, tgt_len):
        raise ValueError(f"the longest bucket ({lengths[-1]}) is shorter than "
                         f"max(src_len, tgt_len) = {max(src_len, tgt_len)}")
    # home[i]: the bucket of an example whose smallest fitting bucket is i.
    scheduled = np.flatnonzero(w > 0)
    home = scheduled[np.searchsorted(scheduled, np.arange(len(shapes)), side="left")]
    cdf = np.cumsum(w / w.sum())
    offset = float(np.random.default_rng([seed, _SCHEDULE_KEY]).random())
    step = 0
    queues: list[collections.deque] = [collections.deque() for _ in shapes]
    stats = stats if stats is not None else BucketStats()
    stats.steps = [0] * len(shapes)
    stream = iter(examples)
    while True:
        b = min(int(np.searchsorted(cdf, (offset + step * _PHI) % 1.0, side="right")),
                len(shapes) - 1)
        step += 1
        rows, length = shapes[b]
        batch: list[packing.Row] = []
        for q in range(b, -1, -1):
            while queues[q] and len(batch) < rows:
                row = queues[q].popleft()
                stats.queued -= 1
                stats.promoted += q < b
                batch.append(row)
        while len(batch) < rows:
            ex = next(stream, None)
            if ex is None:
                return
            src, tgt, ids = packing.split_example(ex)
            src = np.asarray(src, np.int32)[:src_len]
            tgt = np.asarray(tgt, np.int32)[:tgt_len]
            # A packed row of one segment (with its routing ids, if it has them).
            row = ([src], [tgt]) if ids is None else ([src], [tgt], [ids])
            stats.read += 1
            e = int(home[np.searchsorted(lengths, max(len(src), len(tgt)), side="left")])
            if e <= b:
                stats.promoted += e < b
                batch.append(row)
            else:  # too long for this step: wait for a step of its own bucket
                queues[e].append(row)
                stats.queued += 1
                stats.peak_queued = max(stats.peak_queued, stats.queued)
        stats.steps[b] += 1
        yield packing.row_features(batch, length, length)
