"""Multi-head attention with T5 conventions and an autoregressive KV cache.

T5 folds the 1/sqrt(head_dim) scale into the query initialisation, so scores are
not scaled here (this keeps imported T5 weights exact; Marian's scale is folded into
its query weights at import). Scores, masking and the softmax run in float32. The
output is named ``attention_out`` for the ``save_attention_out`` remat policy.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxmt import axes
from jaxmt.layers import bias_param, constrain, dtype_of, mixed_einsum, normal, param

Array = jax.Array
NEG_INF = -1e10


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def softmax_to(scores: Array, dtype) -> Array:
    """Float32 softmax over the last axis, returned in ``dtype``.

    The backward keeps only the ``dtype`` probabilities (which the next matmul keeps
    anyway) and computes the gradient in float32 from them. Autodiff would also keep
    the float32 probabilities: under bf16 that made attention's saved activations
    larger than under fp32.
    """
    return jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(dtype)


def _softmax_fwd(scores, dtype):
    probs = softmax_to(scores, dtype)
    return probs, probs


def _softmax_bwd(dtype, probs, g):
    p, g = probs.astype(jnp.float32), g.astype(jnp.float32)
    return (p * (g - jnp.sum(g * p, axis=-1, keepdims=True)),)


softmax_to.defvjp(_softmax_fwd, _softmax_bwd)


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
    use_bias: bool = False
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

        def project(x, w, name):
            y = mixed_einsum("bte,ehd->bthd", x, w, dt)  # [b, t, h, d] float32
            if self.use_bias:
                y = y + bias_param(self, f"{name}_bias", (h, d), (axes.HEADS, axes.KV), pdt)
            return constrain(y.astype(dt), names)

        q = project(q_input, wq, "query")
        k, v = project(kv_input, wk, "key"), project(kv_input, wv, "value")

        if decode:
            k, v, cache_bias = self._update_cache(k, v)
            if cache_bias is not None:
                bias = cache_bias if bias is None else bias + cache_bias

        scores = mixed_einsum("bqhd,bkhd->bhqk", q, k, dt)  # [b, h, q, k]
        if bias is not None:
            scores = scores + bias
        probs = softmax_to(scores, dt)  # [b, h, q, k]
        probs = nn.Dropout(self.dropout_rate)(probs, deterministic=deterministic)
        ctx = mixed_einsum("bhqk,bkhd->bqhd", probs, v, dt)  # [b, q, h, d]
        ctx = constrain(ctx.astype(dt), names)
        out = mixed_einsum("bqhd,hde->bqe", ctx, wo, dt)  # [b, q, e] float32
        if self.use_bias:
            out = out + bias_param(self, "out_bias", (e,), (axes.EMBED,), pdt)
        out = checkpoint_name(out.astype(dt), "attention_out")
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
