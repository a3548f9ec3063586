"""Performer (FAVOR+) linear attention with packed segments, causal mode and an exact T5 bias.

FAVOR+ (Choromanski et al., 2021) replaces the softmax kernel exp(s * q.k) by an unbiased
estimate phi(q).phi(k) with positive random features

    phi(x) = exp(w_r . x' - |x'|^2 / 2 - stabiliser) / sqrt(m),   r = 1..m,   x' = sqrt(s) x,

where the rows w_r are orthogonal Gaussian blocks rescaled by chi-distributed norms (fixed
from ``seed``; never redrawn). Attention becomes out_i = sum_j A_ij v_j / sum_j A_ij with
A_ij = w_ij phi(q_i).phi(k_j) over the visible pairs, where w_ij = exp(T5 bias_ij) (1 when
there is no bias). Because A factorises, sums over keys can be carried as the states
S = sum_j phi(k_j) v_j^T [m, d] and z = sum_j phi(k_j) [m], so no [q, k] matrix is built.
The stabilisers are constants per query row (queries) or per (batch, head) over all keys
(keys), so they cancel between numerator and denominator, also across segments. In causal
mode the key stabiliser still spans the whole row: being one constant, it changes no output
beyond float rounding (and no gradient: it is under stop_gradient).

Decoding. ``performer_cached`` is the same quadratic form for a decode step: the new query
against the KV cache with a dense additive bias (causal mask, window and T5 bias together),
with the same random features and feature map; its key stabiliser spans the keys the step
sees. A cached greedy decoder built on it reproduces the teacher-forced causal
``performer_attention`` to float rounding, at O(cache length x features) per step.

Segment-reset scan. Lengths are split into chunks of ``chunk_size``; a ``lax.scan`` over the
chunks carries (S, z, seg): the sums over the run of the last non-padding key segment seen so
far. A query uses the carried state only if its segment equals ``seg``. After a chunk, the new
``seg`` is the chunk's last non-padding segment; the state is kept if ``seg`` did not change
(else reset to zero) and the chunk's keys of that segment are added. For contiguous runs (what
packing produces) this gives each query exactly the keys of its segment in earlier chunks.
Non-causal attention adds the mirror-image suffix pass: the same scan on position-reversed
rows, stacked on the batch axis so one scan serves both directions; causal attention only
uses the prefix pass. Keys in the query's own chunk are handled exactly by a masked
chunk x chunk product. Because the states follow key runs by index, query and key segment
runs must be aligned by index (self attention; cross attention with one segment + padding).
A segment id reused in two separate runs would only see its latest run (the contract, and
``performer_reference``, let it see both).

Band/far decomposition of the T5 bias (no public Performer keeps it). T5 buckets saturate:
beyond some offset W (at most ``max_distance``) every past key shares one bucket and every
future key shares one bucket, so w_ij = c_past or c_future there. Hence

    A_ij = c_dir(i, j) K_ij + (w_ij - c_dir(i, j)) K_ij,    K_ij = phi(q_i).phi(k_j),

where the first term is the scanned prefix (scaled by c_past) / suffix (scaled by c_future)
state, and the correction vanishes exactly for |i - j| >= W (same bucket, same table entry).
The correction is therefore a block-banded quadratic: each query chunk against its neighbour
key chunks within ceil((W - 1) / chunk_size) chunks, using the true buckets. The own chunk uses
the true w_ij directly. Cost and memory stay linear in length; the result equals the quadratic
``performer_reference`` up to float rounding. W is measured from ``relative_bucket`` itself,
not assumed, so float rounding in the log bucketing cannot break the identity.

Cross attention (q_len != k_len) is handled by padding both sides to a common length, so
queries and keys share chunk indices (positions are ``arange``, as in jaxmt).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxmt.kernels.common import RelPos, bias_of, fill_defaults, saturation, validate

Array = jax.Array
_F32 = jnp.float32
MASKED_BELOW = -1e9  # performer_cached: bias entries at or below this are masked keys


# ----------------------------------------------------------------------------- features


@functools.lru_cache(maxsize=64)
def _random_features_np(head_dim: int, num_features: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    blocks = []
    for _ in range(-(-num_features // head_dim)):
        q, _ = np.linalg.qr(rng.standard_normal((head_dim, head_dim)))
        blocks.append(q.T)  # rows orthonormal within a block
    rows = np.concatenate(blocks)[:num_features]
    # chi(head_dim) norms, so each row is marginally N(0, I) as the estimator requires
    norms = np.linalg.norm(rng.standard_normal((num_features, head_dim)), axis=-1)
    return (rows * norms[:, None]).astype(np.float32)


def random_features(head_dim: int, num_features: int, seed: int = 0) -> Array:
    """Orthogonal random features [num_features, head_dim], deterministic in ``seed``.

    Blocks of head_dim mutually orthogonal directions (QR of a Gaussian matrix), each row
    rescaled by the norm of an independent Gaussian vector. Drawn with numpy, so the same
    seed gives the same matrix on every backend.
    """
    for name, val in (("head_dim", head_dim), ("num_features", num_features)):
        if not isinstance(val, (int, np.integer)) or isinstance(val, bool) or val <= 0:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    return jnp.asarray(_random_features_np(int(head_dim), int(num_features), int(seed)))


def _feature_map(x: Array, proj: Array, valid: Array | None) -> Array:
    """phi(x) [b, len, h, m] of pre-scaled x [b, len, h, d].

    Queries (``valid`` None) subtract a per-row max; keys subtract one max per (batch, head)
    over the valid keys ([b, len] bool). Both are constants wherever they act, so they cancel
    in out = num / den; stop_gradient keeps them out of autodiff (their true gradient is 0).
    """
    wx = jnp.einsum("blhd,md->blhm", x, proj)  # [b, len, h, m]
    expo = wx - 0.5 * jnp.sum(x * x, -1, keepdims=True)  # [b, len, h, m]
    if valid is None:
        stab = jnp.max(expo, axis=-1, keepdims=True)  # [b, len, h, 1]
    else:
        masked = jnp.where(valid[:, :, None, None], expo, -jnp.inf)
        stab = jnp.max(masked, axis=(1, 3), keepdims=True)  # [b, 1, h, 1]
        stab = jnp.where(jnp.isfinite(stab), stab, 0.0)  # no valid key: anything finite
    return jnp.exp(expo - jax.lax.stop_gradient(stab)) / math.sqrt(proj.shape[0])


def _features(q, k, kvalid, scale, num_features, seed):
    """phi(q), phi(k) [b, len, h, m] in float32 approximating exp(scale * q.k); ``kvalid``
    [b, k_len] bool marks the keys the key stabiliser is taken over."""
    proj = random_features(q.shape[-1], num_features, seed)
    root = math.sqrt(abs(scale))
    xq = q.astype(_F32) * root
    xk = k.astype(_F32) * (root if scale >= 0 else -root)  # exp(-|s| q.k) = exp(q'.(-k'))
    return _feature_map(xq, proj, None), _feature_map(xk, proj, kvalid)


# ----------------------------------------------------------------------------- reference


def _check_args(q, k, v, bias_table, relpos, q_segment_ids, kv_segment_ids, num_features,
                chunk_size, seed):
    validate(q, k, v, bias_table, relpos, q_segment_ids, kv_segment_ids)
    for name, val in (("num_features", num_features), ("chunk_size", chunk_size)):
        if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")


def performer_reference(q: Array, k: Array, v: Array, *, bias_table: Array | None = None,
                        relpos: RelPos | None = None, q_segment_ids: Array | None = None,
                        kv_segment_ids: Array | None = None, causal: bool = False,
                        scale: float = 1.0, num_features: int = 256, seed: int = 0,
                        chunk_size: int = 128) -> Array:
    """The exact quadratic form of the same approximation (oracle; materialises [b, h, q, k]).

    Args and returns as ``performer_attention`` (``chunk_size`` is accepted and ignored).
    """
    _check_args(q, k, v, bias_table, relpos, q_segment_ids, kv_segment_ids, num_features,
                chunk_size, seed)
    qseg, kseg, _, _ = fill_defaults(q, k, q_segment_ids, kv_segment_ids)
    fq, fk = _features(q, k, kseg > 0, scale, num_features, seed)
    a = jnp.einsum("bqhm,bkhm->bhqk", fq, fk)  # [b, h, q, k]
    qi, kj = jnp.arange(q.shape[1]), jnp.arange(k.shape[1])
    if relpos is not None:
        bias = bias_of(bias_table.astype(_F32), relpos, kj[None, :] - qi[:, None])  # [q, k, h]
        a = a * jnp.exp(jnp.transpose(bias, (2, 0, 1)))  # [h, q, k]
    mask = (qseg[:, :, None] == kseg[:, None, :]) & (kseg[:, None, :] > 0)  # [b, q, k]
    if causal:
        mask = mask & (kj[None, None, :] <= qi[None, :, None])
    return _normalise(jnp.where(mask[:, None], a, 0.0), v).astype(q.dtype)


def performer_cached(q: Array, k: Array, v: Array, bias: Array, *, scale: float = 1.0,
                     num_features: int = 256, seed: int = 0) -> Array:
    """FAVOR+ attention over an explicit key set with a dense additive bias: a decode step.

    A_qk = exp(bias_qk) phi(q).phi(k) with the features of ``performer_attention``, so one
    query against the cached keys gives what the teacher-forced causal Performer gives at
    that position (the key stabiliser, a constant, spans the keys this call sees).

    Args:
        q: [b, q_len, h, d] queries (one token per decode step).
        k: [b, k_len, h, d] keys (the KV cache).
        v: [b, k_len, h, d] values.
        bias: additive float32 bias broadcastable to [b, h, q_len, k_len]: the T5 bias plus
            the causal/window mask; entries <= ``MASKED_BELOW`` are masked (weight 0).
        scale: multiplies q.k inside the approximated exp (1.0 for T5).
        num_features: number of random features m.
        seed: seed of the fixed random features.

    Returns:
        [b, q_len, h, d] in q's dtype; rows without any visible key are 0.
    """
    b, lq, h, _ = q.shape
    bias = jnp.broadcast_to(bias.astype(_F32), (b, h, lq, k.shape[1]))  # [b, h, q, k]
    seen = bias > MASKED_BELOW  # [b, h, q, k]
    fq, fk = _features(q, k, seen.any((1, 2)), scale, num_features, seed)  # [b, len, h, m]
    a = jnp.einsum("bqhm,bkhm->bhqk", fq, fk)  # [b, h, q, k]
    return _normalise(jnp.where(seen, a * jnp.exp(bias), 0.0), v).astype(q.dtype)


def _normalise(a, v):
    """out [b, q, h, d] = sum_k a v / sum_k a for the masked weights a [b, h, q, k]."""
    num = jnp.einsum("bhqk,bkhd->bqhd", a, v.astype(_F32))  # [b, q, h, d]
    den = jnp.transpose(a.sum(-1), (0, 2, 1))[..., None]  # [b, q, h, 1]
    return _divide(num, den)


def _divide(num, den):
    """num / den with rows of zero mass (no visible key) -> 0, NaN-free in both passes."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


