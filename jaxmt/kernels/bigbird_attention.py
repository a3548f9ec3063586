"""BigBird block-sparse encoder self-attention, in pure JAX.

Pattern (on blocks of ``block_size`` tokens): query block ``i`` sees the key blocks of
its sliding window (``window_blocks = 3`` -> i-1, i, i+1), the first ``global_blocks``
blocks (global keys) and ``random_blocks`` further blocks drawn with numpy from ``seed``
at trace time (static, deterministic, excluding window and global blocks). The global
query blocks see every key block. Segment ids apply on top; there is no causal mode
(BigBird here is an encoder self-attention). ``bigbird_mask`` builds the exact
[length, length] pattern for ``reference_attention``.

Memory: each query block gathers only its ``n_sel = window + global + random`` selected
key blocks ([nblocks, n_sel * blk] keys), so logits and the relative bias are
[b, h, nblocks, blk, n_sel * blk]: O(length * blk * n_sel), linear in length. The global
query rows are computed separately as full [global_blocks * blk, length] rows. Plain
autodiff keeps the backward linear too (the static gather's transpose is a scatter-add).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxmt.kernels.common import (RelPos, bias_of, check_int, fill_defaults, global_rows,
                                  masked_softmax, pad_axis1, validate)

Array = jax.Array


def _check_pattern(block_size, window_blocks, global_blocks, random_blocks, seed):
    check_int("block_size", block_size, 1)
    if check_int("window_blocks", window_blocks, 1) % 2 == 0:
        raise ValueError(f"window_blocks must be odd (centred window), got {window_blocks}")
    check_int("global_blocks", global_blocks, 0)
    check_int("random_blocks", random_blocks, 0)
    check_int("seed", seed, 0)


def block_selection(n_blocks: int, window_blocks: int, global_blocks: int,
                    random_blocks: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Static key-block choice of every query block.

    Args:
        n_blocks: number of blocks in the (padded) sequence.
        window_blocks: odd sliding-window width in blocks.
        global_blocks: leading global blocks.
        random_blocks: random extra key blocks per (non-global) query block.
        seed: numpy RNG seed.

    Returns:
        (idx, valid): int [n_blocks, n_sel] key-block indices and bool [n_blocks, n_sel]
        marking real (non-filler) entries; no block is selected twice in a row.
        Rows of global query blocks are left empty: they see everything anyway.
    """
    rng = np.random.default_rng(seed)
    half = window_blocks // 2
    rows = []
    for i in range(n_blocks):
        if i < global_blocks:
            rows.append([])
            continue
        base = [j for j in range(i - half, i + half + 1) if 0 <= j < n_blocks]
        base += [j for j in range(min(global_blocks, n_blocks)) if j not in base]
        rest = np.array([j for j in range(n_blocks) if j not in base], np.int64)
        n_rand = min(random_blocks, rest.size)
        rand = sorted(rng.choice(rest, n_rand, replace=False).tolist()) if n_rand else []
        rows.append(base + rand)
    n_sel = max(1, max(len(r) for r in rows))
    idx = np.zeros((n_blocks, n_sel), np.int32)
    valid = np.zeros((n_blocks, n_sel), bool)
    for i, row in enumerate(rows):
        idx[i, :len(row)] = row
        valid[i, :len(row)] = True
    return idx, valid


