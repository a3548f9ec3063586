"""Pallas flash attention with the T5 relative position bias computed in-kernel.

Same contract as ``jaxmt.kernels.common`` (q [b, q_len, h, d], k/v
[b, k_len, h, d], segment ids with 0 = padding, optional causal mask, learned bias
table [num_buckets, h]), but the tiles run as Pallas kernels for GPU (Triton) or TPU
(Mosaic); bias positions are always the plain indices ``0..len-1``.

Why the bias is computed in-kernel: a materialised [b, h, q, k] bias costs as much HBM
traffic as the scores flash attention avoids. Each tile instead builds
``rel = k_index - q_index`` from iota, buckets it with ``jaxmt.kernels.common.relative_bucket``
itself (elementwise ops, traced in-kernel) and selects ``table[head, bucket]`` with a static
Python loop of ``where(bucket == i, table[head, i], bias)`` over scalar table reads.
Gathers do not lower portably (neither Triton nor Mosaic gathers from a ref by a
vector of indices), while scalar reads do: from SMEM on TPU, from global memory on GPU.
Far-tile fast path: T5 buckets saturate, so a tile whose offsets all lie past the
saturation point on one side (found in Python by evaluating ``relative_bucket``) has a single
bucket; a ``lax.cond`` then adds one scalar table read instead of the select loop, and dq
adds the whole tile's dS sum to that bucket instead of one masked reduction per bucket.

Kernels (all in the internal layout [b, h, len, d], lengths padded to block multiples;
padded keys get segment 0, padded query rows are sliced off):

* forward, grid (b, h, q-blocks): the q tile stays resident; a ``lax.fori_loop`` over
  key blocks slices the (b, h) K/V block and runs an online softmax. Saves the output
  and the logsumexp (lse).
* dq, grid (b, h, q-blocks): loops over key blocks, recomputes p from the lse and
  accumulates dq; it also sums dS per bucket into a per-(b, h, q-block) partial table
  gradient [b, h, nq, 1, buckets] that plain JAX reduces.
* dk/dv, grid (b, h, k-blocks): the k/v tiles stay resident; loops over q blocks.

``delta = rowsum(dO * O)`` is computed in plain JAX between the two passes. Causal
loops skip key (query) blocks that lie entirely above (below) the diagonal.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from jaxmt.kernels.common import (BlockSizes, RelPos, fill_defaults, pad_axis1, relative_bucket,
                                  saturation, target_platform, validate)

__all__ = ["default_block_sizes", "far_config", "flash_attention"]

Array = jax.Array
_MASKED = -1e30  # finite: masked logits never produce inf - inf = NaN
_NT = (((1,), (1,)), ((), ()))  # a [m, d] . b [n, d] -> [m, n]
_TN = (((0,), (0,)), ((), ()))  # a [m, n] . b [m, d] -> [n, d]
_NN = (((1,), (0,)), ((), ()))  # a [m, n] . b [n, d] -> [m, d]


@dataclasses.dataclass(frozen=True)
class _Cfg:
    """Static kernel configuration (hashable: it keys custom_vjp and jit caches)."""

    relpos: RelPos | None
    causal: bool
    scale: float
    bq: int
    bk: int
    nq: int
    nk: int
    nbp: int  # table row length: num_buckets padded to a power of two (Triton tiles)
    # Far tiles: (future_from, future_bucket, past_from, past_bucket); every offset
    # rel >= future_from has future_bucket, every rel <= -past_from has past_bucket. A
    # *_from is None where no tile of this call lies that far; far is None if neither does.
    far: tuple[int | None, int, int | None, int] | None
    backend: str  # "gpu" or "tpu"
    interpret: bool


# ----------------------------------------------------------------------------- tile math


def _relbucket(rel, relpos: RelPos):
    """T5 bucket of int32 ``rel = key - query`` [bq, bk]: the model's own formula, traced
    in-kernel (elementwise ops only, which Triton and Mosaic both lower)."""
    return relative_bucket(rel, relpos.bidirectional, relpos.num_buckets, relpos.max_distance)


def far_config(relpos: RelPos | None, causal, bq, bk, nq, nk):
    """_Cfg.far: the saturation sides that some visited tile of this geometry reaches."""
    if relpos is None:
        return None
    fut_from, fut_b, past_from, past_b = saturation(relpos)
    # Largest lowest offset of any tile (last key block vs first query block), smallest
    # highest offset (first key block vs last query block). Causal never visits future tiles.
    if causal or fut_from is None or (nk - 1) * bk - (bq - 1) < fut_from:
        fut_from = None
    if past_from is None or (bk - 1) - (nq - 1) * bq > -past_from:
        past_from = None
    if fut_from is None and past_from is None:
        return None
    return fut_from, fut_b, past_from, past_b


def _far(cfg: _Cfg, q0, k0):
    """Whether tile (q0, k0) has a single bucket: None if no tile can, else
    (is_far, pick) with ``pick(f)`` = f(that bucket) for a static-int -> scalar/vector f."""
    if cfg.far is None:
        return None
    fut_from, fut_b, past_from, past_b = cfg.far
    fut = None if fut_from is None else k0 - (q0 + cfg.bq - 1) >= fut_from  # lowest offset
    past = None if past_from is None else k0 + cfg.bk - 1 - q0 <= -past_from  # highest
    if past is None:
        return fut, lambda f: f(fut_b)
    if fut is None:
        return past, lambda f: f(past_b)
    return fut | past, lambda f: jnp.where(fut, f(fut_b), f(past_b))


def _dot(a, b, dims):
    """float32-accumulating dot; exact float32 (no TF32/bf16 passes) for float32 inputs."""
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


def _tile(cfg: _Cfg, q, k, qseg, kseg, q0, k0, read_table, far=None, want_bucket=False):
    """Biased logits, visibility mask and buckets of one [bq, bk] tile.

    Args:
        q: [bq, d] query tile; k: [bk, d] key tile.
        qseg: [bq, 1] and kseg: [1, bk] segment ids (0 = padding).
        q0, k0: first query / key index of the tile.
        read_table: ``i -> table[head, i]`` scalar read, or None without relpos.
        far: ``_far(cfg, q0, k0)``.
        want_bucket: also return the buckets (only meaningful when the tile is not far).

    Returns:
        (s [bq, bk] float32 with masked entries at _MASKED, mask [bq, bk], bucket or None).
    """
    shape = (cfg.bq, cfg.bk)
    s = _dot(q, k, _NT) * cfg.scale  # [bq, d] . [bk, d] -> [bq, bk]
    qi = q0 + lax.broadcasted_iota(jnp.int32, shape, 0)
    ki = k0 + lax.broadcasted_iota(jnp.int32, shape, 1)
    bucket = None
    if cfg.relpos is not None:

        def near(s):
            bucket = _relbucket(ki - qi, cfg.relpos)
            bias = jnp.zeros(shape, jnp.float32)
            for i in range(cfg.relpos.num_buckets):  # scalar reads + selects: no gather needed
                bias = jnp.where(bucket == i, read_table(i), bias)
            return (s + bias, bucket) if want_bucket else (s + bias,)

        def far_tile(s):  # one bucket: one scalar read; the bucket output is unused
            s = s + far[1](read_table)
            return (s, jnp.zeros(shape, jnp.int32)) if want_bucket else (s,)

        out = near(s) if far is None else lax.cond(far[0], far_tile, near, s)
        s, bucket = out[0], (out[1] if want_bucket else None)
    mask = (qseg == kseg) & (kseg > 0)  # [bq, 1] vs [1, bk] -> [bq, bk]
    if cfg.causal:
        mask = mask & (ki <= qi)
    return jnp.where(mask, s, _MASKED), mask, bucket


def _k_range(cfg: _Cfg, qb):
    """Key blocks q-block ``qb`` can see: all, or those starting at or before its last row."""
    if not cfg.causal:
        return 0, cfg.nk
    last = (qb + 1) * cfg.bq - 1  # last query index of the block
    return 0, jnp.minimum(cfg.nk, lax.div(last, cfg.bk) + 1)


def _q_range(cfg: _Cfg, kb):
    """Query blocks that can see k-block ``kb``: all, or those ending at or after its start."""
    if not cfg.causal:
        return 0, cfg.nq
    return lax.div(kb * cfg.bk, cfg.bq), cfg.nq


def _table_reader(cfg: _Cfg, t_ref, head):
    """Scalar reads of table[head, i]: TPU gets the whole table flat in SMEM, GPU its row."""
    if t_ref is None:
        return None
    if cfg.backend == "tpu":
        return lambda i: t_ref[head * cfg.nbp + i]
    return lambda i: t_ref[i]


# ----------------------------------------------------------------------------- kernels


def _fwd_kernel(*refs, cfg: _Cfg):
    """Grid (b, h, q-block): online softmax over key blocks for one q tile."""
    if cfg.relpos is None:
        (q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref), t_ref = refs, None
    else:
        q_ref, k_ref, v_ref, qs_ref, ks_ref, t_ref, o_ref, lse_ref = refs
    head, qb = pl.program_id(1), pl.program_id(2)
    read_table = _table_reader(cfg, t_ref, head)
    q, qseg = q_ref[...], qs_ref[...]  # [bq, d], [bq, 1]

    def body(j, carry):
        m, l, acc = carry  # [bq, 1], [bq, 1], [bq, d]
        k0 = pl.multiple_of(j * cfg.bk, cfg.bk)
        k, v = k_ref[pl.ds(k0, cfg.bk), :], v_ref[pl.ds(k0, cfg.bk), :]  # [bk, d]
        s, mask, _ = _tile(cfg, q, k, qseg, ks_ref[j], qb * cfg.bq, k0, read_table,
                           _far(cfg, qb * cfg.bq, k0))
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)  # [bq, bk]; masked -> exactly 0
        alpha = jnp.exp(m - m_new)  # rescales the old statistics to the new max
        l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
        acc = acc * alpha + _dot(p.astype(v.dtype), v, _NN)  # [bq, bk] . [bk, d] -> [bq, d]
        return m_new, l, acc

    bq, d = q.shape
    init = (jnp.full((bq, 1), _MASKED, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
            jnp.zeros((bq, d), jnp.float32))
    m, l, acc = lax.fori_loop(*_k_range(cfg, qb), body, init)
    empty = l == 0.0  # no visible key: output 0 and lse 0 (p is masked to 0 anyway)
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc / l_safe).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, 0.0, m + jnp.log(l_safe))


def _dq_kernel(*refs, cfg: _Cfg):
    """Grid (b, h, q-block): dq over key blocks, plus this tile's table-gradient sums."""
    if cfg.relpos is None:
        (q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, dl_ref, dq_ref), t_ref = refs, None
        dt_ref = None
    else:
        (q_ref, k_ref, v_ref, qs_ref, ks_ref, t_ref, do_ref, lse_ref, dl_ref, dq_ref,
         dt_ref) = refs
    head, qb = pl.program_id(1), pl.program_id(2)
    read_table = _table_reader(cfg, t_ref, head)
    q, qseg, do = q_ref[...], qs_ref[...], do_ref[...]  # [bq, d], [bq, 1], [bq, d]
    lse, delta = lse_ref[...], dl_ref[...]  # [bq, 1] each
    lane = lax.broadcasted_iota(jnp.int32, (1, cfg.nbp), 1)

    def body(j, carry):
        dq, dt = carry  # [bq, d], [1, nbp]
        k0 = pl.multiple_of(j * cfg.bk, cfg.bk)
        k, v = k_ref[pl.ds(k0, cfg.bk), :], v_ref[pl.ds(k0, cfg.bk), :]  # [bk, d]
        far = _far(cfg, qb * cfg.bq, k0)
        s, mask, bucket = _tile(cfg, q, k, qseg, ks_ref[j], qb * cfg.bq, k0, read_table, far,
                                want_bucket=True)
        p = jnp.where(mask, jnp.exp(s - lse), 0.0)  # [bq, bk]
        dp = _dot(do, v, _NT)  # [bq, d] . [bk, d] -> [bq, bk]
        ds = p * (dp - delta)  # [bq, bk] gradient of the biased logits
        dq = dq + cfg.scale * _dot(ds.astype(k.dtype), k, _NN)  # [bq, bk] . [bk, d] -> [bq, d]
        if cfg.relpos is not None:  # bias = table[bucket], so d_table[i] = sum(ds | bucket == i)

            def near(dt):
                for i in range(cfg.relpos.num_buckets):
                    tot = jnp.sum(jnp.where(bucket == i, ds, 0.0), axis=0, keepdims=True)  # [1, bk]
                    tot = jnp.sum(tot, axis=1, keepdims=True)  # [1, 1]: stays a vector for Mosaic
                    dt = dt + jnp.where(lane == i, tot, 0.0)
                return dt

            def far_tile(dt):  # one bucket takes the whole tile's sum
                tot = jnp.sum(jnp.sum(ds, axis=0, keepdims=True), axis=1, keepdims=True)  # [1, 1]
                return dt + far[1](lambda i: jnp.where(lane == i, tot, 0.0))

            dt = near(dt) if far is None else lax.cond(far[0], far_tile, near, dt)
        return dq, dt

    init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros((1, cfg.nbp), jnp.float32))
    dq, dt = lax.fori_loop(*_k_range(cfg, qb), body, init)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    if dt_ref is not None:
        dt_ref[...] = dt


