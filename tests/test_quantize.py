"""Post-training int8 quantization (`jaxmt quantize`, jaxmt/compress/quantize.py).

On a tiny random-init fp32 model: "int8" (weight-only) computes exactly the float model
with dequantized weights, and both modes stay within 3% of the logit range of the fp32
model (measured: about 1.5%) with greedy decodes mostly the same; the projections and
the embedding are int8 and the tree is under 30% of fp32's bytes; `jaxmt quantize`
writes a directory that Translator loads and decodes (greedy, beam, sampling), leaving
the source untouched; training a quantized config is refused; scanned layers quantize to
the stacked unrolled parameters; a quantized model decodes the same on a mesh.
"""

import contextlib
import dataclasses
import hashlib
import io
import os
import re

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxmt import cli
from jaxmt import config as cfglib
from jaxmt.compress.quantize import dequantize_params, param_bytes, quantize_params
from jaxmt.config import MeshConfig, ModelConfig
from jaxmt.modeling.model import EncoderDecoderModel
from jaxmt.modeling.network import stack_layers

CFG = ModelConfig(vocab_size=64, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
                  num_encoder_layers=2, num_decoder_layers=2, precision="fp32")
# max |logit - fp32 logit| / (fp32 logits' max - min), over a batch of 8 x 10 positions.
LOGIT_BOUND = 0.03
QUANTIZED = re.compile(r".*/(query|key|value|out|wi_\d+|wo|logits_dense|embedding)$")
TEXTS = ["In the beginning God created the heaven and the earth.", "And the earth was.",
         "Am Anfang schuf Gott Himmel und Erde."]


def _flat(tree) -> dict:
    return {"/".join(str(k.key) for k in p): x
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def float_model():
    model = EncoderDecoderModel(CFG)
    # Jitted, here and for the logits below: op by op, every primitive of a new shape is
    # an XLA compile of its own (hundreds per model); one program compiles in a second.
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), model.dummy_batch(1, 8, 8)))
    return model, jax.tree.map(np.asarray, params)


def _logits(model, params, batch):
    """[b, t, vocab] logits as numpy, from one jitted program per model."""
    return np.asarray(jax.jit(model.logits)(params, batch))


def test_logits_close_to_fp32_and_greedy_agrees(float_model):
    model, params = float_model
    batch = model.random_batch(8, 12, 10, seed=1)
    src = {"encoder_input_tokens": batch["encoder_input_tokens"]}
    ref = _logits(model, params, batch)
    ref_ids = np.asarray(model.predict_batch(params, src, max_decode_len=10))
    span = ref.max() - ref.min()
    for mode in ("int8", "w8a8"):
        qparams, qcfg = quantize_params(params, CFG, mode)
        assert qcfg == dataclasses.replace(CFG, quant=mode)
        qmodel = EncoderDecoderModel(qcfg)
        got = _logits(qmodel, qparams, batch)
        err = np.abs(got - ref).max() / span
        print(f"{mode}: max |dlogit| / range {err:.4f}")
        assert err < LOGIT_BOUND, (mode, err)
        assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
        if mode == "int8":  # weight-only: the dequantized model, up to fp32 rounding
            deq = _logits(model, dequantize_params(qparams, qcfg)[0], batch)
            np.testing.assert_allclose(got, deq, atol=1e-5 * span)
        ids = np.asarray(qmodel.predict_batch(qparams, src, max_decode_len=10))
        agree = (ids == ref_ids).mean()
        print(f"{mode}: greedy tokens agreeing {agree:.3f}")
        assert agree >= 0.9, (mode, agree)


