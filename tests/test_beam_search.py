"""Beam search over the KV cache: exact against brute force where the beam holds every
prefix, beam 1 equals greedy, length limits per row, shared and moved caches, scanned
layers, the growing cache, the blocked top-k."""

import dataclasses
import functools
import itertools

import jax
import numpy as np
import pytest
from greedy_reference import tiny_decode_setup

from jaxmt.config import AttentionConfig, DecodeConfig, ModelConfig
from jaxmt.modeling.beam_search import NEG_INF, beam_search, length_penalty, top_k_blocked
from jaxmt.modeling.decoding import EOS_ID, cache_phases, greedy_decode, sample_decode
from jaxmt.modeling.model import EncoderDecoderModel
from jaxmt.modeling.network import stack_layers

CFG = ModelConfig(vocab_size=64, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=48,
                  num_encoder_layers=2, num_decoder_layers=2, precision="fp32")
NUM_IDS = 4  # ids 0, 1 (EOS), 2, 3: few enough to enumerate every output


def _opts(**kw) -> DecodeConfig:
    """Beam search alone: no n-gram blocking, no length cap but the cache's."""
    return DecodeConfig(**{"no_repeat_ngram_size": 0, "max_len_a": 0.0, "max_len_b": 1 << 30,
                           "suppressed_ids": (),
                           **kw})


@pytest.fixture(scope="module")
def setup():
    return tiny_decode_setup(CFG, 3)


@functools.cache
def _jitted_logits(model):
    return jax.jit(model.logits)


def _brute_force(model, params, src, length, kind, alpha):
    """Every output (ids < NUM_IDS): ending in EOS within ``length`` tokens, or cut off
    at ``length`` without one; with its length-penalised teacher-forced log-probability,
    best first."""
    others = [t for t in range(NUM_IDS) if t != EOS_ID]
    seqs = [list(p) + [EOS_ID] for n in range(length) for p in itertools.product(others, repeat=n)]
    seqs += [list(p) for p in itertools.product(others, repeat=length)]
    tgt = np.zeros((len(seqs), length), np.int32)
    for r, s in enumerate(seqs):
        tgt[r, :len(s)] = s
    dec_in = np.concatenate([np.zeros((len(seqs), 1), np.int32), tgt[:, :-1]], 1)
    enc = np.repeat(src[None], len(seqs), 0)
    lengths = np.array([len(s) for s in seqs])
    batch = dict(encoder_input_tokens=enc, encoder_segment_ids=(enc > 0).astype(np.int32),
                 decoder_input_tokens=dec_in, decoder_target_tokens=tgt,
                 decoder_segment_ids=np.ones_like(tgt),
                 decoder_loss_weights=(np.arange(length)[None] < lengths[:, None]).astype(np.float32))
    # Only ids < NUM_IDS may be generated: renormalise over them, as the search does.
    # Jitted (one program for every call: the batches share their shapes); op by op,
    # each primitive compiled on its own.
    logits = np.asarray(_jitted_logits(model)(params, batch), np.float64)[..., :NUM_IDS]
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    tok_logp = np.take_along_axis(logp, tgt[..., None], -1)[..., 0]
    total = (tok_logp * batch["decoder_loss_weights"]).sum(1)
    scores = total / np.asarray(length_penalty(lengths, kind, alpha))
    order = np.argsort(-scores, kind="stable")
    return [tuple(seqs[i]) for i in order], scores[order]


def _hyps(ids, limit=None):
    """Hypotheses up to their EOS, or ``limit`` tokens (the row's longest) without one."""
    out = []
    for row in np.asarray(ids):
        end = list(row).index(EOS_ID) + 1 if EOS_ID in row else (limit or len(row))
        out.append(tuple(int(t) for t in row[:end]))
    return out