def _dkv_kernel(*refs, cfg: _Cfg):
    """Grid (b, h, k-block): dk and dv over the query blocks that can see this key tile."""
    if cfg.relpos is None:
        (q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, dl_ref, dk_ref,
         dv_ref), t_ref = refs, None
    else:
        (q_ref, k_ref, v_ref, qs_ref, ks_ref, t_ref, do_ref, lse_ref, dl_ref, dk_ref,
         dv_ref) = refs
    head, kb = pl.program_id(1), pl.program_id(2)
    read_table = _table_reader(cfg, t_ref, head)
    k, v, kseg = k_ref[...], v_ref[...], ks_ref[...]  # [bk, d], [bk, d], [1, bk]

    def body(i, carry):
        dk, dv = carry  # [bk, d] each
        q0 = pl.multiple_of(i * cfg.bq, cfg.bq)
        rows = pl.ds(q0, cfg.bq)
        q, do = q_ref[rows, :], do_ref[rows, :]  # [bq, d]
        s, mask, _ = _tile(cfg, q, k, qs_ref[rows, :], kseg, q0, kb * cfg.bk, read_table,
                           _far(cfg, q0, kb * cfg.bk))
        p = jnp.where(mask, jnp.exp(s - lse_ref[rows, :]), 0.0)  # [bq, bk]
        dv = dv + _dot(p.astype(do.dtype), do, _TN)  # [bq, bk]^T . [bq, d] -> [bk, d]
        dp = _dot(do, v, _NT)  # [bq, d] . [bk, d] -> [bq, bk]
        ds = p * (dp - dl_ref[rows, :])  # [bq, bk]
        dk = dk + cfg.scale * _dot(ds.astype(q.dtype), q, _TN)  # [bq, bk]^T . [bq, d] -> [bk, d]
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(*_q_range(cfg, kb), body, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- pallas calls


def _call(kernel, cfg: _Cfg, grid, in_specs, out_specs, out_shape, *args):
    """pallas_call with per-backend compiler params and interpret mode."""
    if cfg.backend == "tpu":
        params = pltpu.CompilerParams(dimension_semantics=("parallel",) * len(grid))
        interpret = pltpu.InterpretParams() if cfg.interpret else False
    else:
        params = pltriton.CompilerParams(num_warps=4, num_stages=2)
        interpret = cfg.interpret
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          out_shape=out_shape, compiler_params=params,
                          interpret=interpret)(*args)