def bigbird_mask(length: int, block_size: int = 64, window_blocks: int = 3,
                 global_blocks: int = 1, random_blocks: int = 2, seed: int = 0) -> np.ndarray:
    """Exact boolean [length, length] pattern of ``bigbird_attention`` (segments aside).

    Args:
        length: sequence length (the last block may be partial).
        block_size, window_blocks, global_blocks, random_blocks, seed: as in
            ``bigbird_attention``.

    Returns:
        np.ndarray bool [length, length]; True where query (row) may see key (column).
    """
    _check_pattern(block_size, window_blocks, global_blocks, random_blocks, seed)
    nb = -(-length // block_size)
    idx, valid = block_selection(nb, window_blocks, global_blocks, random_blocks, seed)
    blocks = np.zeros((nb, nb), bool)
    rows = np.broadcast_to(np.arange(nb)[:, None], idx.shape)
    blocks[rows[valid], idx[valid]] = True
    blocks[:global_blocks] = True  # global query blocks see every key block
    full = np.repeat(np.repeat(blocks, block_size, axis=0), block_size, axis=1)
    return full[:length, :length]


def bigbird_attention(q: Array, k: Array, v: Array, *, bias_table: Array | None = None,
                      relpos: RelPos | None = None, q_segment_ids: Array | None = None,
                      kv_segment_ids: Array | None = None, scale: float = 1.0,
                      block_size: int = 64, window_blocks: int = 3, global_blocks: int = 1,
                      random_blocks: int = 2, seed: int = 0, causal: bool = False) -> Array:
    """BigBird (window + global + random blocks) encoder self-attention, linear memory.

    Args:
        q: [b, len, h, d] queries.
        k: [b, len, h, d] keys (self-attention: same length as q).
        v: [b, len, h, d] values.
        bias_table: [relpos.num_buckets, h] T5 bias table (differentiable), or None.
        relpos: bucketing of (key_pos - query_pos); required iff ``bias_table`` is given.
        q_segment_ids: [b, len] int segment ids (0 = padding); default all ones.
        kv_segment_ids: [b, len] int segment ids (0 = padding); default all ones.
        scale: multiplies q.k before the bias (1.0 for T5).
        block_size: tokens per block; the length is padded to a multiple internally.
        window_blocks: odd sliding-window width in blocks (3 -> i-1, i, i+1).
        global_blocks: leading blocks that see and are seen by every block.
        random_blocks: random extra key blocks per query block (static, from ``seed``).
        seed: numpy seed of the random block choice.
        causal: must be False; BigBird here is for encoder self-attention.

    Returns:
        [b, len, h, d] in q's dtype; rows without any visible key are 0.
    """
    if causal:
        raise ValueError("bigbird_attention is for encoder self-attention: causal=True is "
                         "not supported")
    validate(q, k, v, bias_table, relpos, q_segment_ids, kv_segment_ids)
    b, length, h, d = q.shape
    if k.shape[1] != length:
        raise ValueError(f"bigbird_attention is for encoder self-attention: q_len ({length}) "
                         f"must equal k_len ({k.shape[1]})")
    _check_pattern(block_size, window_blocks, global_blocks, random_blocks, seed)
    qseg, kseg, _, _ = fill_defaults(q, k, q_segment_ids, kv_segment_ids)
    table = None if bias_table is None else bias_table.astype(jnp.float32)
    f32, blk = jnp.float32, block_size

    nb = -(-length // blk)
    idx, valid = block_selection(nb, window_blocks, global_blocks, random_blocks, seed)
    n_sel = idx.shape[1]
    width = n_sel * blk
    qb = pad_axis1(q, 0, nb * blk).reshape(b, nb, blk, h, d)
    qs = pad_axis1(qseg, 0, nb * blk).reshape(b, nb, blk)

    def gather(x):  # [b, len, ...] -> [b, nb, width, ...]; padded keys have segment 0
        xb = pad_axis1(x, 0, nb * blk).reshape(b, nb, blk, *x.shape[2:])
        return xb[:, idx].reshape(b, nb, width, *x.shape[2:])  # [b, nb, n_sel, blk, ...]

    kg, vg, ksg = gather(k), gather(v), gather(kseg)
    s = jnp.einsum("bnqhd,bnkhd->bhnqk", qb, kg,
                   preferred_element_type=f32) * scale  # [b, h, nb, blk, width]
    sel_ok = np.repeat(valid, blk, axis=1)  # [nb, width]; filler slots are masked
    mask = ((qs[..., None] == ksg[:, :, None, :]) & (ksg[:, :, None, :] > 0)
            & sel_ok[None, :, None, :])  # [b, nb, blk, width]
    key_idx = (idx[:, :, None] * blk + np.arange(blk)).reshape(nb, width)  # [nb, width]
    q_idx = np.arange(nb * blk).reshape(nb, blk)  # [nb, blk]
    bias = bias_of(table, relpos, key_idx[:, None, :] - q_idx[:, :, None])  # [nb, blk, width, h]
    if bias is not None:
        s = s + jnp.transpose(bias, (3, 0, 1, 2))[None]  # [1, h, nb, blk, width]
    p = masked_softmax(s, mask[:, None])  # [b, h, nb, blk, width]
    out = jnp.einsum("bhnqk,bnkhd->bnqhd", p, vg.astype(f32))  # [b, nb, blk, h, d]
    out = out.reshape(b, nb * blk, h, d)[:, :length].astype(q.dtype)

    n_glob = min(global_blocks * blk, length)
    if not n_glob:
        return out
    # Global query blocks see every key: full rows, replacing their (empty) block rows.
    out_g = global_rows(q, k, v, bias_table, relpos, qseg, kseg, n_glob, False, scale)
    return jnp.concatenate([out_g, out[:, n_glob:]], axis=1)
