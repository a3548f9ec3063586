"""Memory-efficient (blockwise) attention with a T5 relative position bias.

The bias is never materialised as [b, h, q, k]: each [block_q, block_k] tile looks
its bias up from the [num_buckets, heads] table, and the backward pass scatter-adds
the tile's logit gradients into the table gradient. Forward uses an online softmax
over key blocks; the backward recomputes probabilities from the saved logsumexp, so
memory is linear in sequence length.

Layout matches ``jaxmt.modeling.attention``: q [b, q_len, h, d], k/v [b, k_len, h, d]. Like
jaxmt, scores are not scaled unless ``scale`` is given (T5 folds it into init), and
positions for the bias are absolute ``arange`` indices unless given.

Masking: a query attends a key when their segment ids are equal and non-zero
(0 = padding) and, if ``causal``, the key index is <= the query index. Rows with no
visible key (e.g. padding queries) produce zeros and zero gradients, never NaN.

``reference_attention`` is the plain materialising (XLA) version used as the oracle.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmt.modeling.layers import relative_bucket

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
    """How (key - query) offsets are bucketed (see ``jaxmt.modeling.layers.relative_bucket``)."""

    num_buckets: int
    max_distance: int
    bidirectional: bool


# ----------------------------------------------------------------------------- helpers


def fill_defaults(q, k, q_segment_ids, kv_segment_ids, q_positions=None, kv_positions=None):
    """Fills segment ids (all ones) and positions (arange) when absent."""
    b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    ones = lambda n: jnp.ones((b, n), jnp.int32)  # noqa: E731
    arange = lambda n: jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))  # noqa: E731
    return (ones(lq) if q_segment_ids is None else q_segment_ids.astype(jnp.int32),
            ones(lk) if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32),
            arange(lq) if q_positions is None else q_positions.astype(jnp.int32),
            arange(lk) if kv_positions is None else kv_positions.astype(jnp.int32))


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


def bias_of(table: Array | None, relpos: RelPos | None, rel) -> Array | None:
    """T5 bias [..., h] for (key - query) offsets ``rel`` [...], or None without relpos."""
    if relpos is None:
        return None
    buckets = relative_bucket(jnp.asarray(rel, jnp.int32), relpos.bidirectional,
                              relpos.num_buckets, relpos.max_distance)
    return table[buckets]


def masked_softmax(s: Array, mask: Array) -> Array:
    """Float32 softmax over the last axis; rows with no visible key give all zeros."""
    return jax.nn.softmax(jnp.where(mask, s, _MASKED), axis=-1) * mask


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


def _tile_logits(qb, kb, qseg, kseg, qpos, kpos, qidx, kidx, table, relpos, causal, scale):
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


def _blocks(x, n):
    """[b, n*blk, ...] -> [n, b, blk, ...] so lax.scan iterates over blocks."""
    return jnp.moveaxis(x.reshape(x.shape[0], n, x.shape[1] // n, *x.shape[2:]), 1, 0)


def _unblocks(x):
    """[n, b, blk, ...] -> [b, n*blk, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


# ----------------------------------------------------------------------------- reference


def reference_attention(q: Array, k: Array, v: Array, *, bias_table: Array | None = None,
                        relpos: RelPos | None = None, q_segment_ids: Array | None = None,
                        kv_segment_ids: Array | None = None, q_positions: Array | None = None,
                        kv_positions: Array | None = None, causal: bool = False,
                        scale: float = 1.0, mask: Array | None = None) -> Array:
    """Materialising attention (the XLA oracle); same contract as ``blockwise_attention``.

    ``mask`` (boolean, [q, k] or [b, q, k]) further restricts which keys each query
    sees; the sparse variants (local, BigBird) use it as their exact masked reference.
    """
    validate(q, k, v, bias_table, relpos, q_segment_ids, kv_segment_ids, q_positions,
              kv_positions)
    qseg, kseg, qpos, kpos = fill_defaults(q, k, q_segment_ids, kv_segment_ids, q_positions,
                                       kv_positions)
    lq, lk = q.shape[1], k.shape[1]
    table = None if bias_table is None else bias_table.astype(jnp.float32)
    s, _ = _tile_logits(q, k, qseg, kseg, qpos, kpos, jnp.arange(lq), jnp.arange(lk), table,
                        relpos, causal, scale)  # [b, h, q, k]
    if mask is not None:
        extra = mask if mask.ndim == 3 else mask[None]  # [b|1, q, k]
        s = jnp.where(extra[:, None], s, -jnp.inf)
    probs = masked_softmax(s, jnp.isfinite(s))  # empty rows -> 0
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32))  # [b, q, h, d]
    return out.astype(q.dtype)


