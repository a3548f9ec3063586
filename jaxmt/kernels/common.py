"""Shared contract of the attention kernels: types, checks, T5 bucketing and the oracle.

Every kernel in ``jaxmt.kernels`` takes q [b, q_len, h, d] and k/v [b, k_len, h, d]
(the layout of ``jaxmt.modeling.attention``), an optional learned bias table
[num_buckets, h] with the :class:`RelPos` that buckets (key - query) offsets, segment
ids with 0 = padding, and an optional causal mask. Like jaxmt, scores are not scaled
unless ``scale`` is given (T5 folds it into init), and positions for the bias are
absolute ``arange`` indices unless given.

Masking: a query attends a key when their segment ids are equal and non-zero and, if
``causal``, the key index is <= the query index. Rows with no visible key produce
zeros and zero gradients, never NaN.

This module holds what the kernels share and imports nothing from the rest of jaxmt:
``relative_bucket`` (T5's bucketing, also used by the model's ``RelativePositionBias``),
the argument checks (``validate``, ``check_int``), default filling and padding, the
bias lookup, the masked softmax, where the buckets saturate, and
``reference_attention``, the plain materialising (XLA) version used as the oracle.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
_MASKED = -1e30  # finite, so the reference's softmax gradient stays NaN-free


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes; blocks larger than a sequence are clamped to its length."""

    block_q: int = 512
    block_k: int = 512

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise ValueError(f"BlockSizes.{name} must be a positive int, got {val!r}")


class RelPos(NamedTuple):
    """How (key - query) offsets are bucketed (see ``relative_bucket``)."""

    num_buckets: int
    max_distance: int
    bidirectional: bool

# ----------------------------------------------------------------------------- platform

_TRACING_FOR: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "jaxmt_tracing_for", default=None)


def target_platform() -> str:
    """The platform the kernels are traced for: the one :func:`tracing_for` names (the
    Partitioner in scope sets its devices' platform, so an ahead-of-time compile for a
    TPU topology on a CPU host gets the TPU kernels), else JAX's default backend."""
    return _TRACING_FOR.get() or jax.default_backend()


@contextlib.contextmanager
def tracing_for(platform: str | None):
    """Trace kernels for ``platform`` ("cpu", "gpu", "tpu"; None: JAX's backend) inside."""
    token = _TRACING_FOR.set(platform)
    try:
        yield
    finally:
        _TRACING_FOR.reset(token)


# ----------------------------------------------------------------------------- bucketing


def relative_bucket(rel: Array, bidirectional: bool, num_buckets: int,
                    max_distance: int, xp=jnp) -> Array:
    """T5 bucketing of (key - query) offsets: exact for small, log-spaced for large.

    ``xp=numpy`` evaluates it on the host (the flash kernel sizes its far tiles with it
    at trace time, where jnp would be staged out).
    """
    ret = xp.zeros_like(rel)
    n = -rel
    if bidirectional:
        num_buckets //= 2
        ret += (n < 0).astype(xp.int32) * num_buckets
        n = xp.abs(n)
    else:
        n = xp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    val_large = max_exact + (
        xp.log(xp.maximum(n, 1).astype(xp.float32) / max_exact)
        / math.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(xp.int32)
    val_large = xp.minimum(val_large, num_buckets - 1)
    return ret + xp.where(is_small, n, val_large)


@functools.lru_cache(maxsize=None)
def saturation(relpos: RelPos) -> tuple[int | None, int, int | None, int]:
    """Where T5's buckets stop changing: ``(future_from, future_bucket, past_from, past_bucket)``.

    Measured from ``relative_bucket`` itself, on the host (numpy), so it works at trace
    time under jit, shard_map or a mesh. The saturated buckets are its values at offsets
    +-2**20; ``*_from`` is the smallest distance from which every offset on that side has
    that bucket (checked up to a reach past max_distance; None if not saturated there).
    A nonzero one gets a guard of +1: the boundary comes from a float32 log that may round
    differently on the device, while one offset further the log is well past the bucket
    edge. Kernels that treat far offsets as one bucket (flash's far tiles, Performer's
    band/far split) start there.
    """
    reach = 2 * max(relpos.max_distance, relpos.num_buckets) + 2
    rel = np.concatenate([np.arange(-reach, reach + 1), [1 << 20, -(1 << 20)]]).astype(np.int32)
    buckets = relative_bucket(rel, relpos.bidirectional, relpos.num_buckets,
                              relpos.max_distance, xp=np)
    buckets, far = buckets[:-2], buckets[-2:]
    out = []
    for side, sat in ((buckets[reach:], far[0]), (buckets[reach::-1], far[1])):
        # side[n]: bucket of offset +n (future) or -n (past), n = 0..reach
        off = np.nonzero(side != sat)[0]
        start = 0 if off.size == 0 else int(off[-1]) + 2  # +1 past the last miss, +1 guard
        out += [start if start <= reach else None, int(sat)]
    return tuple(out)


def bias_of(table: Array | None, relpos: RelPos | None, rel) -> Array | None:
    """T5 bias [..., h] for (key - query) offsets ``rel`` [...], or None without relpos."""
    if relpos is None:
        return None
    buckets = relative_bucket(jnp.asarray(rel, jnp.int32), relpos.bidirectional,
                              relpos.num_buckets, relpos.max_distance)
    return table[buckets]

# ----------------------------------------------------------------------------- checks and defaults


def check_int(name: str, value, minimum: int) -> int:
    """Returns ``value`` if it is an int >= ``minimum``; raises ValueError otherwise."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def validate(q, k, v, bias_table, relpos, q_segment_ids, kv_segment_ids,
             q_positions=None, kv_positions=None):
    """Checks the shared kernel contract; raises ValueError naming the bad argument."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [b, len, h, d]; got q{q.shape} k{k.shape} v{v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: k{k.shape} v{v.shape}")
    b, _, h, d = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (b, h, d):
        raise ValueError(f"k [b, k_len, h, d] must match q's batch/heads/dim: q{q.shape} k{k.shape}")
    if (bias_table is None) != (relpos is None):
        raise ValueError("bias_table and relpos must be given together")
    if relpos is not None:
        if not isinstance(relpos, RelPos):
            raise ValueError(f"relpos must be a RelPos, got {type(relpos).__name__}")
        if bias_table.shape != (relpos.num_buckets, h):
            raise ValueError(f"bias_table must be [num_buckets={relpos.num_buckets}, heads={h}], "
                             f"got {bias_table.shape}")
    for name, arr, n in (("q_segment_ids", q_segment_ids, q.shape[1]),
                         ("kv_segment_ids", kv_segment_ids, k.shape[1]),
                         ("q_positions", q_positions, q.shape[1]),
                         ("kv_positions", kv_positions, k.shape[1])):
        if arr is not None and arr.shape != (b, n):
            raise ValueError(f"{name} must be [b={b}, len={n}], got {arr.shape}")