def test_quantized_tree_is_int8_and_small(float_model):
    _, params = float_model
    qparams, qcfg = quantize_params(params, CFG, "w8a8")
    flat, fp = _flat(qparams), _flat(params)
    weights = sorted(p for p in fp if QUANTIZED.fullmatch(p))
    # Encoder layers: 4 attention + 3 MLP; decoder layers 8 + 3; output layer, embedding.
    assert len(weights) == 2 * 7 + 2 * 11 + 2
    for p in weights:
        q, s = flat[p], flat[p + "_scale"]
        assert q.dtype == np.int8 and q.shape == fp[p].shape and s.dtype == np.float32
        assert np.abs(np.asarray(q)).max() == 127  # absmax: each channel's largest is +-127
    assert flat["token_embed/embedding_scale"].shape == (CFG.vocab_size,)  # per vocab row
    assert flat["encoder/layers_0/attention/query_scale"].shape == (CFG.num_heads, CFG.head_dim)
    assert flat["encoder/layers_0/attention/out_scale"].shape == (CFG.emb_dim,)
    others = set(flat) - set(weights) - {p + "_scale" for p in weights}
    assert others == set(fp) - set(weights) and others  # norms, relpos tables: float, as were
    assert all(flat[p].dtype == np.float32 for p in others)
    ratio = param_bytes(qparams) / param_bytes(params)
    print(f"parameter bytes: {ratio:.3f} of fp32's")
    assert ratio <= 0.30
    with pytest.raises(ValueError, match="already quantized"):
        quantize_params(qparams, qcfg, "int8")


def test_scanned_equals_unrolled_and_tied_embeddings(float_model):
    """The embedding's per-row scales serve the tied output layer too; a scanned stack
    gets one scale per layer: its quantized parameters are the unrolled ones stacked."""
    _, params = float_model
    tied = dataclasses.replace(CFG, tie_embeddings=True)
    params = {**params, "decoder": {k: v for k, v in params["decoder"].items()
                                    if k != "logits_dense"}}
    q_unrolled, qcfg = quantize_params(params, tied, "int8")
    q_scanned, qcfg_s = quantize_params(stack_layers(params),
                                        dataclasses.replace(tied, scan_layers=True), "int8")
    want, got = _flat(stack_layers(q_unrolled)), _flat(q_scanned)
    assert want.keys() == got.keys()
    for p in want:
        np.testing.assert_array_equal(np.asarray(got[p]), np.asarray(want[p]), err_msg=p)
    model = EncoderDecoderModel(qcfg)
    batch = model.random_batch(4, 12, 10, seed=2)
    out = _logits(model, q_unrolled, batch)
    np.testing.assert_allclose(_logits(EncoderDecoderModel(qcfg_s), q_scanned, batch),
                               out, atol=1e-5)
    ref = _logits(EncoderDecoderModel(tied), params, batch)
    assert np.abs(out - ref).max() / (ref.max() - ref.min()) < LOGIT_BOUND


# ------------------------------------------------------------- the command, on disk

def _spm(path):
    """A SentencePiece model trained in milliseconds on a few sentences."""
    import sentencepiece as spm

    with open(path, "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(TEXTS * 20), model_writer=f, vocab_size=60,
            user_defined_symbols=["<2en>", "<2de>"], hard_vocab_limit=False, pad_id=0,
            eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)


