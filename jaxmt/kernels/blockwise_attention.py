"""Memory-efficient (blockwise) attention with a T5 relative position bias.

The bias is never materialised as [b, h, q, k]: each [block_q, block_k] tile looks
its bias up from the [num_buckets, heads] table, and the backward pass scatter-adds
the tile's logit gradients into the table gradient. Forward uses an online softmax
over key blocks; the backward recomputes probabilities from the saved logsumexp, so
memory is linear in sequence length.

The contract (layout, masking, bias positions, scaling) is the one of
``jaxmt.kernels.common``; padding query rows with no visible key produce zeros and
zero gradients, never NaN. ``jaxmt.kernels.common.reference_attention`` is the oracle.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxmt.kernels.common import BlockSizes, RelPos, fill_defaults, pad_axis1, tile_logits, validate

Array = jax.Array


# ----------------------------------------------------------------------------- helpers


def _blocks(x, n):
    """[b, n*blk, ...] -> [n, b, blk, ...] so lax.scan iterates over blocks."""
    return jnp.moveaxis(x.reshape(x.shape[0], n, x.shape[1] // n, *x.shape[2:]), 1, 0)


def _unblocks(x):
    """[n, b, blk, ...] -> [b, n*blk, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


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
            s, _ = tile_logits(qb, kb, qs, ks, qp, kp, qi, ki, table, relpos, causal, scale)
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
            s, buckets = tile_logits(qb, kb, qs, ks, qp, kp, qi, ki, table, relpos, causal,
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
