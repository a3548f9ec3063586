"""One decoding step's score processors and sampling warpers, shared by all decoders.

Each follows the Hugging Face ``transformers`` class of the same purpose (its
``generation/logits_process.py``), in the order ``generate`` applies them:

1. repetition penalty (``RepetitionPenaltyLogitsProcessor``, CTRL): a token already in
   the sequence has its score multiplied by ``p`` when negative, divided by it otherwise;
2. no repeated n-gram (``NoRepeatNGramLogitsProcessor``): a token that would complete an
   n-gram already in the sequence is banned;
3. suppressed ids (``NoBadWordsLogitsProcessor`` with single-token bad words);
4. minimum length (``MinLengthLogitsProcessor``): EOS is banned while the output would be
   shorter than ``min_len`` tokens, EOS included;
5. forced EOS (``ForcedEOSTokenLogitsProcessor``): at the last position a row may take,
   every id but EOS is banned and EOS scores 0.

and then, when sampling only, the warpers: temperature, top-k, top-p.

Hugging Face's sequences start with the decoder start token, which is jaxmt's PAD id 0.
The processors here see the same sequence (a virtual 0 before the generated tokens), so
the repetition penalty always counts id 0 as seen and a 1-gram ban always bans id 0.
For ``n >= 2`` the start token changes the banned set only when id 0 is generated again
later (an n-gram starting at the start token then matches): rare, but parity is exact.

Beam search applies the processors to log-softmaxed scores, greedy decoding and sampling
to raw logits (Hugging Face's order). A banned score is the finite :data:`NEG_INF` (never
``-inf``, so sums and differences of banned scores never make NaNs). Whatever the
options turn off is skipped when tracing, so it costs nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmt.config import DecodeConfig
from jaxmt.data.vocab import EOS_ID, PAD_ID

NEG_INF = -1e9
START_ID = PAD_ID  # the decoder start token, the first token of Hugging Face's sequences


def mask_unused(logits: jax.Array, num_ids: int | None) -> jax.Array:
    """``logits`` [rows, v] with ids ``>= num_ids`` (vocabulary rows no piece uses) banned.

    Applied before any softmax: these ids are not part of the model's distribution.
    """
    v = logits.shape[-1]
    if num_ids is None or num_ids >= v:
        return logits
    return jnp.where(jnp.arange(v) < num_ids, logits, NEG_INF)


def _with_start(seq: jax.Array, step: jax.Array) -> jax.Array:
    """[rows, L + 1]: the start token, then ``seq``'s first ``step`` tokens, then the start
    token again in the positions not generated yet (id 0 is always seen anyway)."""
    pos = jnp.arange(seq.shape[1])
    gen = jnp.where(pos < step, seq, START_ID)  # [rows, L]
    return jnp.concatenate([jnp.full((seq.shape[0], 1), START_ID, seq.dtype), gen], axis=1)


def _scatter_mask(rows_v: tuple[int, int], tokens: jax.Array, hit: jax.Array) -> jax.Array:
    """[rows, v] bool: True at ``(r, tokens[r, j])`` wherever ``hit[r, j]``."""
    rows, v = rows_v
    r = jnp.broadcast_to(jnp.arange(rows)[:, None], tokens.shape)  # [rows, n]
    return jnp.zeros((rows, v), jnp.int32).at[r, tokens].max(hit.astype(jnp.int32)) > 0


def repetition_penalty(scores: jax.Array, seq: jax.Array, step: jax.Array,
                       penalty: float) -> jax.Array:
    """CTRL's penalty on the ids already in each row's sequence (start token included).

    Args:
        scores: [rows, v] this step's scores.
        seq: [rows, L] generated ids; only the first ``step`` count.
        step: tokens generated so far (a scalar).
        penalty: ``> 1`` discourages repeats; a negative score is multiplied by it, a
            non-negative one divided.

    Returns:
        [rows, v] penalised scores.
    """
    full = _with_start(seq, step)  # [rows, L + 1]
    seen = _scatter_mask(scores.shape, full, jnp.ones(full.shape, bool))  # [rows, v]
    return jnp.where(seen, jnp.where(scores < 0, scores * penalty, scores / penalty), scores)


def no_repeat_ngram(scores: jax.Array, seq: jax.Array, step: jax.Array, n: int) -> jax.Array:
    """Bans every id that would complete an n-gram already in the row's sequence.

    The sequence is the start token then the ``step`` generated ids; the candidate n-gram
    is its last ``n - 1`` tokens plus the next id. Every n-gram start ``p`` is compared
    at once through a fixed window, so no loop runs over the steps.

    Args:
        scores: [rows, v] this step's scores.
        seq: [rows, L] generated ids; only the first ``step`` count.
        step: tokens generated so far (a scalar).
        n: the n-gram size (>= 1).

    Returns:
        [rows, v] scores, banned ids at :data:`NEG_INF`.
    """
    full = _with_start(seq, step)  # [rows, T], T = L + 1
    rows, t = full.shape
    starts = t - n + 1  # n-gram start positions that fit in the buffer
    if starts <= 0:
        return scores
    cur = step + 1  # tokens in the sequence, start token included
    match = jnp.broadcast_to(jnp.arange(starts) <= cur - n, (rows, starts))  # [rows, P]:
    # the whole n-gram is already there; for n = 1 every seen id is banned.
    if n > 1:
        # The last n - 1 tokens: [rows, n - 1] (when cur < n no start p is valid anyway).
        prefix = jax.lax.dynamic_slice_in_dim(full, jnp.maximum(cur - n + 1, 0), n - 1, axis=1)
        # windows[r, p, j] = full[r, p + j]: each n-gram's first n - 1 tokens, [rows, P, n-1].
        windows = jnp.stack([full[:, j:j + starts] for j in range(n - 1)], axis=-1)
        match &= jnp.all(windows == prefix[:, None, :], axis=-1)
    last = full[:, n - 1:n - 1 + starts]  # [rows, P]: each n-gram's last token
    return jnp.where(_scatter_mask(scores.shape, last, match), NEG_INF, scores)


def needs_sequence(options: DecodeConfig) -> bool:
    """Whether :func:`process` reads the generated ids (else ``seq`` may be anything)."""
    return options.no_repeat_ngram_size > 0 or options.repetition_penalty != 1.0


def process(scores: jax.Array, seq: jax.Array, step: jax.Array, max_len: jax.Array,
            options: DecodeConfig) -> jax.Array:
    """All the processors ``options`` turn on, in Hugging Face's order.

    Args:
        scores: [rows, v] this step's scores: log-probabilities (beam search) or logits.
        seq: [rows, L] each row's generated ids; positions ``>= step`` are ignored.
        step: tokens generated so far (a scalar int): the next token is at position
            ``step`` and makes an output of ``step + 1`` tokens.
        max_len: [rows] each row's longest output, EOS included.
        options: which processors run (static).

    Returns:
        [rows, v] processed scores.
    """
    o = options
    rows, v = scores.shape
    ids = jnp.arange(v)
    length = step + 1  # the output's length if it takes its token now
    if o.repetition_penalty != 1.0:
        scores = repetition_penalty(scores, seq, step, o.repetition_penalty)
    if o.no_repeat_ngram_size > 0:
        scores = no_repeat_ngram(scores, seq, step, o.no_repeat_ngram_size)
    if o.suppressed_ids:
        banned = jnp.isin(ids, jnp.asarray(o.suppressed_ids, jnp.int32))  # [v]
        scores = jnp.where(banned, NEG_INF, scores)
    if o.min_len > 1:
        # A row never has to end before its own longest output.
        short = length < jnp.minimum(o.min_len, max_len)  # [rows]
        scores = jnp.where(short[:, None] & (ids == EOS_ID), NEG_INF, scores)
    if o.forced_eos:
        last = (length == max_len)[:, None]  # [rows, 1]
        scores = jnp.where(last, jnp.where(ids == EOS_ID, 0.0, NEG_INF), scores)
    return scores


def warp(logits: jax.Array, options: DecodeConfig) -> jax.Array:
    """Sampling's temperature, top-k and top-p (nucleus) warpers, Hugging Face's order.

    Top-k keeps the ``k`` best ids and any tied with the k-th; top-p keeps the fewest best
    ids whose probabilities sum past ``top_p``, and always the best one
    (``min_tokens_to_keep=1``).

    Args:
        logits: [rows, v] processed logits.
        options: temperature, top_k (0: off), top_p (1: off) (static).

    Returns:
        [rows, v] logits to sample from; cut ids at :data:`NEG_INF`.
    """
    o = options
    if o.temperature != 1.0:
        logits = logits / o.temperature
    if o.top_k > 0:
        k = min(o.top_k, logits.shape[-1])
        kth = jax.lax.top_k(logits, k)[0][:, -1:]  # [rows, 1]
        logits = jnp.where(logits < kth, NEG_INF, logits)
    if o.top_p < 1.0:
        order = jnp.argsort(logits, axis=-1)  # [rows, v] ascending
        asc = jnp.take_along_axis(logits, order, axis=-1)  # [rows, v]
        cum = jnp.cumsum(jax.nn.softmax(asc, axis=-1), axis=-1)  # [rows, v]
        cut = (cum <= 1.0 - o.top_p).at[:, -1].set(False)  # [rows, v]: keep the best
        cut = _scatter_mask(logits.shape, order, cut)  # back to vocabulary order
        logits = jnp.where(cut, NEG_INF, logits)
    return logits