def fill_defaults(q, k, q_segment_ids, kv_segment_ids, q_positions=None, kv_positions=None):
    """Fills segment ids (all ones) and positions (arange) when absent."""
    b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    ones = lambda n: jnp.ones((b, n), jnp.int32)  # noqa: E731
    arange = lambda n: jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))  # noqa: E731
    return (ones(lq) if q_segment_ids is None else q_segment_ids.astype(jnp.int32),
            ones(lk) if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32),
            arange(lq) if q_positions is None else q_positions.astype(jnp.int32),
            arange(lk) if kv_positions is None else kv_positions.astype(jnp.int32))


def pad_axis1(x: Array, before: int, total: int) -> Array:
    """Pads axis 1 with ``before`` zeros in front and zeros behind up to ``total``.

    Zero is the padding segment id, so padded keys are masked wherever this is used.
    """
    widths = [(0, 0)] * x.ndim
    widths[1] = (before, total - before - x.shape[1])
    return jnp.pad(x, widths)

# ----------------------------------------------------------------------------- reference


def masked_softmax(s: Array, mask: Array) -> Array:
    """Float32 softmax over the last axis; rows with no visible key give all zeros."""
    return jax.nn.softmax(jnp.where(mask, s, _MASKED), axis=-1) * mask


def tile_logits(qb, kb, qseg, kseg, qpos, kpos, qidx, kidx, table, relpos, causal, scale):
    """Masked float32 logits [b, h, bq, bk] of one tile, and its bias buckets [b, bq, bk]."""
    s = jnp.einsum("bqhd,bkhd->bhqk", qb, kb,
                   preferred_element_type=jnp.float32) * scale  # [b, h, bq, bk]
    buckets = None
    if relpos is not None:
        rel = kpos[:, None, :] - qpos[:, :, None]  # [b, bq, bk]
        buckets = relative_bucket(rel, relpos.bidirectional, relpos.num_buckets,
                                  relpos.max_distance)  # kept: the backward scatters by them
        s = s + jnp.transpose(table[buckets], (0, 3, 1, 2))  # [b, bq, bk, h] -> [b, h, bq, bk]
    mask = (qseg[:, :, None] == kseg[:, None, :]) & (kseg[:, None, :] > 0)  # [b, bq, bk]
    if causal:
        mask = mask & (kidx[None, None, :] <= qidx[None, :, None])
    return jnp.where(mask[:, None], s, -jnp.inf), buckets


def reference_attention(q: Array, k: Array, v: Array, *, bias_table: Array | None = None,
                        relpos: RelPos | None = None, q_segment_ids: Array | None = None,
                        kv_segment_ids: Array | None = None, q_positions: Array | None = None,
                        kv_positions: Array | None = None, causal: bool = False,
                        scale: float = 1.0, mask: Array | None = None) -> Array:
    """Materialising attention (the XLA oracle); the kernels' shared contract.

    ``mask`` (boolean, [q, k] or [b, q, k]) further restricts which keys each query
    sees; the sparse variants (local, BigBird) use it as their exact masked reference.
    """
    validate(q, k, v, bias_table, relpos, q_segment_ids, kv_segment_ids, q_positions,
             kv_positions)
    qseg, kseg, qpos, kpos = fill_defaults(q, k, q_segment_ids, kv_segment_ids, q_positions,
                                           kv_positions)
    lq, lk = q.shape[1], k.shape[1]
    table = None if bias_table is None else bias_table.astype(jnp.float32)
    s, _ = tile_logits(q, k, qseg, kseg, qpos, kpos, jnp.arange(lq), jnp.arange(lk), table,
                       relpos, causal, scale)  # [b, h, q, k]
    if mask is not None:
        extra = mask if mask.ndim == 3 else mask[None]  # [b|1, q, k]
        s = jnp.where(extra[:, None], s, -jnp.inf)
    probs = masked_softmax(s, jnp.isfinite(s))  # empty rows -> 0
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32))  # [b, q, h, d]
    return out.astype(q.dtype)


def global_rows(q, k, v, table, relpos, qseg, kseg, n, causal, scale) -> Array:
    """Full attention rows for the first ``n`` queries ([n, length] logits: linear)."""
    return reference_attention(q[:, :n], k, v, bias_table=table, relpos=relpos,
                               q_segment_ids=qseg[:, :n], kv_segment_ids=kseg,
                               causal=causal, scale=scale)
