"""Beam search over the decoder's KV cache, with n-best output and length control.

The encoder runs once, and the beams of a source share its output (and the
cross-attention keys and values projected from it). Each step scores
``beam_size * vocab`` continuations of the alive beams and keeps the top ``2 *
beam_size`` candidates (enough that ``beam_size`` of them are alive even when every beam
could end here). Those among the best ``beam_size`` that end (EOS, or the length limit)
join the finished set, which keeps the best ``beam_size`` by length-penalised score; the
best ``beam_size`` that do not end become the new alive set. Its self-attention cache
follows it without moving: the beams of a source share one cache of ``beam_size`` slots
per position, each beam writes its token into its own slot, and a [b, k, L] table of
the slots holding each beam's history (reordered like the sequences) masks what it
reads (``cache_reorder="shared"``; ``"gather"``/``"one_hot"`` move the cache instead).
An ending candidate ranked below ``beam_size`` is dropped: it only served to keep
``beam_size`` beams alive (Hugging Face's and fairseq's rule; T5X lets every ending
candidate of the ``2 * beam_size`` finish; where they differ jaxmt follows Hugging Face,
so an imported checkpoint decodes as ``generate()`` does: ``tests/test_decode_parity.py``
compares ids and scores).

Length penalties (``score = log p / lp(length)``, length counting the EOS):

* ``"gnmt"``: ``((5 + length) / 6) ** alpha`` (Wu et al. 2016; T5X's default, alpha 0.6);
* ``"power"``: ``length ** alpha`` (Hugging Face and CTranslate2);
* ``"none"``: the plain log-probability.

Stopping (``early_stopping``, Hugging Face's names):

* ``"never"``: the canonical rule. A row stops once it has ``beam_size`` finished
  hypotheses and no alive beam can still beat the worst of them at any length up to
  its maximum: with ``log p <= 0`` and a penalty that grows with length, an alive beam's
  best possible final score is its log-probability over the penalty at the longest
  length it may reach (or at its current length when ``alpha <= 0``).
* ``"heuristic"``: Hugging Face's ``early_stopping=False``: the bound above, taken at
  the current length instead of the longest (can stop before a longer hypothesis that
  would have won).
* ``"first"``: Hugging Face's ``early_stopping=True``: stop once ``beam_size``
  hypotheses have finished.

A row's output is at most ``max_len_a * source_length + max_len_b`` tokens long (EOS
included, capped by the cache length; Hugging Face's ``max_new_tokens``, or its
``max_length`` minus the start token); a hypothesis still alive at that length is cut off
there and competes with the finished ones, scored at that length, if it ranks among the
step's best ``beam_size`` (greedy decoding and Hugging Face's beam search do the same, so
``beam_size=1`` without a length penalty is greedy decoding exactly). Below ``min_len``
tokens EOS is not allowed.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxmt.config import DecodeConfig
from jaxmt.data.vocab import EOS_ID, PAD_ID  # SentencePiece only, no TF; PAD also starts decoding
from jaxmt.modeling import logits_processing
from jaxmt.modeling.decoding import (LangIds, cache_phases, init_cache, max_output_len,
                                     phased_while_loop, split_lang_ids)
from jaxmt.modeling.network import EncoderDecoder

PyTree = Any
NEG_INF = logits_processing.NEG_INF  # finite: -inf - -inf would make NaNs below


def length_penalty(length: jax.Array, kind: str, alpha: float) -> jax.Array:
    """The divisor of a hypothesis's log-probability at ``length`` tokens (EOS included)."""
    length = jnp.asarray(length, jnp.float32)
    if kind == "gnmt":
        return ((5.0 + length) / 6.0) ** alpha
    if kind == "power":
        return length ** alpha
    return jnp.ones_like(length)


def _batch_axes(module: EncoderDecoder, max_decode_len: int, encoded: jax.Array,
                enc_seg: jax.Array) -> PyTree:
    """Each cache leaf's batch axis (None: none, e.g. the step counter), found by sizing
    the cache for two batch sizes: unrolled layers keep it first, scanned ones second."""
    one, two = (jax.eval_shape(lambda n=n: init_cache(module, n, max_decode_len,
                                                      encoded[:1].repeat(n, 0),
                                                      enc_seg[:1].repeat(n, 0)))
                for n in (1, 2))

    def axis(a, b):
        diff = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
        return diff[0] if diff else None
    return jax.tree.map(axis, one, two)


def _reorder_how(module: EncoderDecoder, options: DecodeConfig, max_decode_len: int) -> str:
    """``options.cache_reorder`` with ``"auto"`` resolved: shared caches, except for a
    Performer decoder (its FAVOR+ step reads a cache of its own), which moves its cache
    by a one-hot einsum under a mesh of more than one device, else by a gather."""
    how = options.cache_reorder
    if how == "auto":
        performer = module.cfg.attention.resolve("decoder", max_decode_len) == "performer"
        how = ("shared" if not performer else
               "one_hot" if jax.sharding.get_abstract_mesh().size > 1 else "gather")
    return how


