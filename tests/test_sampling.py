"""Greedy decoding and sampling with DecodeConfig (``decoding.sample_decode``) on a tiny
random model: plain greedy equals ``greedy_decode``, top-k 1 and a tiny top-p equal
greedy, seeds, scores, length rules, and no repeated n-grams (beam search too)."""

import jax
import numpy as np
import pytest
from greedy_reference import tiny_decode_setup

from jaxmt.config import DecodeConfig, ModelConfig
from jaxmt.modeling.beam_search import beam_search
from jaxmt.modeling.decoding import EOS_ID, greedy_decode, sample_decode

CFG = ModelConfig(vocab_size=64, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=48,
                  num_encoder_layers=1, num_decoder_layers=1, precision="fp32")  # fast compiles
L = 24  # the cache length
NUM_IDS = 60  # ids 60..63 unused, as with a vocabulary smaller than the model's


def _opts(**kw) -> DecodeConfig:
    """Greedy with every processor off and no length cap but the cache's."""
    return DecodeConfig(**{"strategy": "greedy", "no_repeat_ngram_size": 0,
                           "max_len_a": 0.0, "max_len_b": 1 << 30, "suppressed_ids": (), **kw})


@pytest.fixture(scope="module")
def setup():
    return tiny_decode_setup(CFG, 4)


def _decode(setup, opts, rng=None, max_decode_len=L):
    model, params, enc = setup
    ids, scores = sample_decode(model.module, params, enc, max_decode_len, NUM_IDS, opts, rng)
    return np.asarray(ids), np.asarray(scores)


def _lengths(ids, max_len):
    """[..., n] output lengths: through the first EOS, else the row's longest output."""
    has = (ids == EOS_ID).any(-1)
    return np.where(has, (ids == EOS_ID).argmax(-1) + 1, max_len)


def _max_len(enc, opts):
    src = (enc > 0).sum(1)
    return np.clip(np.floor(opts.max_len_a * src + opts.max_len_b), 1, L).astype(int)


def _teacher_forced_logp(setup, ids, lengths):
    """[b, n] the model's log-probabilities (over ids < NUM_IDS) of ``ids`` [b, n, L]."""
    model, params, enc = setup
    b, n, _ = ids.shape
    tgt = ids.reshape(b * n, L)
    src = np.repeat(enc, n, 0)
    dec_in = np.concatenate([np.zeros((b * n, 1), np.int32), tgt[:, :-1]], 1)
    logits = np.asarray(jax.jit(model.logits)(params, dict(
        encoder_input_tokens=src, encoder_segment_ids=(src > 0).astype(np.int32),
        decoder_input_tokens=dec_in, decoder_segment_ids=np.ones_like(dec_in))), np.float64)
    logits = logits[..., :NUM_IDS]
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    tok = np.take_along_axis(logp, tgt[..., None], -1)[..., 0]  # [b*n, L]
    mask = np.arange(L)[None] < lengths.reshape(-1, 1)
    return (tok * mask).sum(1).reshape(b, n)


def _ngrams(row, n):
    return [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]


def test_plain_greedy_equals_greedy_decode_and_scores_are_log_probs(setup):
    model, params, enc = setup
    want = np.asarray(greedy_decode(model.module, params, enc, L, NUM_IDS))
    ids, scores = _decode(setup, _opts())
    assert ids.shape == (4, 1, L) and scores.shape == (4, 1)
    np.testing.assert_array_equal(ids[:, 0], want)
    np.testing.assert_allclose(scores, _teacher_forced_logp(setup, ids, _lengths(ids, L)),
                               rtol=1e-4, atol=1e-4)


def test_top_k_one_and_tiny_top_p_sample_greedily(setup):
    """With the same processors and lengths, every sample is the greedy output."""
    common = dict(no_repeat_ngram_size=2, max_len_a=1.5, max_len_b=3, min_len=3)
    greedy, g_scores = _decode(setup, _opts(**common))
    for cut in (dict(top_k=1, temperature=0.3), dict(top_p=1e-6)):
        opts = _opts(strategy="sample", num_decodes=3, n_best=3, **common, **cut)
        ids, scores = _decode(setup, opts, jax.random.PRNGKey(1))
        np.testing.assert_array_equal(ids, np.repeat(greedy, 3, 1), err_msg=str(cut))
        np.testing.assert_allclose(scores, np.repeat(g_scores, 3, 1), rtol=1e-6)