def _snapshot(root) -> dict:
    out = {}
    for d, _, files in os.walk(root):
        for name in files:
            p = os.path.join(d, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = (os.stat(p).st_mtime_ns,
                                                 hashlib.sha1(f.read()).hexdigest())
    return out


@pytest.fixture(scope="module")
def quantized_dirs(float_model, tmp_path_factory):
    """The float model as a trained model directory, and `jaxmt quantize` of it in each
    mode (run in-process); the source's files before and after."""
    from jaxmt.checkpoint import save_params

    _, params = float_model
    tmp = tmp_path_factory.mktemp("quantize")
    src = tmp / "model"
    src.mkdir()
    _spm(src / cfglib.VOCAB_FILE)
    (src / cfglib.CONFIG_FILE).write_text(cfglib.to_json(
        model=CFG, data=cfglib.DataConfig(langs=("en", "de"), max_eval_len=32),
        train=cfglib.TrainConfig()))
    save_params(str(src), params, {"step": 3})
    before = _snapshot(src)
    out, printed = {}, io.StringIO()
    for mode in ("int8", "w8a8"):
        out[mode] = str(tmp / mode)
        with contextlib.redirect_stdout(printed):
            assert cli.main(["quantize", "--model_dir", str(src), "--out", out[mode],
                             "--mode", mode]) == 0
    return {"src": str(src), "before": before, "after": _snapshot(src),
            "printed": printed.getvalue(), **out}


def test_cli_writes_a_model_translator_decodes(quantized_dirs, float_model, tmp_path):
    from jaxmt.inference.translator import Translator

    d = quantized_dirs
    assert d["after"] == d["before"]  # the source is only read
    assert re.search(r"quantized .* \(w8a8\): parameters .* MiB \(\d+%\)", d["printed"])
    _, params = float_model
    for mode in ("int8", "w8a8"):
        assert cfglib.load(d[mode])["model"].quant == mode
        tr = Translator.from_pretrained(d[mode])
        want = _flat(quantize_params(params, CFG, mode)[0])
        got = _flat(tr.params)
        assert got.keys() == want.keys()  # what was written is what quantize_params gives
        for p in want:
            np.testing.assert_array_equal(np.asarray(got[p]), np.asarray(want[p]), err_msg=p)
    tr = Translator.from_pretrained(d["int8"], max_src_len=16, max_decode_len=16)
    for opts in ({"strategy": "greedy"}, {"strategy": "beam", "beam_size": 2, "n_best": 1},
                 {"strategy": "sample", "num_decodes": 2, "n_best": 2, "seed": 1}):
        hyps = tr.translate_n_best(TEXTS, "en", "de", **opts)
        assert len(hyps) == len(TEXTS) and all(len(h) == opts.get("n_best", 1) for h in hyps)
        assert all(np.isfinite(h.score) for row in hyps for h in row)
    written = _snapshot(d["int8"])
    src_file = tmp_path / "in.txt"
    src_file.write_text("\n".join(TEXTS) + "\n")
    assert cli.main(["translate", f"--model_dir={d['int8']}", "--src_lang=en", "--tgt_lang=de",
                     f"--input={src_file}", f"--output={tmp_path / 'out.txt'}", "--beam=2",
                     "--max_len=16"]) == 0
    assert len((tmp_path / "out.txt").read_text().splitlines()) == len(TEXTS)
    assert _snapshot(d["int8"]) == written


def test_training_a_quantized_model_is_refused(tmp_path):
    from jaxmt.train.run import train

    with pytest.raises(ValueError, match="ModelConfig.quant='int8': a quantized model decodes "
                                         "only; train the float model and run `jaxmt quantize`"):
        train(model_dir=str(tmp_path / "run"), model_cfg=dataclasses.replace(CFG, quant="int8"),
              progress=False)
    assert not os.path.exists(tmp_path / "run")


def test_quantized_model_on_a_mesh_decodes_as_on_one_device(quantized_dirs):
    from jaxmt.inference.translator import Translator

    one = Translator.from_pretrained(quantized_dirs["w8a8"], max_decode_len=16)
    mesh = Translator.from_pretrained(quantized_dirs["w8a8"], max_decode_len=16,
                                      mesh=MeshConfig(data=4, tensor=2))
    q = _flat(mesh.params)["encoder/layers_0/attention/query"]
    assert q.dtype == np.int8 and len(q.sharding.device_set) == 8
    a, b = (t.translate_n_best(TEXTS, "en", "de", strategy="greedy") for t in (one, mesh))
    assert [[h.text for h in row] for row in a] == [[h.text for h in row] for row in b]
    np.testing.assert_allclose([h.score for row in a for h in row],
                               [h.score for row in b for h in row], atol=1e-4)
