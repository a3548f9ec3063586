"""Multi-head attention with T5 conventions and an autoregressive KV cache.

T5 folds the 1/sqrt(head_dim) scale into the query initialisation, so scores are
not scaled here (this keeps imported T5 weights exact). Scores, masking and the
softmax run in float32.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmt import axes
from jaxmt.layers import constrain, dtype_of, mixed_einsum, normal, param

Array = jax.Array
NEG_INF = -1e10


def mask_to_bias(mask: Array) -> Array:
    """Boolean mask [b, 1|h, q, k] -> additive float32 bias."""
    return jnp.where(mask, 0.0, NEG_INF).astype(jnp.float32)


class MultiHeadAttention(nn.Module):
    """Attention over ``kv_input`` from ``q_input``; with ``decode=True`` a one-token step.

    In decode mode the module keeps ``cached_key``/``cached_value`` [b, max_len, h, d]
    and ``cache_index`` in the ``cache`` collection. The first call (during ``init``
    with the full-length target) only sizes the cache.
    """

    num_heads: int
    head_dim: int
    emb_dim: int
    dropout_rate: float = 0.0
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, q_input: Array, kv_input: Array, bias: Array | None,
                 deterministic: bool, decode: bool = False) -> Array:
        """Args:
            q_input: [b, q, e] queries.
            kv_input: [b, k, e] keys/values source.
            bias: additive float32 bias broadcastable to [b, h, q, k] (mask and position
              bias together), or None. In decode mode it must cover the whole cache
              length k = max_len; positions past the current index are masked here.
            deterministic: disables dropout.
            decode: one-token autoregressive step using the cache.
        """
        dt, pdt = dtype_of(self.dtype), dtype_of(self.param_dtype)
        e, h, d = self.emb_dim, self.num_heads, self.head_dim
        wq = param(self, "query", normal((e * d) ** -0.5), (e, h, d),
                   (axes.EMBED, axes.HEADS, axes.KV), pdt)
        wk = param(self, "key", normal(e ** -0.5), (e, h, d), (axes.EMBED, axes.HEADS, axes.KV), pdt)
        wv = param(self, "value", normal(e ** -0.5), (e, h, d), (axes.EMBED, axes.HEADS, axes.KV), pdt)
        wo = param(self, "out", normal((h * d) ** -0.5), (h, d, e), (axes.HEADS, axes.KV, axes.EMBED), pdt)

        names = (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_HEADS, axes.ACT_KV)
        q = constrain(mixed_einsum("bqe,ehd->bqhd", q_input, wq, dt).astype(dt), names)  # [b, q, h, d]
        k = constrain(mixed_einsum("bke,ehd->bkhd", kv_input, wk, dt).astype(dt), names)  # [b, k, h, d]
        v = constrain(mixed_einsum("bke,ehd->bkhd", kv_input, wv, dt).astype(dt), names)  # [b, k, h, d]

        if decode:
            k, v, cache_bias = self._update_cache(k, v)
            if cache_bias is not None:
                bias = cache_bias if bias is None else bias + cache_bias

        scores = mixed_einsum("bqhd,bkhd->bhqk", q, k, dt)  # [b, h, q, k]
        if bias is not None:
            scores = scores + bias
        probs = jax.nn.softmax(scores, axis=-1)
        probs = nn.Dropout(self.dropout_rate)(probs, deterministic=deterministic).astype(dt)
        ctx = mixed_einsum("bhqk,bkhd->bqhd", probs, v, dt)  # [b, q, h, d]
        ctx = constrain(ctx.astype(dt), names)
        out = mixed_einsum("bqhd,hde->bqe", ctx, wo, dt).astype(dt)  # [b, q, e]
        return constrain(out, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED))

    def _update_cache(self, k: Array, v: Array):
        """Writes this step's k/v at ``cache_index``; returns full k/v and the causal bias."""
        initialized = self.has_variable("cache", "cached_key")
        ck = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cv = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        idx = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if not initialized:  # init pass: just size the cache from the full-length input
            return k, v, None
        b, max_len, h, d = ck.value.shape
        if k.shape[1] != 1:
            raise ValueError(f"decode step expects one query token, got {k.shape[1]}")
        i = idx.value
        ck.value = jax.lax.dynamic_update_slice(ck.value, k, (0, i, 0, 0))
        cv.value = jax.lax.dynamic_update_slice(cv.value, v, (0, i, 0, 0))
        idx.value = i + 1
        visible = (jnp.arange(max_len) <= i)[None, None, None, :]  # [1, 1, 1, max_len]
        return ck.value, cv.value, mask_to_bias(visible)
