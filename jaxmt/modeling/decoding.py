"""Greedy decoding over the decoder's KV cache.

The encoder runs once; each step feeds one token to the decoder, which appends its
keys/values to the cache and attends over the cached prefix. The loop is a
``lax.while_loop`` that stops as soon as every row has produced EOS.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxmt.data.vocab import EOS_ID, PAD_ID  # SentencePiece only, no TF; PAD also starts decoding
from jaxmt.modeling.network import EncoderDecoder

PyTree = Any


def init_cache(module: EncoderDecoder, batch: int, max_decode_len: int, encoded: jax.Array,
               enc_segment_ids: jax.Array) -> PyTree:
    """Zero KV cache sized for ``max_decode_len`` target positions."""
    dummy = jnp.zeros((batch, max_decode_len), jnp.int32)
    shapes = jax.eval_shape(
        lambda: module.init(jax.random.PRNGKey(0), dummy, encoded, enc_segment_ids, decode=True,
                            method=EncoderDecoder.decode))["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def greedy_decode(module: EncoderDecoder, params: PyTree, enc_tokens: jax.Array,
                  max_decode_len: int, num_ids: int | None = None) -> jax.Array:
    """Greedy translation of a batch.

    Args:
        module: the network (static).
        params: its parameters.
        enc_tokens: [b, s] source ids, 0-padded, each row ending in EOS.
        max_decode_len: cache length and the most tokens generated (static).
        num_ids: only ids below this are generated (static): a vocabulary with fewer
            pieces than ``ModelConfig.vocab_size`` leaves the rest of the logits unused.

    Returns:
        [b, max_decode_len] generated ids; EOS then 0s after each row's end.
    """
    b = enc_tokens.shape[0]
    enc_seg = (enc_tokens > 0).astype(jnp.int32)
    encoded = module.apply({"params": params}, enc_tokens, enc_seg, method=EncoderDecoder.encode)
    cache = init_cache(module, b, max_decode_len, encoded, enc_seg)

    def cond(carry):
        i, _, _, _, finished = carry
        return (i < max_decode_len) & ~jnp.all(finished)

    def body(carry):
        i, token, out, cache, finished = carry
        logits, upd = module.apply(
            {"params": params, "cache": cache}, token, encoded, enc_seg, decode=True,
            positions=jnp.full((b, 1), i), max_decode_len=max_decode_len, mutable=["cache"],
            method=EncoderDecoder.decode)  # [b, 1, v]
        last = logits[:, -1]  # [b, v]
        if num_ids is not None and num_ids < last.shape[-1]:
            last = jnp.where(jnp.arange(last.shape[-1]) < num_ids, last, -jnp.inf)
        nxt = jnp.argmax(last, axis=-1).astype(jnp.int32)  # [b]
        nxt = jnp.where(finished, PAD_ID, nxt)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        return i + 1, nxt[:, None], out, upd["cache"], finished | (nxt == EOS_ID)

    carry = (jnp.array(0, jnp.int32), jnp.full((b, 1), PAD_ID, jnp.int32),
             jnp.zeros((b, max_decode_len), jnp.int32), cache, jnp.zeros((b,), bool))
    return jax.lax.while_loop(cond, body, carry)[2]


def strip_eos(ids) -> list[int]:
    """Ids up to (not including) the first EOS or padding."""
    out = []
    for t in ids:
        t = int(t)
        if t in (EOS_ID, PAD_ID):
            break
        out.append(t)
    return out
