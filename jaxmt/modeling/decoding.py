"""Greedy decoding and sampling over the decoder's KV cache.

The encoder runs once; each step feeds one token to the decoder, which appends its
keys/values to the cache and attends over the cached prefix. The loop is a
``lax.while_loop`` that stops as soon as every row has finished (EOS or its longest
output).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxmt.config import DecodeConfig
from jaxmt.data.vocab import EOS_ID, PAD_ID  # SentencePiece only, no TF; PAD also starts decoding
from jaxmt.modeling import logits_processing
from jaxmt.modeling.network import EncoderDecoder

PyTree = Any
# Routing ids of language adapters for a decode: (encoder ids [b] or [b, s], decoder ids
# [b]), one per source row; None without adapters.
LangIds = tuple[jax.Array, jax.Array] | None


def init_cache(module: EncoderDecoder, batch: int, max_decode_len: int, encoded: jax.Array,
               enc_segment_ids: jax.Array, group: int = 1) -> PyTree:
    """Zero KV cache of ``batch`` rows sized for ``max_decode_len`` target positions
    (``encoded`` [batch / r, s, e] may have one row per r decoder rows); ``group`` > 1
    shares one self-attention cache among each ``group`` adjacent rows (beam slots)."""
    dummy = jnp.zeros((batch, max_decode_len), jnp.int32)
    slots = (None if group == 1 else
             jnp.zeros((batch // group, group, max_decode_len), jnp.int32))
    # Adapters need routing ids to run; which ones does not change the cache's shapes.
    ids = jnp.zeros((batch,), jnp.int32) if module.cfg.adapter.size else None
    shapes = jax.eval_shape(
        lambda: module.init(jax.random.PRNGKey(0), dummy, encoded, enc_segment_ids, decode=True,
                            beam_slots=slots, lang_ids=ids, method=EncoderDecoder.decode))["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def split_lang_ids(lang_ids: LangIds) -> tuple[jax.Array | None, jax.Array | None]:
    """(encoder ids, decoder ids) of a decode's ``lang_ids``; (None, None) for None."""
    return (None, None) if lang_ids is None else lang_ids


