"""Beam search, n-best lists and sampling of imported checkpoints against the reference.

Tiny random T5, mT5 and MarianMT models (``test_hf_import``'s fixtures) are imported
with their generation defaults (``ImportedModel.decode``) and decoded by jaxmt and by
``transformers``' ``generate()`` on a padded batch of sources of different lengths:

* beam search (4 beams, ``num_return_sequences=4``): the same n-best ids and the same
  ``sequences_scores`` for early stopping "never" and the reference's default (False,
  jaxmt's "heuristic"), for two length penalties, up to ``max_new_tokens``;
* the checkpoint's own generation defaults (min length, n-gram blocking, repetition
  penalty, forced EOS, banned ids) give ``generate()``'s outputs with no arguments but
  the length;
* sampling with ``top_k=1`` is greedy decoding.

Random tiny models seldom emit EOS: the fixtures raise its logit, and every test
asserts that some hypothesis ended before the length limit, so that finishing, length
penalties and stopping are compared, not only the cut-off at the limit.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need torch (pip install 'jaxmt[hf]')")
transformers = pytest.importorskip(
    "transformers", reason="parity tests need transformers (pip install 'jaxmt[hf]')")
pytest.importorskip("safetensors", reason="parity tests need safetensors")
torch.set_num_threads(1)  # tiny matmuls: threads only contend with jax on a busy machine

import test_hf_import as hf_tests  # noqa: E402
from jaxmt.inference import hf_import  # noqa: E402
from jaxmt.modeling.model import EncoderDecoderModel  # noqa: E402

# The import tests' tiny random models (fixtures, module-scoped here too) and helpers.
corpus, t5_spm = hf_tests.corpus, hf_tests.t5_spm
t5_dir, mt5_dir, marian_dir = hf_tests.t5_dir, hf_tests.mt5_dir, hf_tests.marian_dir
_maps, _padded_batch = hf_tests._maps, hf_tests._padded_batch

N = 12  # max_new_tokens: outputs of at most N tokens, EOS included
LENGTHS = [8, 3, 11, 6]  # source lengths of the padded batch
MODELS = ["t5_eos", "mt5_dir", "marian_opus"]


# ----------------------------------------------------------------------------- fixtures

def _resave(tmp_path_factory, name: str, hf_dir: str, ref) -> str:
    """``ref`` saved to a new directory beside ``hf_dir``'s tokenizer files."""
    d = tmp_path_factory.mktemp(name)
    shutil.copytree(hf_dir, d, dirs_exist_ok=True)
    ref.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def t5_eos(tmp_path_factory, t5_dir):
    """Original T5 (tied, rescaled logits) whose EOS embedding is scaled up: its logit
    is large for some states, so hypotheses end at different lengths."""
    hf_dir, ref = t5_dir
    with torch.no_grad():
        ref.shared.weight[1] *= 14
    return _resave(tmp_path_factory, "t5_eos", hf_dir, ref), ref


@pytest.fixture(scope="module")
def marian_opus(tmp_path_factory, marian_dir):
    """Marian with opus-mt's generation defaults (beam 4, pad banned, EOS forced at the
    length limit) and a minimum length of 3 (EOS included); a larger EOS bias (the
    minimum length keeps it from ending every output at once)."""
    hf_dir, ref = marian_dir
    gc = ref.generation_config
    gc.num_beams, gc.forced_eos_token_id, gc.max_length = 4, ref.config.eos_token_id, 512
    gc.min_length = 3
    with torch.no_grad():
        ref.final_logits_bias[0, 0] += 0.75
    return _resave(tmp_path_factory, "marian_opus", hf_dir, ref), ref


@pytest.fixture(scope="module")
def imported():
    return {}


def _setup(request, imported, which):
    """(reference model, imported model, source batch in original ids)."""
    hf_dir, ref = request.getfixturevalue(which)
    if which not in imported:
        imported[which] = hf_import.import_checkpoint(hf_dir, precision="fp32")
    hc = ref.config
    src = _padded_batch(np.random.default_rng(1), LENGTHS, hc.vocab_size, hc.eos_token_id,
                        hc.pad_token_id)
    return ref, imported[which], src


