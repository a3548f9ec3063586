"""Each logits processor and sampling warper against a small numpy reference written from
Hugging Face's definitions (sequences start with the decoder start token, id 0), and
against Hugging Face's own classes where torch is installed."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from jaxmt.config import DecodeConfig
from jaxmt.data.vocab import EOS_ID
from jaxmt.modeling import logits_processing as lp
from jaxmt.modeling.logits_processing import NEG_INF

V, L = 12, 10


def _opts(**kw) -> DecodeConfig:
    """Every processor off unless ``kw`` turns it on."""
    return DecodeConfig(**{"no_repeat_ngram_size": 0, "suppressed_ids": (), **kw})


def _case(seed=0, rows=4, step=7, vocab=6):
    """Random scores [rows, V], sequences [rows, L] from a small alphabet (so n-grams
    repeat) with junk after ``step``, which no processor may read."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(0, 2, (rows, V)).astype(np.float32)
    seq = rng.integers(0, vocab, (rows, L)).astype(np.int32)
    seq[:, step:] = rng.integers(0, V, (rows, L - step))
    return scores, seq


def _ref_banned_ngram(gen, n):
    """Hugging Face's rule on [start] + gen: the ids after every earlier occurrence of the
    last n - 1 tokens."""
    full = [0] + [int(t) for t in gen]
    if len(full) < n:
        return set()
    seen = {}
    for gram in zip(*[full[i:] for i in range(n)]):
        seen.setdefault(gram[:-1], set()).add(gram[-1])
    return seen.get(tuple(full[len(full) - n + 1:]), set())


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("step", [0, 1, 2, 3, 7, L])
def test_no_repeat_bans_exactly_the_completing_ids(n, step):
    scores, seq = _case(seed=n * 31 + step, step=step, vocab=3)
    got = np.asarray(lp.no_repeat_ngram(jnp.asarray(scores), jnp.asarray(seq), step, n))
    for r in range(len(seq)):
        banned = _ref_banned_ngram(seq[r, :step], n)
        want = np.where(np.isin(np.arange(V), list(banned)), NEG_INF, scores[r])
        np.testing.assert_array_equal(got[r], want, err_msg=f"row {r}: {seq[r, :step]}")


def test_no_repeat_start_token_matters_only_when_id_0_recurs():
    """n=2 after [5, 0]: Hugging Face's sequence [0, 5, 0] holds the bigram (0, 5), so 5
    is banned; without id 0 in the output, the start token bans nothing."""
    scores = jnp.zeros((2, V))
    seq = jnp.array([[5, 0] + [0] * (L - 2), [5, 6] + [0] * (L - 2)], jnp.int32)
    got = np.asarray(lp.no_repeat_ngram(scores, seq, 2, 2))
    assert np.flatnonzero(got[0] < 0).tolist() == [5]
    assert np.flatnonzero(got[1] < 0).tolist() == []


@pytest.mark.parametrize("step", [0, 3, L])
def test_repetition_penalty_signs_and_seen_ids(step):
    scores, seq = _case(seed=step, step=step)
    p = 1.7
    got = np.asarray(lp.repetition_penalty(jnp.asarray(scores), jnp.asarray(seq), step, p))
    for r in range(len(seq)):
        seen = {0} | set(seq[r, :step].tolist())  # the start token counts as seen
        for t in range(V):
            s = scores[r, t]
            want = (s * p if s < 0 else s / p) if t in seen else s
            np.testing.assert_allclose(got[r, t], want, rtol=1e-6)
    # A penalty always lowers a seen id's score (or leaves 0 at 0).
    assert np.all(got <= np.maximum(scores, 0) + 1e-6)


def test_min_len_forced_eos_and_suppressed_ids():
    rows = 3
    scores = np.random.default_rng(1).normal(size=(rows, V)).astype(np.float32)
    seq = np.zeros((rows, L), np.int32)
    max_len = jnp.array([3, 5, 9])
    o = _opts(min_len=5, forced_eos=True, suppressed_ids=(4, 7))
    for step in range(L):
        got = np.asarray(lp.process(jnp.asarray(scores), jnp.asarray(seq), step, max_len, o))
        for r in range(rows):
            length, m = step + 1, int(max_len[r])
            want = scores[r].copy()
            want[[4, 7]] = NEG_INF
            if length < min(5, m):  # a row never has to end before its own maximum
                want[EOS_ID] = NEG_INF
            if length == m:  # the last position a row may take: EOS only, scored 0
                want[:] = NEG_INF
                want[EOS_ID] = 0.0
            np.testing.assert_array_equal(got[r], want, err_msg=f"step {step} row {r}")


def test_everything_off_is_the_identity_and_order_is_hugging_faces():
    scores, seq = _case(seed=5)
    s, q = jnp.asarray(scores), jnp.asarray(seq)
    m = jnp.full((len(seq),), L)
    assert lp.process(s, q, 7, m, _opts()) is s  # nothing traced when all are off
    o = _opts(repetition_penalty=1.3, no_repeat_ngram_size=2, suppressed_ids=(3,), min_len=9)
    want = lp.repetition_penalty(s, q, 7, 1.3)
    want = lp.no_repeat_ngram(want, q, 7, 2)
    want = jnp.where(jnp.arange(V) == 3, NEG_INF, want)
    want = jnp.where(jnp.arange(V) == EOS_ID, NEG_INF, want)
    np.testing.assert_array_equal(lp.process(s, q, 7, m, o), want)