# ----------------------------------------------------------------------------- blockwise


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11, 12))
def _flash(q, k, v, table, qseg, kseg, qpos, kpos, relpos, causal, scale, bq, bk):
    return _flash_fwd(q, k, v, table, qseg, kseg, qpos, kpos, relpos, causal, scale,
                      bq, bk)[0]


def _flash_fwd(q, k, v, table, qseg, kseg, qpos, kpos, relpos, causal, scale, bq, bk):
    """Outer scan over q blocks, inner scan over k blocks with an online softmax."""
    b, lq, h, d = q.shape
    nq, nk = lq // bq, k.shape[1] // bk
    kx = (_blocks(k, nk), _blocks(v, nk), _blocks(kseg, nk), _blocks(kpos, nk),
          jnp.arange(k.shape[1]).reshape(nk, bk))

    def q_block(_, qx):
        qb, qs, qp, qi = qx

        def k_block(carry, kx_j):
            m, l, acc = carry  # [b, h, bq], [b, h, bq], [b, bq, h, d]
            kb, vb, ks, kp, ki = kx_j
            s, _ = _tile_logits(qb, kb, qs, ks, qp, kp, qi, ki, table, relpos, causal, scale)
            m_new = jnp.maximum(m, s.max(-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # all-masked so far: exp -> 0
            p = jnp.exp(s - m_safe[..., None])  # [b, h, bq, bk]
            alpha = jnp.exp(m - m_safe)  # rescales the old statistics to the new max
            l = alpha * l + p.sum(-1)
            acc = acc * jnp.transpose(alpha, (0, 2, 1))[..., None] + jnp.einsum(
                "bhqk,bkhd->bqhd", p, vb.astype(jnp.float32))  # [b, bq, h, d]
            return (m_new, l, acc), None

        init = (jnp.full((b, h, bq), -jnp.inf, jnp.float32), jnp.zeros((b, h, bq), jnp.float32),
                jnp.zeros((b, bq, h, d), jnp.float32))
        (m, l, acc), _ = jax.lax.scan(k_block, init, kx)
        empty = l == 0.0  # no visible key: output 0, lse 0 (masked logits are -inf anyway)
        l_safe = jnp.where(empty, 1.0, l)
        out = acc / jnp.transpose(l_safe, (0, 2, 1))[..., None]  # [b, bq, h, d]
        lse = jnp.where(empty, 0.0, m + jnp.log(l_safe))  # [b, h, bq]
        return None, (out.astype(q.dtype), lse)

    qx = (_blocks(q, nq), _blocks(qseg, nq), _blocks(qpos, nq), jnp.arange(lq).reshape(nq, bq))
    _, (out, lse) = jax.lax.scan(q_block, None, qx)
    out = _unblocks(out)  # [b, q, h, d]
    lse = jnp.moveaxis(lse, 0, 2).reshape(b, h, lq)  # [nq, b, h, bq] -> [b, h, q]
    return out, (q, k, v, table, qseg, kseg, qpos, kpos, out, lse)


def _flash_bwd(relpos, causal, scale, bq, bk, res, do):
    """Outer scan over k blocks (dk, dv local), inner over q blocks (dq, d_table carried)."""
    q, k, v, table, qseg, kseg, qpos, kpos, out, lse = res
    b, lq, h, d = q.shape
    nq, nk = lq // bq, k.shape[1] // bk
    do = do.astype(jnp.float32)
    delta = jnp.einsum("bqhd,bqhd->bhq", do, out.astype(jnp.float32))  # [b, h, q] rowsum(dO*O)
    lse_b = jnp.moveaxis(lse.reshape(b, h, nq, bq), 2, 0)  # [nq, b, h, bq]
    delta_b = jnp.moveaxis(delta.reshape(b, h, nq, bq), 2, 0)  # [nq, b, h, bq]
    qx = (_blocks(q, nq), _blocks(do, nq), lse_b, delta_b, _blocks(qseg, nq), _blocks(qpos, nq),
          jnp.arange(lq).reshape(nq, bq))

    def k_block(carry, kx_j):
        dq, dtable = carry
        kb, vb, ks, kp, ki = kx_j

        def q_block(carry_i, qx_i):
            dk, dv, dtable = carry_i
            qb, dob, lse_i, delta_i, qs, qp, qi = qx_i
            s, buckets = _tile_logits(qb, kb, qs, ks, qp, kp, qi, ki, table, relpos, causal,
                                      scale)
            p = jnp.exp(s - lse_i[..., None])  # [b, h, bq, bk]; masked -> 0
            dv = dv + jnp.einsum("bhqk,bqhd->bkhd", p, dob)  # [b, bk, h, d]
            dp = jnp.einsum("bqhd,bkhd->bhqk", dob, vb.astype(jnp.float32))  # [b, h, bq, bk]
            ds = p * (dp - delta_i[..., None])  # [b, h, bq, bk] gradient of the biased logits
            dq_i = scale * jnp.einsum("bhqk,bkhd->bqhd", ds, kb.astype(jnp.float32))  # [b, bq, h, d]
            dk = dk + scale * jnp.einsum("bhqk,bqhd->bkhd", ds, qb.astype(jnp.float32))
            if relpos is not None:  # the tile's bias is table[buckets]: scatter its gradient back
                dtable = dtable.at[buckets].add(jnp.transpose(ds, (0, 2, 3, 1)))  # [b, bq, bk, h]
            return (dk, dv, dtable), dq_i

        zeros = jnp.zeros((b, bk, h, d), jnp.float32)
        (dk, dv, dtable), dq_j = jax.lax.scan(q_block, (zeros, zeros, dtable), qx)
        return (dq + dq_j, dtable), (dk, dv)

    kx = (_blocks(k, nk), _blocks(v, nk), _blocks(kseg, nk), _blocks(kpos, nk),
          jnp.arange(k.shape[1]).reshape(nk, bk))
    init = (jnp.zeros((nq, b, bq, h, d), jnp.float32), jnp.zeros(table.shape, jnp.float32))
    (dq, dtable), (dk, dv) = jax.lax.scan(k_block, init, kx)
    return (_unblocks(dq).astype(q.dtype), _unblocks(dk).astype(k.dtype),
            _unblocks(dv).astype(v.dtype), dtable.astype(table.dtype),
            None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def pad_axis1(x: Array, before: int, total: int) -> Array:
    """Pads axis 1 with ``before`` zeros in front and zeros behind up to ``total``.

    Zero is the padding segment id, so padded keys are masked wherever this is used.
    """
    widths = [(0, 0)] * x.ndim
    widths[1] = (before, total - before - x.shape[1])
    return jnp.pad(x, widths)


def blockwise_attention(q: Array, k: Array, v: Array, *, bias_table: Array | None = None,
                        relpos: RelPos | None = None, q_segment_ids: Array | None = None,
                        kv_segment_ids: Array | None = None, q_positions: Array | None = None,
                        kv_positions: Array | None = None, causal: bool = False,
                        scale: float = 1.0, block_sizes: BlockSizes | None = None) -> Array:
    """Attention with O(length) memory and an in-loop T5 relative position bias.

    Args:
        q: [b, q_len, h, d] queries.
        k: [b, k_len, h, d] keys.
        v: [b, k_len, h, d] values.
        bias_table: [relpos.num_buckets, h] learned bias table (differentiable), or None.
        relpos: bucketing of (key_pos - query_pos); required iff ``bias_table`` is given.
        q_segment_ids: [b, q_len] int segment ids (0 = padding); default all ones.
        kv_segment_ids: [b, k_len] int segment ids (0 = padding); default all ones.
        q_positions: [b, q_len] positions for the bias; default ``arange`` (as jaxmt).
        kv_positions: [b, k_len] positions for the bias; default ``arange``.
        causal: mask keys whose index exceeds the query's index.
        scale: multiplies q.k before the bias (1.0 for T5).
        block_sizes: tile sizes; lengths are padded internally to a block multiple.

    Returns:
        [b, q_len, h, d] attention output in q's dtype; rows without any visible key are 0.
    """
    validate(q, k, v, bias_table, relpos, q_segment_ids, kv_segment_ids, q_positions,
              kv_positions)
    block_sizes = block_sizes or BlockSizes()
    if not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"block_sizes must be a BlockSizes, got {type(block_sizes).__name__}")
    qseg, kseg, qpos, kpos = fill_defaults(q, k, q_segment_ids, kv_segment_ids, q_positions,
                                       kv_positions)
    lq, lk = q.shape[1], k.shape[1]
    bq, bk = min(block_sizes.block_q, lq), min(block_sizes.block_k, lk)
    pq, pk = -(-lq // bq) * bq, -(-lk // bk) * bk
    # Padded keys get segment 0 (masked); padded queries are all-masked rows, sliced off.
    q_, qseg_, qpos_ = (pad_axis1(x, 0, pq) for x in (q, qseg, qpos))
    k_, v_, kseg_, kpos_ = (pad_axis1(x, 0, pk) for x in (k, v, kseg, kpos))
    table = (jnp.zeros((1, q.shape[2]), jnp.float32) if bias_table is None
             else bias_table.astype(jnp.float32))
    out = _flash(q_, k_, v_, table, qseg_, kseg_, qpos_, kpos_, relpos, bool(causal),
                 float(scale), bq, bk)
    return out[:, :lq]