# ----------------------------------------------------------------------------- decoding

def _reference(ref, src, **kwargs) -> tuple[np.ndarray, np.ndarray | None]:
    """``generate(**kwargs)``'s ids [b, n, N] (start token dropped, padded with the pad
    id) and its ``sequences_scores`` [b, n] (beam search) or None; ``max_new_tokens`` is
    N unless ``kwargs`` has a ``generation_config``."""
    c = ref.config
    # transformers' KV cache assumes as many decoder as encoder layers (not mT5's 2+3).
    use_cache = getattr(c, "num_decoder_layers", c.num_hidden_layers) == c.num_hidden_layers
    with torch.no_grad():
        out = ref.generate(input_ids=torch.tensor(src),
                           attention_mask=torch.tensor(src != c.pad_token_id),
                           use_cache=use_cache, return_dict_in_generate=True,
                           output_scores=True, **kwargs)
    seq = out.sequences.numpy()[:, 1:]
    seq = np.pad(seq, ((0, 0), (0, N - seq.shape[1])), constant_values=c.pad_token_id)
    n = len(seq) // len(src)
    scores = getattr(out, "sequences_scores", None)
    return (seq.reshape(len(src), n, N),
            None if scores is None else scores.numpy().reshape(len(src), n))


def _jaxmt(imp, src, decode) -> tuple[np.ndarray, np.ndarray]:
    """jaxmt's ids [b, n_best, N] in original ids (0-padded jaxmt ids map to pad) and scores."""
    perm, inv = _maps(imp)
    ids, scores = EncoderDecoderModel(imp.model).predict_batch_with_aux(
        imp.params, {"encoder_input_tokens": inv[src].astype(np.int32)}, decode,
        max_decode_len=N)
    return perm[np.asarray(ids)], np.asarray(scores)


def _ended_early(ids: np.ndarray, eos: int) -> int:
    """Hypotheses whose EOS comes before the last allowed position."""
    return int((ids[..., :N - 1] == eos).any(-1).sum())


def _ends(ids: np.ndarray, eos: int) -> list:
    """Each hypothesis up to its first EOS (included), or all N tokens (the fill after
    EOS differs: the reference fills with EOS when the pad id is 0)."""
    out = []
    for row in ids.reshape(-1, ids.shape[-1]):
        row = [int(t) for t in row]
        out.append(row[:row.index(eos) + 1] if eos in row else row)
    return out


def _assert_same(got, want, eos, what) -> int:
    """Equal hypotheses; returns how many ended early."""
    assert got.shape == want.shape, (what, got.shape, want.shape)
    for k, (g, w) in enumerate(zip(_ends(got, eos), _ends(want, eos))):
        assert g == w, (what, divmod(k, got.shape[1]), g, w)
    print(f"{what}: {_ended_early(want, eos)}/{want.shape[0] * want.shape[1]} hypotheses "
          "ended before the limit")
    return _ended_early(want, eos)


# ----------------------------------------------------------------------------- tests

@pytest.mark.slow
@pytest.mark.parametrize("which", MODELS)
@pytest.mark.parametrize("early_stopping", ["never", "heuristic"])
def test_beam_n_best_matches_generate(which, early_stopping, request, imported):
    """Ids and scores of all 4 hypotheses, for length penalties 1.0 and 0.6."""
    ref, imp, src = _setup(request, imported, which)
    eos = ref.config.eos_token_id
    hf_stop = {"never": "never", "heuristic": False}[early_stopping]
    early = 0
    for alpha in (1.0, 0.6):
        decode = dataclasses.replace(
            imp.decode, strategy="beam", beam_size=4, n_best=4, length_penalty="power",
            alpha=alpha, early_stopping=early_stopping, no_repeat_ngram_size=0,
            max_len_a=0.0, max_len_b=N)
        want, want_scores = _reference(ref, src, max_new_tokens=N, num_beams=4,
                                       num_return_sequences=4,
                                       length_penalty=alpha, early_stopping=hf_stop,
                                       do_sample=False)
        got, scores = _jaxmt(imp, src, decode)
        what = f"{which} {early_stopping} alpha={alpha}"
        early += _assert_same(got, want, eos, what)
        np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-5, err_msg=what)
    assert early, "no hypothesis ended before the limit: finishing was not compared"