@pytest.mark.parametrize("kind,alpha", [("gnmt", 0.6), ("power", 1.0), ("none", 0.0)])
def test_beam_holding_every_prefix_is_exact(setup, kind, alpha):
    """With 3 non-EOS ids and outputs of at most 3 tokens there are 9 prefixes of length 2,
    and 12 candidates at step 2 (3 prefixes x 4 ids). A candidate can finish only among
    its step's best ``beam_size`` (Hugging Face's and fairseq's rule), so 12 beams keep
    every prefix and let every step-2 candidate finish; at step 3 all candidates have
    one length, and the best 5 are among the best 12. The n-best list must be the
    brute-force top 5 of all 40 outputs (13 ending in EOS, 27 cut off at 3 tokens), in
    order, with the same scores."""
    model, params, enc = setup
    length, n = 3, 5
    opts = _opts(beam_size=12, n_best=n, length_penalty=kind, alpha=alpha,
                 early_stopping="never")
    ids, scores = beam_search(model.module, params, enc, length, NUM_IDS, opts)
    for r in range(enc.shape[0]):
        want_seqs, want_scores = _brute_force(model, params, enc[r], length, kind, alpha)
        assert _hyps(ids[r]) == want_seqs[:n], (r, kind)
        np.testing.assert_allclose(np.asarray(scores[r]), want_scores[:n], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_beam_one_without_penalty_is_greedy(setup):
    model, params, enc = setup
    want = np.asarray(greedy_decode(model.module, params, enc, 12, None))
    for stop in ("never", "heuristic", "first"):
        opts = _opts(beam_size=1, length_penalty="none", early_stopping=stop)
        ids, _ = beam_search(model.module, params, enc, 12, None, opts)
        np.testing.assert_array_equal(np.asarray(ids[:, 0]), want, err_msg=stop)


def test_lengths_per_row_and_min_len(setup):
    """Row limits follow the source length (a * src_len + b); no output is shorter than
    min_len; one without EOS is exactly its row's longest; scores come best first."""
    model, params, enc = setup
    src_len = (enc > 0).sum(1)  # 9, 5, 9
    opts = _opts(beam_size=3, n_best=3, max_len_a=0.5, max_len_b=2, min_len=3)
    ids, scores = beam_search(model.module, params, enc, 16, None, opts)
    limit = np.floor(0.5 * src_len + 2).astype(int)  # 6, 4, 6
    for r in range(enc.shape[0]):
        hyps = _hyps(ids[r], limit[r])
        assert all(3 <= len(h) <= limit[r] for h in hyps), (r, hyps, limit[r])
        assert all(h[-1] == EOS_ID or len(h) == limit[r] for h in hyps), (r, hyps)
        assert not np.asarray(ids[r])[:, limit[r]:].any()  # nothing past the row's limit
        s = np.asarray(scores[r])
        assert np.all(s > NEG_INF / 2) and np.all(np.diff(s) <= 1e-6), s


@pytest.mark.slow
def test_cache_reorders_agree_and_scanned_layers_match(setup):
    model, params, enc = setup
    opts = _opts(beam_size=4, n_best=2)
    ids, scores = beam_search(model.module, params, enc, 10, None, opts)  # auto: shared
    for how in ("gather", "one_hot"):  # the cache moved after the beams instead
        ids_m, scores_m = beam_search(model.module, params, enc, 10, None,
                                      dataclasses.replace(opts, cache_reorder=how))
        np.testing.assert_array_equal(np.asarray(ids_m), np.asarray(ids))
        np.testing.assert_allclose(np.asarray(scores_m), np.asarray(scores), rtol=1e-5,
                                   atol=1e-6)
    scanned = EncoderDecoderModel(dataclasses.replace(CFG, scan_layers=True))
    ids_s, scores_s = beam_search(scanned.module, stack_layers(params), enc, 10, None, opts)
    np.testing.assert_array_equal(np.asarray(ids_s), np.asarray(ids))
    np.testing.assert_allclose(np.asarray(scores_s), np.asarray(scores), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("decoder", ["local", "performer"])
def test_every_decoder_attention_follows_its_beams(decoder):
    """A local-window decoder's shared caches give what moving the cache gives; a
    Performer decoder (FAVOR+ over its own cache) moves its cache under ``auto``, the
    same both ways, and asking it for shared caches is a clear error."""
    cfg = dataclasses.replace(CFG, attention=AttentionConfig(decoder=decoder, window=2))
    model, params, enc = tiny_decode_setup(cfg, 3)
    opts = _opts(beam_size=3, n_best=2)
    ids, scores = beam_search(model.module, params, enc, 8, None, opts)
    other = "one_hot" if decoder == "performer" else "gather"
    ids_m, scores_m = beam_search(model.module, params, enc, 8, None,
                                  dataclasses.replace(opts, cache_reorder=other))
    np.testing.assert_array_equal(np.asarray(ids_m), np.asarray(ids))
    np.testing.assert_allclose(np.asarray(scores_m), np.asarray(scores), rtol=1e-5, atol=1e-6)
    if decoder == "performer":
        with pytest.raises(ValueError, match="shared beam caches need softmax attention"):
            beam_search(model.module, params, enc, 8, None,
                        dataclasses.replace(opts, cache_reorder="shared"))


@pytest.mark.slow
def test_a_growing_cache_changes_nothing(setup):
    """Decode loops grow their cache through [L/4, L/2, L]: a 64-position cache (three
    phases) gives what a 63-position one (a single phase) gives, beam and greedy, for
    outputs forced through every phase."""
    assert cache_phases(64) == (16, 32, 64) and cache_phases(63) == (63,)
    assert cache_phases(16) == (16,)
    model, params, enc = setup
    for opts in (_opts(beam_size=3, n_best=2, min_len=40, max_len_b=40),
                 _opts(strategy="greedy", min_len=40, max_len_b=40)):
        run = beam_search if opts.strategy == "beam" else sample_decode
        ids, scores = run(model.module, params, enc, 64, None, opts)
        ids_1, scores_1 = run(model.module, params, enc, 63, None, opts)
        np.testing.assert_array_equal(np.asarray(ids)[..., :63], np.asarray(ids_1))
        assert not np.asarray(ids)[..., 40:].any()
        np.testing.assert_allclose(np.asarray(scores), np.asarray(scores_1), rtol=1e-5)


def test_blocked_top_k_equals_top_k_ties_included():
    """The two-pass top-k gives top_k's values and indices, the lower index first among
    ties (values rounded to a few levels, and rows of one value as a masked beam has)."""
    import jax

    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 4 * 2048)).astype(np.float32)
    x[:3] = np.round(x[:3] * 2) / 2  # many ties
    x[3] = NEG_INF  # a row with nothing but the masked value
    x[4, :2048] = NEG_INF  # the first block of candidates masked
    for n in (1, 8):
        want_v, want_i = jax.lax.top_k(x, n)
        got_v, got_i = top_k_blocked(x, n)
        np.testing.assert_array_equal(np.asarray(got_v), np.asarray(want_v))
        np.testing.assert_array_equal(np.asarray(got_i), np.asarray(want_i))


@pytest.mark.slow
def test_canonical_stopping_is_never_worse(setup):
    """The canonical rule searches until no alive beam can win, so its best score is at
    least that of the rules that stop earlier."""
    model, params, enc = setup
    best = {}
    for stop in ("never", "heuristic", "first"):
        _, scores = beam_search(model.module, params, enc, 12, None,
                                _opts(beam_size=2, alpha=1.0, early_stopping=stop))
        best[stop] = np.asarray(scores[:, 0])
    assert np.all(best["never"] >= best["heuristic"] - 1e-6), best
    assert np.all(best["never"] >= best["first"] - 1e-6), best


@pytest.mark.parametrize("bad,field", [
    (dict(beam_size=0), "beam_size"), (dict(beam_size=2, n_best=3), "n_best"),
    (dict(length_penalty="wu"), "length_penalty"), (dict(early_stopping="yes"), "early_stopping"),
    (dict(cache_reorder="scatter"), "cache_reorder"), (dict(min_len=0), "min_len")])
def test_bad_options_name_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        _opts(**bad)