def cache_phases(max_decode_len: int) -> tuple[int, ...]:
    """The cache lengths a decode loop grows through: L halved while the shortest is even
    and at least 32, three lengths at most (64: 16, 32, 64; 32: 16, 32; 63 or 16: itself).

    Attention reads (and beam search masks) the whole cache every step, so the first
    quarter of the steps runs on a quarter-length cache and the next on a half-length
    one: about 0.69 of the full-length work, less where every row ends early. Each
    phase is its own loop (XLA compiles the step once per phase; a ``lax.switch`` over
    lengths inside one loop copied the cache into each branch).
    """
    phases = [max_decode_len]
    while len(phases) < 3 and phases[0] >= 32 and phases[0] % 2 == 0:
        phases.insert(0, phases[0] // 2)
    return tuple(phases)


def grow_cache(cache: PyTree, old_len: int, new_len: int) -> PyTree:
    """``cache`` for ``old_len`` positions, zero-padded to ``new_len``. Keys and values have
    their positions second to last ([.., T * r, d], position-major), the index none."""
    def grow(x):
        if x.ndim < 2:
            return x
        r = x.shape[-2] // old_len
        pad = [(0, 0)] * (x.ndim - 2) + [(0, (new_len - old_len) * r), (0, 0)]
        return jnp.pad(x, pad)
    return jax.tree.map(grow, cache)


def phased_while_loop(cond, body, carry: tuple, phases: tuple[int, ...], cache_at: int
                      ) -> tuple:
    """``lax.while_loop`` once per cache length of ``phases`` (``cond(carry, T)`` and
    ``body(carry, T)`` see the phase's length T), the cache (``carry[cache_at]``, sized
    for the first phase) grown with :func:`grow_cache` between phases."""
    for n, T in enumerate(phases):
        if n:
            carry = (*carry[:cache_at], grow_cache(carry[cache_at], phases[n - 1], T),
                     *carry[cache_at + 1:])
        carry = jax.lax.while_loop(functools.partial(cond, T=T), functools.partial(body, T=T),
                                   carry)
    return carry


# Greedy decoding as it always was: no length limit but the cache's, no processing.
_PLAIN_GREEDY = DecodeConfig(strategy="greedy", no_repeat_ngram_size=0, max_len_a=0.0,
                             max_len_b=1 << 30, suppressed_ids=())


def max_output_len(enc_tokens: jax.Array, options: DecodeConfig, max_decode_len: int
                   ) -> jax.Array:
    """[b] each row's longest output, EOS included: ``floor(a * source_tokens + b)``,
    clipped to ``[1, max_decode_len]``."""
    src_len = jnp.sum(enc_tokens > 0, axis=1).astype(jnp.float32)  # [b]
    return jnp.clip(jnp.floor(options.max_len_a * src_len + options.max_len_b), 1,
                    max_decode_len).astype(jnp.int32)


def first_argmax(x: jax.Array) -> jax.Array:
    """``jnp.argmax(x, -1)`` (the first index of the maximum) for NaN-free ``x``, as a max
    and a min over the last axis: XLA's CPU argmax, one reduction over (value, index)
    pairs, is about 8x slower over a vocabulary."""
    n = x.shape[-1]
    hit = x == jnp.max(x, axis=-1, keepdims=True)
    return jnp.min(jnp.where(hit, jnp.arange(n, dtype=jnp.int32), n), axis=-1)


def _decode_loop(module: EncoderDecoder, params: PyTree, enc_tokens: jax.Array,
                 max_decode_len: int, num_ids: int | None, options: DecodeConfig,
                 rng: jax.Array | None, scored: bool = True, lang_ids: LangIds = None
                 ) -> tuple[jax.Array, jax.Array]:
    """:func:`sample_decode`'s loop, unsorted: ([b * n, L] ids, [b * n] log-probabilities),
    the ``n`` decodes of a source row adjacent. ``scored=False`` skips the scores (zeros)
    and their softmax, for :func:`greedy_decode`'s speed. ``lang_ids``: the adapters'
    routing ids per source row (:data:`LangIds`)."""
    o, L = options, max_decode_len
    sample = o.strategy == "sample"
    n = o.num_decodes if sample else 1
    enc_ids, dec_ids = split_lang_ids(lang_ids)
    enc_seg = (enc_tokens > 0).astype(jnp.int32)
    # [b, s, e] once per source: its n decodes (adjacent rows) share the cross-attention.
    encoded = module.apply({"params": params}, enc_tokens, enc_seg, lang_ids=enc_ids,
                           method=EncoderDecoder.encode)
    rows = encoded.shape[0] * n
    phases = cache_phases(L)
    cache = init_cache(module, rows, phases[0], encoded, enc_seg)
    max_len = jnp.repeat(max_output_len(enc_tokens, o, L), n)  # [b*n]

    def cond(carry, T):
        i, finished = carry[0], carry[-1]
        return (i < T) & ~jnp.all(finished)

    def body(carry, T):
        """One step with a cache of T positions (this phase's)."""
        i, token, out, logp, cache, finished = carry
        logits, upd = module.apply(
            {"params": params, "cache": cache}, token, encoded, enc_seg, decode=True,
            positions=jnp.full((rows, 1), i), max_decode_len=T, lang_ids=dec_ids,
            mutable=["cache"], method=EncoderDecoder.decode)  # [rows, 1, v]; ids per source
        last = logits_processing.mask_unused(logits[:, -1].astype(jnp.float32), num_ids)
        # Processors on raw logits, then (sampling only) the warpers: Hugging Face's order.
        scores = logits_processing.process(last, out, i, max_len, o)  # [rows, v]
        if sample:
            warped = logits_processing.warp(scores, o)
            nxt = jax.random.categorical(jax.random.fold_in(rng, i), warped, axis=-1)
        else:
            nxt = first_argmax(scores)
        nxt = jnp.where(finished, PAD_ID, nxt.astype(jnp.int32))  # [rows]
        # The score is the model's log-probability of the output (processors and warpers
        # choose the tokens but do not rescore them).
        if scored:
            tok_logp = jnp.take_along_axis(jax.nn.log_softmax(last), nxt[:, None], 1)[:, 0]
            logp = logp + jnp.where(finished, 0.0, tok_logp)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        # A row ends at EOS, or is cut off at its longest output.
        finished = finished | (nxt == EOS_ID) | (i + 1 >= max_len)
        return i + 1, nxt[:, None], out, logp, upd["cache"], finished

    carry = (jnp.array(0, jnp.int32), jnp.full((rows, 1), PAD_ID, jnp.int32),
             jnp.zeros((rows, L), jnp.int32), jnp.zeros((rows,), jnp.float32), cache,
             jnp.zeros((rows,), bool))
    _, _, out, logp, _, _ = phased_while_loop(cond, body, carry, phases, cache_at=4)
    return out, logp


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def greedy_decode(module: EncoderDecoder, params: PyTree, enc_tokens: jax.Array,
                  max_decode_len: int, num_ids: int | None = None,
                  lang_ids: LangIds = None) -> jax.Array:
    """Greedy translation of a batch, without :class:`DecodeConfig`'s length limits and
    processing (:func:`sample_decode` with every processor off).

    Args:
        module: the network (static).
        params: its parameters.
        enc_tokens: [b, s] source ids, 0-padded, each row ending in EOS.
        max_decode_len: cache length and the most tokens generated (static).
        num_ids: only ids below this are generated (static): a vocabulary with fewer
            pieces than ``ModelConfig.vocab_size`` leaves the rest of the logits unused.
        lang_ids: with adapters, their routing ids per source row: (encoder ids [b] or
            [b, s], decoder ids [b]), indices into ``AdapterConfig.langs`` or -1.

    Returns:
        [b, max_decode_len] generated ids; EOS then 0s after each row's end.
    """
    return _decode_loop(module, params, enc_tokens, max_decode_len, num_ids, _PLAIN_GREEDY,
                        None, scored=False, lang_ids=lang_ids)[0]


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def sample_decode(module: EncoderDecoder, params: PyTree, enc_tokens: jax.Array,
                  max_decode_len: int, num_ids: int | None = None,
                  options: DecodeConfig = _PLAIN_GREEDY, rng: jax.Array | None = None,
                  lang_ids: LangIds = None) -> tuple[jax.Array, jax.Array]:
    """Greedy or sampled translation of a batch, with ``options``' length limits and
    logits processing (:mod:`jaxmt.modeling.logits_processing`).

    ``strategy="greedy"`` takes each step's best processed logit. ``"sample"`` draws
    ``num_decodes`` outputs per source from the processed logits after temperature,
    top-k and top-p, and returns them best first by log-probability (T5X's
    ``temperature_sample``). Lengths follow :func:`jaxmt.modeling.beam_search.beam_search`:
    a row's output has at most ``floor(max_len_a * source_tokens + max_len_b)`` tokens
    (capped by ``max_decode_len``), EOS included, and is cut off there without EOS unless
    ``forced_eos``; below ``min_len`` tokens EOS is banned.

    Args:
        module: the network (static).
        params: its parameters.
        enc_tokens: [b, s] source ids, 0-padded, each row ending in EOS.
        max_decode_len: cache length and the longest output (static).
        num_ids: only ids below this are generated (static).
        options: the strategy and its settings (static; the beam fields are not used).
        rng: the sampling key; default ``PRNGKey(options.seed)``. Unused when greedy.
        lang_ids: with adapters, their routing ids per source row: (encoder ids [b] or
            [b, s], decoder ids [b]); a source's samples share its decoder id.

    Returns:
        ``(ids, scores)``: [b, n_best, max_decode_len] ids, best first (EOS then 0s after
        each output's end), and their [b, n_best] log-probabilities under the model
        (sums over the generated tokens, EOS included).
    """
    if options.strategy not in ("greedy", "sample"):
        raise ValueError(f"sample_decode: strategy must be 'greedy' or 'sample', got "
                         f"{options.strategy!r} (beam search is beam_search)")
    if options.strategy == "sample" and rng is None:
        rng = jax.random.PRNGKey(options.seed)
    out, logp = _decode_loop(module, params, enc_tokens, max_decode_len, num_ids, options, rng,
                             lang_ids=lang_ids)
    b = enc_tokens.shape[0]
    n = out.shape[0] // b
    out, logp = out.reshape(b, n, max_decode_len), logp.reshape(b, n)
    order = jnp.argsort(-logp, axis=1, stable=True)[:, :options.n_best]  # [b, n_best]
    return (jnp.take_along_axis(out, order[:, :, None], 1),
            jnp.take_along_axis(logp, order, 1))


def strip_eos(ids) -> list[int]:
    """Ids up to (not including) the first EOS or padding."""
    out = []
    for t in ids:
        t = int(t)
        if t in (EOS_ID, PAD_ID):
            break
        out.append(t)
    return out
