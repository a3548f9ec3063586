"""Longformer-style local (sliding-window) attention with global tokens, in pure JAX.

Pattern: query ``i`` sees key ``j`` when ``|i - j| <= window`` (or ``0 <= i - j <= window``
if ``causal``), or when either index is one of the first ``global_tokens`` positions
(global tokens attend everywhere and are attended by everyone). Segment ids and the
causal rule from ``jaxmt.kernels.common`` apply on top.
``local_mask`` builds the exact [length, length] pattern for ``reference_attention``.

Memory: the sequence is split into blocks of ``block_size >= window``; every key a
non-global query can see in the band lies in its own or a neighbouring block, so each
query block scores a stacked [3 * blk] (causal: [2 * blk]) key strip plus ``global_tokens``
extra columns for the global keys. Logits are [b, h, nblocks, blk, 3 * blk + G]: linear
in length. Since positions are ``arange``, the band's relative offsets do not depend on
the block, so its bias is a single [h, blk, 3 * blk] tile. The global query rows are
computed separately as full [G, length] rows. Plain autodiff keeps the backward linear.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxmt.kernels.common import (RelPos, bias_of, check_int, fill_defaults, global_rows,
                                  masked_softmax, pad_axis1, validate)

Array = jax.Array


# ----------------------------------------------------------------------------- local


def local_mask(length: int, window: int, global_tokens: int = 0,
               causal: bool = False) -> np.ndarray:
    """Exact boolean [length, length] pattern of ``local_attention`` (segments aside).

    Args:
        length: sequence length.
        window: maximal |query - key| distance in the band.
        global_tokens: the first positions that attend to / are attended by everything.
        causal: keep only keys at or before the query.

    Returns:
        np.ndarray bool [length, length]; True where query (row) may see key (column).
    """
    i = np.arange(length)[:, None]
    j = np.arange(length)[None, :]
    dist = i - j
    band = (dist >= 0) & (dist <= window) if causal else np.abs(dist) <= window
    mask = band | (i < global_tokens) | (j < global_tokens)
    return mask & (dist >= 0) if causal else mask


def local_attention(q: Array, k: Array, v: Array, *, bias_table: Array | None = None,
                    relpos: RelPos | None = None, q_segment_ids: Array | None = None,
                    kv_segment_ids: Array | None = None, causal: bool = False,
                    scale: float = 1.0, window: int = 128, global_tokens: int = 0,
                    block_size: int | None = None) -> Array:
    """Sliding-window self-attention with global tokens and O(length * window) memory.

    Args:
        q: [b, len, h, d] queries.
        k: [b, len, h, d] keys (self-attention: same length as q).
        v: [b, len, h, d] values.
        bias_table: [relpos.num_buckets, h] T5 bias table (differentiable), or None.
        relpos: bucketing of (key_pos - query_pos); required iff ``bias_table`` is given.
        q_segment_ids: [b, len] int segment ids (0 = padding); default all ones.
        kv_segment_ids: [b, len] int segment ids (0 = padding); default all ones.
        causal: keys must not come after the query.
        scale: multiplies q.k before the bias (1.0 for T5).
        window: band half-width; query i sees key j if |i - j| <= window.
        global_tokens: number of leading global positions.
        block_size: internal block size (>= window after clamping to the length);
            default ``window`` rounded up to a multiple of 8.

    Returns:
        [b, len, h, d] in q's dtype; rows without any visible key are 0.
    """
    validate(q, k, v, bias_table, relpos, q_segment_ids, kv_segment_ids)
    b, length, h, d = q.shape
    if k.shape[1] != length:
        raise ValueError(f"local_attention is self-attention: q_len ({length}) must equal "
                         f"k_len ({k.shape[1]})")
    window = min(check_int("window", window, 0), max(length - 1, 0))  # wider = full
    n_glob = min(check_int("global_tokens", global_tokens, 0), length)
    if block_size is None:
        blk = -(-max(window, 1) // 8) * 8
    else:
        blk = check_int("block_size", block_size, 1)
        if blk < window:
            raise ValueError(f"block_size ({blk}) must be >= window ({window}) so the band "
                             "fits in neighbouring blocks")
    qseg, kseg, _, _ = fill_defaults(q, k, q_segment_ids, kv_segment_ids)
    table = None if bias_table is None else bias_table.astype(jnp.float32)
    f32 = jnp.float32

    nb = -(-length // blk)
    n_strip = 2 if causal else 3  # key blocks per query block: (n-1, n[, n+1])
    width = n_strip * blk
    qb = pad_axis1(q, 0, nb * blk).reshape(b, nb, blk, h, d)
    qs = pad_axis1(qseg, 0, nb * blk).reshape(b, nb, blk)

    # One zero-segment block on each side, so edge blocks gather masked keys.
    def strips(x):  # [b, len, ...] -> [b, nb, width, ...]
        xb = pad_axis1(x, blk, (nb + 2) * blk).reshape(b, nb + 2, blk, *x.shape[2:])
        return jnp.concatenate([xb[:, o:o + nb] for o in range(n_strip)], axis=2)

    kg, vg, ksg = strips(k), strips(v), strips(kseg)

    # Band scores. Query i = n*blk + r, key j = (n-1)*blk + c: i - j = blk + r - c.
    s = jnp.einsum("bnqhd,bnkhd->bhnqk", qb, kg,
                   preferred_element_type=f32) * scale  # [b, h, nb, blk, width]
    dist = blk + np.arange(blk)[:, None] - np.arange(width)[None, :]  # [blk, width]
    band = (dist >= 0) & (dist <= window) if causal else np.abs(dist) <= window
    key_idx = (np.arange(nb)[:, None] - 1) * blk + np.arange(width)[None, :]  # [nb, width]
    band = band[None] & (key_idx >= n_glob)[:, None, :]  # global keys go in their own columns
    mask = ((qs[..., None] == ksg[:, :, None, :]) & (ksg[:, :, None, :] > 0)
            & band[None])  # [b, nb, blk, width]
    bias = bias_of(table, relpos, -dist)  # [blk, width, h], the same for every block
    if bias is not None:
        s = s + jnp.transpose(bias, (2, 0, 1))[None, :, None]  # [1, h, 1, blk, width]

    if n_glob:  # every query also scores the global keys, in G extra columns
        k_glob, v_glob, ks_glob = k[:, :n_glob], v[:, :n_glob], kseg[:, :n_glob]
        sg = jnp.einsum("bnqhd,bkhd->bhnqk", qb, k_glob,
                        preferred_element_type=f32) * scale  # [b, h, nb, blk, G]
        q_idx = np.arange(nb * blk).reshape(nb, blk)
        rel = np.arange(n_glob)[None, None, :] - q_idx[..., None]  # [nb, blk, G]
        mg = (qs[..., None] == ks_glob[:, None, None, :]) & (ks_glob[:, None, None, :] > 0)
        if causal:
            mg = mg & (rel <= 0)[None]  # [b, nb, blk, G]
        bias_g = bias_of(table, relpos, rel)  # [nb, blk, G, h]
        if bias_g is not None:
            sg = sg + jnp.transpose(bias_g, (3, 0, 1, 2))[None]  # [1, h, nb, blk, G]
        s = jnp.concatenate([s, sg], axis=-1)
        mask = jnp.concatenate([mask, mg], axis=-1)

    p = masked_softmax(s, mask[:, None])  # [b, h, nb, blk, width (+ G)]
    out = jnp.einsum("bhnqk,bnkhd->bnqhd", p[..., :width],
                     vg.astype(f32))  # [b, nb, blk, h, d]
    if n_glob:
        out = out + jnp.einsum("bhnqk,bkhd->bnqhd", p[..., width:],
                               v_glob.astype(f32))  # [b, nb, blk, h, d]
    out = out.reshape(b, nb * blk, h, d)[:, :length].astype(q.dtype)
    if not n_glob:
        return out
    # Global queries see every key: full rows, replacing their (partial) band rows.
    out_g = global_rows(q, k, v, bias_table, relpos, qseg, kseg, n_glob, causal, scale)
    return jnp.concatenate([out_g, out[:, n_glob:]], axis=1)