# ----------------------------------------------------------------------------- linear


def _chunks(x, n):
    """[b, n*c, ...] -> [n, b, c, ...] so lax.scan iterates over chunks."""
    return jnp.moveaxis(x.reshape(x.shape[0], n, x.shape[1] // n, *x.shape[2:]), 1, 0)


def _window(x, offsets):
    """[n, b, c, ...] -> [n, b, len(offsets)*c, ...]: entry i holds chunks i + o (o in
    offsets) side by side; chunks outside the sequence are zeros (segment 0: masked)."""
    lo, hi = -min(offsets), max(offsets)
    xp = jnp.pad(x, [(lo, hi)] + [(0, 0)] * (x.ndim - 1))
    n = x.shape[0]
    return jnp.concatenate([xp[lo + o: lo + o + n] for o in offsets], axis=2)


def _state_scan(fq, fk, v, qseg, kseg):
    """Segment-reset scan; per chunk the contribution of all keys in earlier chunks of each
    query's segment run.

    Args: chunked fq, fk [n, b, c, h, m], v [n, b, c, h, d], qseg, kseg [n, b, c].
    Returns num [n, b, c, h, d], den [n, b, c, h] (unweighted by the far bias).
    """
    _, b, c, h, m = fk.shape
    d = v.shape[-1]

    def step(carry, x):
        s, z, seg = carry  # [b, h, m, d], [b, h, m], [b]
        fq_c, fk_c, v_c, qs, ks = x
        use = ((qs == seg[:, None]) & (qs > 0)).astype(_F32)[..., None]  # [b, c, 1]
        num = jnp.einsum("bqhm,bhmd->bqhd", fq_c, s) * use[..., None]  # [b, c, h, d]
        den = jnp.einsum("bqhm,bhm->bqh", fq_c, z) * use  # [b, c, h]
        # The run that continues into the next chunk: the last non-padding key segment of
        # this chunk; an all-padding chunk keeps the old one.
        valid = ks > 0
        pos = c - 1 - jnp.argmax(valid[:, ::-1], axis=1)  # [b]
        edge = jnp.take_along_axis(ks, pos[:, None], axis=1)[:, 0]  # [b]
        new_seg = jnp.where(valid.any(1), edge, seg)
        keep = (new_seg == seg).astype(_F32)  # [b]
        add = ((ks == new_seg[:, None]) & valid).astype(_F32)  # [b, c]
        fk_m = fk_c * add[:, :, None, None]  # [b, c, h, m]
        s = s * keep[:, None, None, None] + jnp.einsum("bkhm,bkhd->bhmd", fk_m, v_c)  # [b,h,m,d]
        z = z * keep[:, None, None] + fk_m.sum(1)  # [b, h, m]
        return (s, z, new_seg), (num, den)

    init = (jnp.zeros((b, h, m, d), _F32), jnp.zeros((b, h, m), _F32),
            jnp.zeros((b,), jnp.int32))
    _, (num, den) = jax.lax.scan(step, init, (fq, fk, v, qseg, kseg))
    return num, den


def performer_attention(q: Array, k: Array, v: Array, *, bias_table: Array | None = None,
                        relpos: RelPos | None = None, q_segment_ids: Array | None = None,
                        kv_segment_ids: Array | None = None, causal: bool = False,
                        scale: float = 1.0, num_features: int = 256, seed: int = 0,
                        chunk_size: int = 128) -> Array:
    """FAVOR+ attention at linear cost, with segments, causal mode and an exact T5 bias.

    Args:
        q: [b, q_len, h, d] queries.
        k: [b, k_len, h, d] keys.
        v: [b, k_len, h, d] values.
        bias_table: [relpos.num_buckets, h] T5 bias table (differentiable), or None.
        relpos: bucketing of (key_index - query_index); required iff ``bias_table`` is given.
        q_segment_ids: [b, q_len] int segment ids (0 = padding); default all ones.
        kv_segment_ids: [b, k_len] int segment ids (0 = padding); default all ones. Runs of
            equal ids must be contiguous (up to padding) and aligned with the query ids by
            index (self attention, or cross attention with one segment plus padding).
        causal: a query sees keys with index <= its own.
        scale: multiplies q.k inside the approximated exp (1.0 for T5).
        num_features: number of random features m.
        seed: seed of the fixed random features.
        chunk_size: scan chunk length (clamped to the padded length).

    Returns:
        [b, q_len, h, d] in q's dtype; rows without any visible key are 0.
    """
    _check_args(q, k, v, bias_table, relpos, q_segment_ids, kv_segment_ids, num_features,
                chunk_size, seed)
    b, lq, h, d = q.shape
    lk = k.shape[1]
    qseg, kseg, _, _ = fill_defaults(q, k, q_segment_ids, kv_segment_ids)
    fq, fk = _features(q, k, kseg > 0, scale, num_features, seed)  # [b, len, h, m]
    c = min(chunk_size, max(lq, lk))
    n = -(-max(lq, lk) // c)

    def pad(x):  # axis 1 up to n * c
        return jnp.pad(x, [(0, 0), (0, n * c - x.shape[1])] + [(0, 0)] * (x.ndim - 2))

    # Padded queries/keys get segment 0: masked everywhere, sliced off at the end.
    fq, qs = _chunks(pad(fq), n), _chunks(pad(qseg), n)  # [n, b, c, h, m], [n, b, c]
    fk, ks, vc = _chunks(pad(fk), n), _chunks(pad(kseg), n), _chunks(pad(v.astype(_F32)), n)

    c_past = c_fut = jnp.ones((h,), _F32)  # far weights exp(table[far bucket]); 1 if no bias
    radius = 0
    if relpos is not None:
        table = bias_table.astype(_F32)
        fut_from, far_fut, past_from, far_past = saturation(relpos)
        if fut_from is None or past_from is None:
            raise ValueError(f"relative_bucket does not saturate for {relpos}")
        width = max(fut_from, past_from)  # every offset at least this far is a far bucket
        c_past, c_fut = jnp.exp(table[far_past]), jnp.exp(table[far_fut])  # [h]
        radius = min(-(-(width - 1) // c), n - 1)

    # Far part: scanned states (all keys of the segment run in other chunks) x far weight.
    if causal:
        num, den = _state_scan(fq, fk, vc, qs, ks)  # [n, b, c, h, d], [n, b, c, h]
        num, den = num * c_past[:, None], den * c_past
    else:  # the suffix pass is the prefix pass on reversed positions: one scan over 2b rows
        flip = lambda x: jnp.flip(x, (0, 2))  # noqa: E731  reverse chunks and within chunks
        both = [jnp.concatenate([x, flip(x)], axis=1) for x in (fq, fk, vc, qs, ks)]
        num2, den2 = _state_scan(*both)  # [n, 2b, c, h, d], [n, 2b, c, h]
        num = num2[:, :b] * c_past[:, None] + flip(num2[:, b:]) * c_fut[:, None]
        den = den2[:, :b] * c_past + flip(den2[:, b:]) * c_fut

    # Band part: each query chunk against the key window of chunks c + o, o in offsets;
    # own chunk with the true weights, neighbour chunks with (w - c_far) (0 beyond the band).
    offsets = range(-radius, 1 if causal else radius + 1)
    fk_w, ks_w, v_w = (_window(x, offsets) for x in (fk, ks, vc))  # [n, b, o*c, ...]
    qi = jnp.arange(c)[:, None]  # [c, 1] query index in chunk
    kj = jnp.concatenate([o * c + jnp.arange(c) for o in offsets])[None, :]  # [1, o*c]
    mask = (qs[..., :, None] == ks_w[..., None, :]) & (ks_w[..., None, :] > 0)  # [n, b, c, o*c]
    if causal:
        mask = mask & (kj <= qi)
    kern = jnp.einsum("nbqhm,nbkhm->nbhqk", fq, fk_w)  # [n, b, h, c, o*c]
    if relpos is not None:
        w = jnp.transpose(jnp.exp(bias_of(table, relpos, kj - qi)), (2, 0, 1))  # [h, c, o*c]
        # keys of other chunks were already counted by the scan with the far weight
        far = jnp.where(kj < 0, c_past[:, None, None], c_fut[:, None, None])  # [h, 1, o*c]
        kern = kern * (w - jnp.where((kj >= 0) & (kj < c), 0.0, far))
    a = jnp.where(mask[:, :, None], kern, 0.0)  # [n, b, h, c, o*c]
    num = num + jnp.einsum("nbhqk,nbkhd->nbqhd", a, v_w)  # [n, b, c, h, d]
    den = den + jnp.transpose(a.sum(-1), (0, 1, 3, 2))  # [n, b, h, c] -> [n, b, c, h]

    out = _divide(num, den[..., None])  # [n, b, c, h, d]
    out = jnp.moveaxis(out, 0, 1).reshape(b, n * c, h, d)[:, :lq]
    return out.astype(q.dtype)