def test_mask_unused():
    s = jnp.ones((2, V))
    assert lp.mask_unused(s, None) is s and lp.mask_unused(s, V) is s
    got = np.asarray(lp.mask_unused(s, 5))
    assert (got[:, :5] == 1).all() and (got[:, 5:] == NEG_INF).all()


def _ref_top_p(logits, p):
    """Hugging Face's nucleus: drop the ascending prefix whose mass is <= 1 - p, keep
    the best id always."""
    out = logits.copy()
    for r, row in enumerate(logits):
        order = np.argsort(row, kind="stable")
        probs = np.exp(row[order] - row.max())
        cum = np.cumsum(probs / probs.sum())
        cut = cum <= 1 - p
        cut[-1] = False
        out[r, order[cut]] = NEG_INF
    return out


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.6), (0.7, 4, 0.8),
    (1.0, 0, 1e-6), (2.0, 1, 1.0)])
def test_warpers_match_reference(temperature, top_k, top_p):
    logits = np.random.default_rng(3).normal(0, 2, (5, V)).astype(np.float32)
    # Ids tied with the k-th best are all kept (Hugging Face cuts with "<").
    logits[0, np.argsort(logits[0])[-4]] = np.sort(logits[0])[-3]
    o = _opts(strategy="sample", temperature=temperature, top_k=top_k, top_p=top_p)
    got = np.asarray(lp.warp(jnp.asarray(logits), o))
    want = logits / temperature
    if top_k:
        kth = np.sort(want, axis=1)[:, -top_k][:, None]
        want = np.where(want < kth, NEG_INF, want)
    if top_p < 1:
        want = _ref_top_p(want, top_p)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    kept = (got > NEG_INF / 2).sum(1)
    assert (kept >= 1).all()
    if top_p <= 1e-6 or top_k == 1:  # only the best survives (bar exact ties)
        assert (got.argmax(1) == logits.argmax(1)).all() and (kept == 1).all()


@pytest.mark.slow  # imports torch and transformers
def test_processors_match_hugging_face():
    """The same scores through Hugging Face's processors (start token prepended, ``-inf``
    for :data:`NEG_INF`), at every step and for each option alone and together."""
    torch = pytest.importorskip("torch")
    hf = pytest.importorskip("transformers.generation.logits_process")
    max_len = 8  # jaxmt's longest output = Hugging Face's max_length - 1
    cases = [dict(repetition_penalty=1.5), dict(no_repeat_ngram_size=2),
             dict(no_repeat_ngram_size=3), dict(suppressed_ids=(2, 5)), dict(min_len=4),
             dict(forced_eos=True),
             dict(repetition_penalty=0.8, no_repeat_ngram_size=2, min_len=3, forced_eos=True)]
    for kw, step in itertools.product(cases, range(max_len)):
        scores, seq = _case(seed=step, step=step, vocab=3)
        o = _opts(**kw)
        procs = hf.LogitsProcessorList()
        if o.repetition_penalty != 1:
            procs.append(hf.RepetitionPenaltyLogitsProcessor(o.repetition_penalty))
        if o.no_repeat_ngram_size:
            procs.append(hf.NoRepeatNGramLogitsProcessor(o.no_repeat_ngram_size))
        if o.suppressed_ids:
            procs.append(hf.NoBadWordsLogitsProcessor([[i] for i in o.suppressed_ids],
                                                      eos_token_id=EOS_ID))
        if o.min_len > 1:
            procs.append(hf.MinLengthLogitsProcessor(o.min_len, EOS_ID))
        if o.forced_eos:
            procs.append(hf.ForcedEOSTokenLogitsProcessor(max_len + 1, EOS_ID))
        ids = torch.tensor(np.concatenate([np.zeros((len(seq), 1), np.int64),
                                           seq[:, :step]], 1))
        want = procs(ids, torch.tensor(scores)).numpy()
        got = np.asarray(lp.process(jnp.asarray(scores), jnp.asarray(seq), step,
                                    jnp.full((len(seq),), max_len), o))
        want = np.where(np.isneginf(want), NEG_INF, want)
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=f"{kw} step {step}")
    for kw in (dict(temperature=0.7), dict(top_k=3), dict(top_p=0.6),
               dict(temperature=1.3, top_k=5, top_p=0.8)):
        o = _opts(strategy="sample", **kw)
        procs = hf.LogitsProcessorList()
        if o.temperature != 1:
            procs.append(hf.TemperatureLogitsWarper(o.temperature))
        if o.top_k:
            procs.append(hf.TopKLogitsWarper(o.top_k))
        if o.top_p < 1:
            procs.append(hf.TopPLogitsWarper(o.top_p))
        scores, _ = _case(seed=11)
        want = procs(torch.zeros((len(scores), 1), dtype=torch.long), torch.tensor(scores))
        want = np.where(np.isneginf(want.numpy()), NEG_INF, want.numpy())
        np.testing.assert_allclose(np.asarray(lp.warp(jnp.asarray(scores), o)), want,
                                   rtol=1e-6, err_msg=str(kw))