def _common_specs(cfg: _Cfg, table, d, by_q: bool):
    """BlockSpecs of (q, k, v, q segments, kv segments[, table]) for a grid (b, h, blk).

    ``by_q``: the grid walks q blocks (forward, dq) and sees whole K/V; otherwise it walks
    key blocks (dk/dv) and sees whole Q.
    """
    pq, pk = cfg.nq * cfg.bq, cfg.nk * cfg.bk
    lq_blk, lk_blk = (cfg.bq, pk) if by_q else (pq, cfg.bk)
    qi, ki = (lambda i: i, lambda i: 0) if by_q else (lambda i: 0, lambda i: i)
    specs = [
        pl.BlockSpec((None, None, lq_blk, d), lambda b, h, i: (b, h, qi(i), 0)),  # q
        pl.BlockSpec((None, None, lk_blk, d), lambda b, h, i: (b, h, ki(i), 0)),  # k
        pl.BlockSpec((None, None, lk_blk, d), lambda b, h, i: (b, h, ki(i), 0)),  # v
        # Segments as [b, pq, 1] / [b, nk, 1, bk]: legal Mosaic tiles that broadcast to
        # [bq, bk]; key blocks are picked on a leading axis, as Mosaic cannot slice lanes
        # at offsets it cannot prove to be multiples of 128.
        pl.BlockSpec((None, lq_blk, 1), lambda b, h, i: (b, qi(i), 0)),
        pl.BlockSpec((None, cfg.nk if by_q else None, 1, cfg.bk),  # all blocks, or block i
                     lambda b, h, i: (b, ki(i), 0, 0)),
    ]
    if table is not None:
        if cfg.backend == "tpu":  # whole flat table in SMEM for scalar reads
            specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
        else:  # this head's row of the [h, nbp] table
            specs.append(pl.BlockSpec((None, table.shape[1]), lambda b, h, i: (h, 0)))
    return specs