def test_seeds_and_sorted_scored_samples(setup):
    model, params, enc = setup
    opts = _opts(strategy="sample", num_decodes=6, n_best=6, temperature=1.5, seed=3)
    a, sa = _decode(setup, opts, jax.random.PRNGKey(3))
    b, _ = _decode(setup, opts, jax.random.PRNGKey(3))
    c, _ = _decode(setup, opts, jax.random.PRNGKey(4))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    # Through the model: the default key is PRNGKey(seed); n_best keeps the best first.
    d, sd = model.predict_batch_with_aux(params, {"encoder_input_tokens": enc}, opts, L,
                                         NUM_IDS)
    np.testing.assert_array_equal(np.asarray(d), a)
    np.testing.assert_allclose(np.asarray(sd), sa)
    assert (np.diff(sa, axis=1) <= 0).all()  # best first
    assert len({tuple(r) for r in a.reshape(-1, L).tolist()}) > len(enc)  # samples differ
    np.testing.assert_allclose(sa, _teacher_forced_logp(setup, a, _lengths(a, L)),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strategy,forced", [("greedy", False), ("sample", True)])
def test_length_rules(setup, strategy, forced):
    """Outputs stop at ``a * src + b`` tokens: without forced EOS a row reaching it is cut
    off there (no EOS); with it, the last token is EOS. No EOS before ``min_len``."""
    _, _, enc = setup
    n = 1 if strategy == "greedy" else 4
    opts = _opts(strategy=strategy, num_decodes=n, n_best=n, max_len_a=0.5, max_len_b=2,
                 min_len=4, forced_eos=forced, suppressed_ids=(0,))
    ids, _ = _decode(setup, opts, jax.random.PRNGKey(0))
    max_len = _max_len(enc, opts)[:, None]  # [b, 1]
    lengths = _lengths(ids, max_len)
    assert (lengths <= max_len).all() and (lengths >= np.minimum(4, max_len)).all()
    pos = np.arange(L)
    assert (ids[pos >= lengths[..., None]] == 0).all()  # padding after each output
    ends_eos = (ids == EOS_ID).any(-1)
    if forced:
        assert ends_eos.all()
    else:  # a cut-off output fills its max_len (0 is suppressed, so never padding)
        last = np.take_along_axis(ids, np.broadcast_to(max_len - 1, lengths.shape)[..., None],
                                  -1)[..., 0]  # [b, n]
        assert (last[~ends_eos] > 0).all() and (~ends_eos).any()


def test_no_repeat_ngram_output_never_repeats(setup):
    """The random model loops (n-grams repeat without the option); with it, no n-gram
    appears twice in any output, greedy or sampled (low temperature: loops likely)."""
    free, _ = _decode(setup, _opts())
    for n in (2, 3):
        assert any(len(set(g)) < len(g) for g in (_ngrams(r, n) for r in free[:, 0].tolist()))
    for n, opts in ((3, _opts(no_repeat_ngram_size=3)),
                    (2, _opts(strategy="sample", num_decodes=4, n_best=4, temperature=0.5,
                              no_repeat_ngram_size=2))):
        ids, _ = _decode(setup, opts, jax.random.PRNGKey(2))
        lengths = _lengths(ids, L)
        for row, length in zip(ids.reshape(-1, L).tolist(), lengths.reshape(-1)):
            grams = _ngrams([0] + row[:length], n)  # the start token counts (Hugging Face)
            assert len(set(grams)) == len(grams), (opts.strategy, row[:length])


def test_beam_search_no_repeat_bigram(setup):
    model, params, enc = setup
    opts = DecodeConfig(beam_size=3, n_best=3, no_repeat_ngram_size=2, max_len_a=0.0,
                        max_len_b=L)
    ids, scores = beam_search(model.module, params, enc, L, NUM_IDS, opts)
    ids, scores = np.asarray(ids), np.asarray(scores)
    lengths = _lengths(ids, L)
    for row, length, score in zip(ids.reshape(-1, L).tolist(), lengths.reshape(-1),
                                  scores.reshape(-1)):
        if score > -1e8:  # a real hypothesis
            grams = _ngrams([0] + row[:length], 2)
            assert len(set(grams)) == len(grams), row[:length]