@pytest.mark.slow
@pytest.mark.parametrize("which", ["t5_eos", "marian_opus"])
def test_generation_defaults_match_generate(which, request, imported, tmp_path):
    """A checkpoint whose generation_config.json sets beam 3 with 2 outputs, length
    penalty 0.8, early_stopping true ("first"), min_length, no_repeat_ngram_size,
    repetition_penalty and max_length (plus Marian's banned pad and forced EOS): the
    imported ``decode`` alone gives ``generate()``'s outputs and scores."""
    hf_dir, ref = request.getfixturevalue(which)
    d = tmp_path / "defaults"
    shutil.copytree(hf_dir, d)
    gen = json.loads((d / "generation_config.json").read_text())
    gen.update(num_beams=3, num_return_sequences=2, length_penalty=0.8, early_stopping=True,
               min_length=4, no_repeat_ngram_size=2, repetition_penalty=1.3, max_length=N + 1)
    (d / "generation_config.json").write_text(json.dumps(gen))
    imp = hf_import.import_checkpoint(str(d), precision="fp32")
    assert (imp.decode.strategy, imp.decode.beam_size, imp.decode.n_best) == ("beam", 3, 2)
    assert (imp.decode.early_stopping, imp.decode.max_len_b, imp.decode.min_len) == ("first", N, 4)
    _, _, src = _setup(request, imported, which)
    want, want_scores = _reference(
        ref, src, generation_config=transformers.GenerationConfig.from_pretrained(str(d)))
    got, scores = _jaxmt(imp, src, imp.decode)
    eos = ref.config.eos_token_id
    assert _assert_same(got, want, eos, f"{which} defaults"), "no hypothesis ended early"
    np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_sampling_top_k_1_is_greedy(request, imported):
    """Sampling with top_k=1 (any temperature) draws the greedy output every time: the
    reference's greedy ids, with the checkpoint's processors (Marian's minimum length,
    banned pad and forced EOS) in both."""
    early = 0
    for which in MODELS:
        ref, imp, src = _setup(request, imported, which)
        eos = ref.config.eos_token_id
        want, _ = _reference(ref, src, max_new_tokens=N, num_beams=1, do_sample=False)
        sampled, _ = _reference(ref, src, max_new_tokens=N, num_beams=1, do_sample=True,
                                top_k=1, temperature=0.7)
        _assert_same(sampled, want, eos, f"{which} reference top_k=1")
        decode = dataclasses.replace(imp.decode, strategy="sample", top_k=1, temperature=0.7,
                                     num_decodes=3, n_best=3, max_len_a=0.0, max_len_b=N)
        got, _ = _jaxmt(imp, src, decode)
        for j in range(3):
            early += _assert_same(got[:, j:j + 1], want, eos, f"{which} sample {j}")
    assert early, "no output ended before the limit: finishing was not compared"


@pytest.mark.slow
def test_translator_reproduces_generate_with_the_checkpoints_defaults(marian_opus):
    """``Translator.from_pretrained(opus_mt_dir)`` decodes with the checkpoint's own
    defaults (beam 4, pad banned, EOS forced at the limit) and returns the text that the
    tokenizer + ``generate()`` + ``batch_decode`` return."""
    from jaxmt.inference.translator import Translator

    hf_dir, ref = marian_opus
    tok = transformers.MarianTokenizer.from_pretrained(hf_dir)
    with torch.no_grad():
        out = ref.generate(**tok(hf_tests.TEXTS, return_tensors="pt", padding=True),
                           max_new_tokens=N)
    want = tok.batch_decode(out, skip_special_tokens=True)
    tr = Translator.from_pretrained(hf_dir)
    assert (tr.decode.strategy, tr.decode.beam_size, tr.decode.forced_eos) == ("beam", 4, True)
    assert tr.translate(hf_tests.TEXTS, max_len_a=0.0, max_len_b=N) == want
    assert any(want), "all outputs empty: the comparison proves little"