def _row_spec(cfg: _Cfg, width, by_q=True):
    """BlockSpec of a per-query [b, h, pq, width] array (o, do, lse, delta)."""
    if by_q:
        return pl.BlockSpec((None, None, cfg.bq, width), lambda b, h, i: (b, h, i, 0))
    return pl.BlockSpec((None, None, cfg.nq * cfg.bq, width), lambda b, h, i: (b, h, 0, 0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, table, qseg, kseg, cfg):
    return _flash_fwd(q, k, v, table, qseg, kseg, cfg)[0]


def _flash_fwd(q, k, v, table, qseg, kseg, cfg: _Cfg):
    """q [b, h, pq, d], k/v [b, h, pk, d], qseg [b, pq, 1], kseg [b, nk, 1, bk]."""
    b, h, pq, d = q.shape
    args = (q, k, v, qseg, kseg) + (() if table is None else (table,))
    out, lse = _call(
        functools.partial(_fwd_kernel, cfg=cfg), cfg, (b, h, cfg.nq),
        _common_specs(cfg, table, d, by_q=True),
        [_row_spec(cfg, d), _row_spec(cfg, 1)],
        [jax.ShapeDtypeStruct(q.shape, q.dtype),
         jax.ShapeDtypeStruct((b, h, pq, 1), jnp.float32)], *args)
    return out, (q, k, v, table, qseg, kseg, out, lse)


def _flash_bwd(cfg: _Cfg, res, do):
    q, k, v, table, qseg, kseg, out, lse = res
    b, h, pq, d = q.shape
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1,
                    keepdims=True)  # [b, h, pq, 1] rowsum(dO * O)
    args = (q, k, v, qseg, kseg) + (() if table is None else (table,)) + (do, lse, delta)

    out_specs = [_row_spec(cfg, d)]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if table is not None:  # per-(b, h, q-block) partial table gradients
        out_specs.append(pl.BlockSpec((None, None, None, 1, cfg.nbp),
                                      lambda b_, h_, i: (b_, h_, i, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((b, h, cfg.nq, 1, cfg.nbp), jnp.float32))
    dq_out = _call(functools.partial(_dq_kernel, cfg=cfg), cfg, (b, h, cfg.nq),
                   _common_specs(cfg, table, d, by_q=True) + [_row_spec(cfg, d),
                                                              _row_spec(cfg, 1),
                                                              _row_spec(cfg, 1)],
                   out_specs, out_shape, *args)
    dq = dq_out[0]
    dtable = None
    if table is not None:
        dtable = jnp.sum(dq_out[1], axis=(0, 2, 3))  # [h, nbp]
        dtable = dtable.reshape(table.shape).astype(table.dtype)

    kv_spec = pl.BlockSpec((None, None, cfg.bk, d), lambda b_, h_, j: (b_, h_, j, 0))
    dk, dv = _call(functools.partial(_dkv_kernel, cfg=cfg), cfg, (b, h, cfg.nk),
                   _common_specs(cfg, table, d, by_q=False) + [_row_spec(cfg, d, False),
                                                               _row_spec(cfg, 1, False),
                                                               _row_spec(cfg, 1, False)],
                   [kv_spec, kv_spec],
                   [jax.ShapeDtypeStruct(k.shape, k.dtype),
                    jax.ShapeDtypeStruct(v.shape, v.dtype)], *args)
    return dq, dk, dv, dtable, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- public API


def _resolve_backend(backend, interpret):
    """Picks the kernel flavour (default: the platform traced for, which is the
    compile's target); the CPU default needs interpret mode."""
    platform = target_platform()
    if backend is None:
        backend = {"gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}.get(platform)
        if backend is None:
            if not interpret:
                raise ValueError(f"flash_attention has no {platform!r} kernel; pass "
                                 "interpret=True (and optionally backend='gpu'|'tpu') to "
                                 "run the Pallas kernels in interpret mode")
            backend = "gpu"
    if backend not in ("gpu", "tpu"):
        raise ValueError(f"backend must be 'gpu' or 'tpu', got {backend!r}")
    # An explicit backend without interpret on CPU is allowed: it is how ahead-of-time
    # lowering for a GPU/TPU target works (running it eagerly fails inside Pallas).
    return backend, bool(interpret)


# Default tiles per kernel flavour. Triton keeps a tile's logits, probabilities, mask and
# buckets in registers (4 warps here), so 64x64 (jax's own Pallas GPU attention uses 128x128
# forward, 32x32 backward); a 512x512 tile would far exceed the register file. Mosaic
# tiles live in VMEM, where 512x512 fits and amortises the per-step overhead.
_DEFAULT_BLOCKS = {"gpu": BlockSizes(64, 64), "tpu": BlockSizes(512, 512)}


def default_block_sizes(backend: str) -> BlockSizes:
    """The tiles ``flash_attention`` uses when none are given: 64x64 for ``backend="gpu"``
    (Triton), 512x512 for ``"tpu"`` (Mosaic). Not tuned on hardware."""
    if backend not in _DEFAULT_BLOCKS:
        raise ValueError(f"backend must be 'gpu' or 'tpu', got {backend!r}")
    return _DEFAULT_BLOCKS[backend]


def _block_len(block, length, backend, name):
    """Clamps a block to the (rounded-up) length, checking per-backend tile legality."""
    if backend == "gpu":  # Triton: power-of-two tiles, tl.dot needs >= 16
        if block < 16 or block & (block - 1):
            raise ValueError(f"BlockSizes.{name} must be a power of two >= 16 for "
                             f"backend='gpu', got {block}")
        return min(block, max(16, pl.next_power_of_2(length)))
    if block % 8:  # Mosaic: sublane tiles of 8
        raise ValueError(f"BlockSizes.{name} must be a multiple of 8 for backend='tpu', "
                         f"got {block}")
    return min(block, -(-length // 8) * 8)


def flash_attention(q: Array, k: Array, v: Array, *, bias_table: Array | None = None,
                    relpos: RelPos | None = None, q_segment_ids: Array | None = None,
                    kv_segment_ids: Array | None = None, causal: bool = False,
                    scale: float = 1.0, block_sizes: BlockSizes | None = None,
                    backend: str | None = None, interpret: bool | None = None) -> Array:
    """Flash attention (Pallas) with an in-kernel T5 relative position bias.

    Args:
        q: [b, q_len, h, d] queries.
        k: [b, k_len, h, d] keys.
        v: [b, k_len, h, d] values.
        bias_table: [relpos.num_buckets, h] learned bias table (differentiable), or None.
        relpos: bucketing of (key_index - query_index); required iff ``bias_table`` is given.
        q_segment_ids: [b, q_len] int segment ids (0 = padding); default all ones.
        kv_segment_ids: [b, k_len] int segment ids (0 = padding); default all ones.
        causal: mask keys whose index exceeds the query's index.
        scale: multiplies q.k before the bias (1.0 for T5).
        block_sizes: tiles; GPU needs powers of two >= 16, TPU multiples of 8 (and, on real
            TPUs, block_k a multiple of 128 unless it covers the whole key length). Default
            ``default_block_sizes(backend)``: 64x64 on GPU, 512x512 on TPU.
        backend: "gpu" (Triton) or "tpu" (Mosaic); default from
            :func:`jaxmt.kernels.common.target_platform` (the compile's target).
        interpret: run the kernels in Pallas interpret mode (the only option on CPU).

    Returns:
        [b, q_len, h, d] attention output in q's dtype; rows without any visible key are 0.
    """
    validate(q, k, v, bias_table, relpos, q_segment_ids, kv_segment_ids)
    backend, interpret = _resolve_backend(backend, interpret)
    block_sizes = block_sizes or default_block_sizes(backend)
    if not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"block_sizes must be a BlockSizes, got {type(block_sizes).__name__}")
    qseg, kseg, _, _ = fill_defaults(q, k, q_segment_ids, kv_segment_ids)
    b, lq, h, d = q.shape
    lk = k.shape[1]
    bq = _block_len(block_sizes.block_q, lq, backend, "block_q")
    bk = _block_len(block_sizes.block_k, lk, backend, "block_k")
    pq, pk = -(-lq // bq) * bq, -(-lk // bk) * bk
    # Triton tiles need a power-of-two head dim; zero columns change neither q.k nor p.v.
    dp = max(16, pl.next_power_of_2(d)) if backend == "gpu" else d

    def prep(x, n):  # [b, len, h, d] -> [b, h, n, dp], zero-padded
        x = jnp.transpose(pad_axis1(x, 0, n), (0, 2, 1, 3))
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, dp - d))) if dp != d else x

    table, nbp = None, 1
    if relpos is not None:
        nbp = pl.next_power_of_2(relpos.num_buckets)
        table = jnp.pad(bias_table.astype(jnp.float32).T,
                        ((0, 0), (0, nbp - relpos.num_buckets)))  # [h, nbp]
        if backend == "tpu":
            table = table.reshape(h * nbp)  # 1-D: scalar SMEM reads without 2-D SMEM padding
    nq, nk = pq // bq, pk // bk
    cfg = _Cfg(relpos, bool(causal), float(scale), bq, bk, nq, nk, nbp,
               far_config(relpos, bool(causal), bq, bk, nq, nk), backend, interpret)
    out = _flash(prep(q, pq), prep(k, pk), prep(v, pk), table,
                 pad_axis1(qseg, 0, pq)[:, :, None],  # [b, pq, 1]; padded queries: segment 0
                 pad_axis1(kseg, 0, pk).reshape(b, pk // bk, 1, bk), cfg)  # padded keys: segment 0
    return jnp.transpose(out[..., :d], (0, 2, 1, 3))[:, :lq].astype(q.dtype)