def _reorder(cache: PyTree, axes: PyTree, beams: jax.Array, how: str) -> PyTree:
    """The cache of rows ``beams`` [b, k] (beam indices within each source row).

    ``how``: ``"gather"`` (``jnp.take``: fast on one device, but XLA all-gathers the
    whole cache over a batch-sharded mesh to serve the flat row indices) or
    ``"one_hot"`` (an einsum within each source row: stays inside each batch shard).
    """
    b, k = beams.shape
    flat = (beams + jnp.arange(b)[:, None] * k).reshape(-1)  # [b*k] rows of the cache

    def move(x, axis):
        if axis is None:
            return x
        if how == "gather":
            return jnp.take(x, flat, axis=axis, mode="clip")  # in bounds: no fill select
        x = jnp.moveaxis(x, axis, 0)
        dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
        one_hot = jax.nn.one_hot(beams, k, dtype=dtype)  # [b, k_new, k_old]
        # Every other axis kept as it is (no flattening), so their shardings (heads over
        # `tensor`) survive; one-hot rows pick one old beam each, so the product is exact.
        grouped = x.reshape(b, k, *x.shape[1:]).astype(dtype)  # [b, k_old, ...]
        out = jnp.einsum("bjk,bk...->bj...", one_hot, grouped)  # [b, k_new, ...]
        return jnp.moveaxis(out.astype(x.dtype).reshape(x.shape), 0, axis)
    return jax.tree.map(move, cache, axes)


def top_k_blocked(x: jax.Array, n: int, block: int = 128) -> tuple[jax.Array, jax.Array]:
    """``jax.lax.top_k(x, n)`` over the last axis of ``x`` [b, m], in two cheap passes.

    The n largest values lie in the n blocks of ``block`` with the largest maxima (a value
    outside them has n larger ones, those maxima), so a vectorised max per block, a top-n
    of the block maxima and a top-n of those n blocks find them. The blocks are taken in
    index order, so ties go to the lower index as in ``top_k``. XLA's CPU ``top_k``
    walks all m values one at a time: over beam search's ``beam_size * vocab`` it was
    slower than this whole function.
    """
    b, m = x.shape
    if m % block or m < 8 * n * block:
        return jax.lax.top_k(x, n)
    blocks = x.reshape(b, m // block, block)
    _, which = jax.lax.top_k(jnp.max(blocks, axis=-1), n)  # [b, n] blocks
    which = jnp.sort(which, axis=-1)
    picked = jnp.take_along_axis(blocks, which[:, :, None], 1).reshape(b, n * block)
    top, at = jax.lax.top_k(picked, n)  # [b, n]
    return top, jnp.take_along_axis(which, at // block, 1) * block + at % block


def _top(scores: jax.Array, k: int, *arrays: jax.Array):
    """The top ``k`` of ``scores`` [b, n] along the last axis, and ``arrays`` [b, n, ...]
    gathered to follow them."""
    top, idx = jax.lax.top_k(scores, k)
    return (top, *(jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), 1)
                   for a in arrays))


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def beam_search(module: EncoderDecoder, params: PyTree, enc_tokens: jax.Array,
                max_decode_len: int, num_ids: int | None = None,
                options: DecodeConfig = DecodeConfig(), lang_ids: LangIds = None
                ) -> tuple[jax.Array, jax.Array]:
    """Beam search translation of a batch.

    Args:
        module: the network (static).
        params: its parameters.
        enc_tokens: [b, s] source ids, 0-padded, each row ending in EOS.
        max_decode_len: cache length and the longest output (static).
        num_ids: only ids below this are generated (static).
        options: beam size, n-best, penalties, stopping and lengths (static; the
            sampling fields are not used).
        lang_ids: with adapters, their routing ids per source row: (encoder ids [b] or
            [b, s], decoder ids [b]); a source's beams share its decoder id.

    Returns:
        ``(ids, scores)``: [b, n_best, max_decode_len] ids, best first (EOS, then 0s
        after each hypothesis's end; no EOS where it was cut off at its row's longest
        output), and their [b, n_best] length-penalised scores.
        A row with fewer than ``n_best`` possible hypotheses pads with zeros scored
        :data:`NEG_INF`.
    """
    o = options
    b, k, L = enc_tokens.shape[0], o.beam_size, max_decode_len
    enc_ids, dec_ids = split_lang_ids(lang_ids)
    enc_seg = (enc_tokens > 0).astype(jnp.int32)
    encoded = module.apply({"params": params}, enc_tokens, enc_seg, lang_ids=enc_ids,
                           method=EncoderDecoder.encode)
    how = _reorder_how(module, o, L)
    shared = how == "shared"
    axes = None if shared else _batch_axes(module, L, encoded, enc_seg)
    # encoded [b, s, e] stays once per source: its k beams (adjacent rows) share the
    # cross-attention keys and values (and with `shared`, one self-attention cache).
    phases = cache_phases(L)
    cache = init_cache(module, b * k, phases[0], encoded, enc_seg, group=k if shared else 1)

    max_len = max_output_len(enc_tokens, o, L)  # [b]

    def cond(carry, T):
        i, done = carry[0], carry[-1]
        return (i < T) & ~jnp.all(done)

    def body(carry, T):
        """One step with a cache of T positions (this phase's)."""
        i, alive_seq, alive_logp, slots, cache, fin_seq, fin_score, done = carry
        last = jnp.where(i == 0, PAD_ID, alive_seq[:, :, jnp.maximum(i - 1, 0)])  # [b, k]
        if shared:  # beam j writes position i into its own slot j; earlier positions
            # are where its ancestors wrote them
            slots = jax.lax.dynamic_update_slice(
                slots, jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32)[None, :, None],
                                        (b, k, 1)), (0, 0, i))  # [b, k, L]
        logits, upd = module.apply(
            {"params": params, "cache": cache}, last.reshape(b * k, 1), encoded, enc_seg,
            decode=True, positions=jnp.full((b * k, 1), i), max_decode_len=T,
            beam_slots=slots[:, :, :T] if shared else None, lang_ids=dec_ids,
            mutable=["cache"], method=EncoderDecoder.decode)  # [b*k, 1, v]; ids per source
        last_logits = logits[:, -1].astype(jnp.float32)  # [b*k, v]
        v = last_logits.shape[-1]
        # Unused rows of the vocabulary get no mass; the processors (min length, forced
        # EOS, no-repeat n-grams, ...) act on log-probabilities, as Hugging Face's do.
        logp = jax.nn.log_softmax(logits_processing.mask_unused(last_logits, num_ids))
        logp = logits_processing.process(logp, alive_seq.reshape(b * k, L), i,
                                         jnp.repeat(max_len, k), o)  # [b*k, v]
        length = i + 1  # tokens of a hypothesis that takes its token at position i
        cand = alive_logp[:, :, None] + logp.reshape(b, k, v)  # [b, k, v]
        cand_logp, cand_idx = top_k_blocked(cand.reshape(b, k * v), 2 * k)  # [b, 2k]
        beam, token = cand_idx // v, (cand_idx % v).astype(jnp.int32)
        seq = jnp.take_along_axis(alive_seq, beam[:, :, None], 1)  # [b, 2k, L]
        seq = jax.lax.dynamic_update_slice(seq, token[:, :, None], (0, 0, i))
        # A hypothesis ends at EOS, or at its row's longest output without one (cut off,
        # as greedy decoding and Hugging Face's beam search leave it).
        ends = (token == EOS_ID) | (length >= max_len)[:, None]

        # Finished: the old set and this step's ending candidates among the best k (the
        # other k only keep k beams alive; Hugging Face and fairseq let them not finish);
        # keep the best k.
        score = cand_logp / length_penalty(length, o.length_penalty, o.alpha)
        ok = ends & (jnp.arange(2 * k) < k)[None, :] & (cand_logp > NEG_INF / 2)
        score = jnp.where(ok & ~done[:, None], score, NEG_INF)
        fin_score, fin_seq = _top(jnp.concatenate([fin_score, score], 1), k,
                                  jnp.concatenate([fin_seq, seq], 1))
        # Alive: the best k candidates that did not end.
        alive_logp, alive_seq, alive_beam = _top(jnp.where(ends, NEG_INF, cand_logp), k,
                                                 seq, beam)
        if shared:
            slots = jnp.take_along_axis(slots, alive_beam[:, :, None], 1)  # [b, k, L]
            cache = upd["cache"]
        else:
            cache = _reorder(upd["cache"], axes, alive_beam, how)

        # Which rows are done after this step.
        full = jnp.min(fin_score, axis=1) > NEG_INF / 2  # [b]: k hypotheses finished
        if o.early_stopping == "first":
            stop = full
        else:
            at = (max_len if o.early_stopping == "never" and o.alpha > 0
                  else jnp.minimum(length, max_len))
            bound = alive_logp[:, 0] / length_penalty(at, o.length_penalty, o.alpha)
            stop = full & (bound <= jnp.min(fin_score, axis=1))
        stop = stop | (length >= max_len) | (alive_logp[:, 0] <= NEG_INF / 2)
        return i + 1, alive_seq, alive_logp, slots, cache, fin_seq, fin_score, done | stop

    alive_logp = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (b, 1))
    carry = (jnp.array(0, jnp.int32), jnp.zeros((b, k, L), jnp.int32), alive_logp,
             jnp.zeros((b, k, L), jnp.int32), cache,
             jnp.zeros((b, k, L), jnp.int32), jnp.full((b, k), NEG_INF, jnp.float32),
             jnp.zeros((b,), bool))
    *_, fin_seq, fin_score, _ = phased_while_loop(cond, body, carry, phases, cache_at=4)
    return fin_seq[:, :o.n_best], fin_score[:, :o.n_best]
