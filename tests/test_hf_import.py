"""Importing Hugging Face T5, mT5 and MarianMT checkpoints: parity with the reference.

Tiny random models are built offline from configs, saved the way the Hub stores
them, imported, and compared with ``transformers`` on padded batches:

* encoder outputs and decoder logits within 1e-4 (fp32). Only non-pad positions are
  compared: jaxmt masks every key of a padded *query* row, so those rows hold
  garbage by design (nothing reads them), while the reference computes them;
* greedy decoding of 20 tokens gives the same ids as ``generate``;
* ``Translator.translate`` on the Hugging Face directory gives the same text as the
  reference tokenizer + ``generate`` + ``decode`` (real SentencePiece models trained here).

Marian ids differ from jaxmt's (``</s>`` 0, ``<unk>`` 1, ``<pad>`` last), so ids are
mapped through the importer's permutation before comparing.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
from contextlib import redirect_stdout

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # `make test-fast` skips these

torch = pytest.importorskip("torch", reason="parity tests need torch (pip install 'jaxmt[hf]')")
transformers = pytest.importorskip(
    "transformers", reason="parity tests need transformers (pip install 'jaxmt[hf]')")
pytest.importorskip("safetensors", reason="parity tests need safetensors")
# Tiny matmuls: torch's thread pool only spins against jax (and anything else running),
# which made single Linear calls take ~30 ms on a busy 2-core machine.
torch.set_num_threads(1)

import jax  # noqa: E402
import sentencepiece as spm  # noqa: E402
from safetensors.torch import load_file as load_torch_file  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from jaxmt import cli  # noqa: E402
from jaxmt import config as cfglib  # noqa: E402
from jaxmt.data.embedded import load_split  # noqa: E402
from jaxmt.inference import hf_import  # noqa: E402
from jaxmt.inference.tokenizer import id_permutation  # noqa: E402
from jaxmt.inference.translator import Translator  # noqa: E402
from jaxmt.modeling.model import EncoderDecoderModel  # noqa: E402
from jaxmt.modeling.network import EncoderDecoder  # noqa: E402

TOL = 1e-4
STEPS = 20
TEXTS = ["In the beginning God created the heaven and the earth.",
         "And the earth was without form, and void.",
         "Jesus wept.", "Blessed are the meek: for they shall inherit the earth."]

from spm_models import train_spm  # noqa: E402

# ----------------------------------------------------------------------------- fixtures



@pytest.fixture(scope="module")
def corpus() -> dict[str, list[str]]:
    _, texts = load_split("train", ["en", "de"])
    return {lang: [t for t in texts[lang] if t][:300] for lang in ("en", "de")}


@pytest.fixture(scope="module")
def t5_spm(corpus) -> bytes:
    # T5 convention: pad 0, eos 1, unk 2, no bos.
    return train_spm(corpus["en"] + corpus["de"], 400, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)


def _randomize(model, scale: float = 0.2) -> None:
    """Norm scales, biases and the logits bias start as constants; make every one count."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "norm" in name or name.endswith("bias"):
                p.add_(scale * torch.randn(p.shape, generator=g))


def _no_generation_extras(model) -> None:
    # jaxmt decodes greedily with no forced tokens; make the reference do the same.
    gc = model.generation_config
    gc.forced_eos_token_id = gc.forced_bos_token_id = None
    gc.min_length, gc.no_repeat_ngram_size, gc.bad_words_ids = 0, 0, None


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory, t5_spm):
    """Original T5: ReLU MLP, tied embeddings, rescaled logits; 100 sentinel ids."""
    d = tmp_path_factory.mktemp("t5")
    (d / "spiece.model").write_bytes(t5_spm)
    n = spm.SentencePieceProcessor(model_proto=t5_spm).get_piece_size()
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=n + 100, d_model=48, d_kv=12, d_ff=96, num_layers=2,
                                num_heads=4, feed_forward_proj="relu", decoder_start_token_id=0,
                                relative_attention_num_buckets=16,
                                relative_attention_max_distance=32)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    _randomize(model)
    _no_generation_extras(model)
    model.save_pretrained(d)
    return str(d), model


@pytest.fixture(scope="module")
def mt5_dir(tmp_path_factory, t5_spm):
    """mT5: gated-GELU, untied output layer (as the released mT5 checkpoints)."""
    d = tmp_path_factory.mktemp("mt5")
    (d / "spiece.model").write_bytes(t5_spm)
    n = spm.SentencePieceProcessor(model_proto=t5_spm).get_piece_size()
    torch.manual_seed(1)
    cfg = transformers.MT5Config(vocab_size=n, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                 num_decoder_layers=3, num_heads=4)
    model = transformers.MT5ForConditionalGeneration(cfg).eval()
    # transformers 5 always ties mT5's output layer; untie it by hand (stack notes).
    model.lm_head.weight = torch.nn.Parameter(torch.randn(n, 32) * 32 ** -0.5)
    with torch.no_grad():
        model.lm_head.weight[1] *= 3  # EOS: some rows end early, so stopping is compared too
    _randomize(model)
    _no_generation_extras(model)
    model.save_pretrained(d)
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not k.endswith("embed_tokens.weight")}  # copies of shared.weight
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((d / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (d / "config.json").write_text(json.dumps(config))
    return str(d), model


@pytest.fixture(scope="module")
def marian_dir(tmp_path_factory, corpus):
    """opus-mt layout: source.spm/target.spm, vocab.json with </s> 0, <unk> 1, <pad> last."""
    d = tmp_path_factory.mktemp("marian")
    src, tgt = train_spm(corpus["en"], 300), train_spm(corpus["de"], 300)
    (d / "source.spm").write_bytes(src)
    (d / "target.spm").write_bytes(tgt)
    vocab = {"</s>": 0, "<unk>": 1}
    for proto in (src, tgt):
        sp = spm.SentencePieceProcessor(model_proto=proto)
        for i in range(sp.get_piece_size()):
            if not (sp.is_control(i) or sp.is_unknown(i)):
                vocab.setdefault(sp.id_to_piece(i), len(vocab))
    pad = len(vocab)
    vocab["<pad>"] = pad
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    torch.manual_seed(2)
    cfg = transformers.MarianConfig(
        vocab_size=pad + 1, decoder_vocab_size=pad + 1, d_model=32, encoder_layers=2,
        decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, activation_function="swish",
        scale_embedding=True, max_position_embeddings=128, pad_token_id=pad, eos_token_id=0,
        decoder_start_token_id=pad, init_std=0.1)
    model = transformers.MarianMTModel(cfg).eval()
    _randomize(model)
    with torch.no_grad():
        model.final_logits_bias[0, 0] += 0.5  # </s>: some rows end early
    _no_generation_extras(model)
    model.generation_config.bad_words_ids = [[pad]]  # as in every opus-mt config
    model.save_pretrained(d)
    return str(d), model


MODELS = ["t5_dir", "mt5_dir", "marian_dir"]


@pytest.fixture(scope="module")
def imported():
    """In-memory conversions by fixture name, shared by the tests (see _import)."""
    return {}


def _import(cache: dict, name: str, hf_dir: str) -> hf_import.ImportedModel:
    if name not in cache:
        cache[name] = hf_import.import_checkpoint(hf_dir, precision="fp32")
    return cache[name]


def _maps(imp: hf_import.ImportedModel) -> tuple[np.ndarray, np.ndarray]:
    """(jaxmt -> original ids, original -> jaxmt ids)."""
    perm = id_permutation(imp.model.vocab_size, imp.tokenizer.reordered_ids)
    return perm, np.argsort(perm)


def _padded_batch(rng, lengths, vocab, eos, pad, start=None):
    """Random rows of the given lengths: ids >= 3, EOS last (or ``start`` first), padded."""
    arr = np.full((len(lengths), max(lengths)), pad, np.int64)
    for r, n in enumerate(lengths):
        arr[r, :n] = rng.integers(3, vocab - 1, n)
        if start is None:
            arr[r, n - 1] = eos
        else:
            arr[r, 0] = start
    return arr


# ----------------------------------------------------------------------------- parity

def _generate(ref, **inputs):
    """Reference greedy decoding of STEPS tokens.

    transformers' KV cache assumes as many decoder as encoder layers and fails on the
    2+3-layer mT5; there the prefix is recomputed each step (the same ids).
    """
    c = ref.config
    use_cache = getattr(c, "num_decoder_layers", c.num_hidden_layers) == c.num_hidden_layers
    with torch.no_grad():
        return ref.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=STEPS,
                            use_cache=use_cache)


@pytest.mark.parametrize("which", MODELS)
def test_forward_parity(which, request, imported):
    hf_dir, ref = request.getfixturevalue(which)
    imp = _import(imported, which, hf_dir)
    perm, inv = _maps(imp)
    hc = ref.config
    rng = np.random.default_rng(0)
    # Original ids (ids >= 3 are ordinary pieces in both numberings for these vocabularies).
    src = _padded_batch(rng, [9, 4, 7], hc.vocab_size, hc.eos_token_id, hc.pad_token_id)
    dec = _padded_batch(rng, [6, 3, 5], hc.vocab_size, hc.eos_token_id, hc.pad_token_id,
                        start=hc.decoder_start_token_id)
    src_mask, dec_mask = src != hc.pad_token_id, np.zeros(dec.shape, bool)
    for r, n in enumerate([6, 3, 5]):
        dec_mask[r, :n] = True
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(src), attention_mask=torch.tensor(src_mask),
                  decoder_input_ids=torch.tensor(dec),
                  decoder_attention_mask=torch.tensor(dec_mask))
    ref_enc, ref_logits = out.encoder_last_hidden_state.numpy(), out.logits.numpy()

    module, params = EncoderDecoder(imp.model), {"params": imp.params}
    src_j = inv[src].astype(np.int32)
    dec_j = np.where(dec_mask, inv[dec], 0).astype(np.int32)
    enc = jax.jit(lambda p, s: module.apply(p, s, method=EncoderDecoder.encode))(params, src_j)
    logits = jax.jit(lambda p, t, e, es, ds: module.apply(
        p, t, e, es, ds, method=EncoderDecoder.decode))(
            params, dec_j, enc, (src_j > 0).astype(np.int32), dec_mask.astype(np.int32))
    enc_diff = np.abs(np.asarray(enc) - ref_enc)[src_mask].max()
    # jaxmt vocabulary column j is the reference's column perm[j].
    logit_diff = np.abs(np.asarray(logits) - ref_logits[..., perm])[dec_mask].max()
    print(f"{which}: max |diff| encoder {enc_diff:.2e}, logits {logit_diff:.2e}")
    assert enc_diff < TOL and logit_diff < TOL, (enc_diff, logit_diff)


@pytest.mark.parametrize("which", MODELS)
def test_greedy_parity(which, request, imported):
    hf_dir, ref = request.getfixturevalue(which)
    imp = _import(imported, which, hf_dir)
    perm, inv = _maps(imp)
    hc = ref.config
    gc = ref.generation_config
    # Nothing jaxmt does not apply: suppression of single ids is the one extra allowed.
    assert not gc.min_length and gc.forced_eos_token_id is None and not gc.no_repeat_ngram_size
    assert gc.bad_words_ids in (None, [[hc.pad_token_id]])
    src = _padded_batch(np.random.default_rng(1), [8, 3, 11, 6], hc.vocab_size,
                        hc.eos_token_id, hc.pad_token_id)
    ref_ids = _generate(ref, input_ids=torch.tensor(src),
                        attention_mask=torch.tensor(src != hc.pad_token_id)).numpy()[:, 1:]
    greedy = dataclasses.replace(cfglib.IMPORTED_DECODE, max_len_b=STEPS,
                                 suppressed_ids=imp.tokenizer.suppressed_ids)
    ids, _ = EncoderDecoderModel(imp.model).predict_batch_with_aux(
        imp.params, {"encoder_input_tokens": inv[src].astype(np.int32)}, decode=greedy,
        max_decode_len=STEPS)
    ids = np.asarray(ids)[:, 0]
    for r in range(len(src)):
        want = [int(t) for t in inv[ref_ids[r]]]
        got = [int(t) for t in ids[r]]
        n = want.index(1) + 1 if 1 in want else STEPS  # up to and including EOS
        assert got[:n] == want[:n], (r, got, want)
    eos_at = [list(r).index(1) if 1 in r else None for r in ids]
    print(f"{which}: greedy ids equal, EOS at {eos_at}")


def _reference_translate(ref, tok, texts):
    out = _generate(ref, **tok(texts, return_tensors="pt", padding=True))
    return tok.batch_decode(out, skip_special_tokens=True)


@pytest.mark.parametrize("which,tok_cls", [("t5_dir", "T5Tokenizer"), ("mt5_dir", "T5Tokenizer"),
                                           ("marian_dir", "MarianTokenizer")])
def test_translate_end_to_end(which, tok_cls, request):
    hf_dir, ref = request.getfixturevalue(which)
    tok = getattr(transformers, tok_cls).from_pretrained(hf_dir)
    want = _reference_translate(ref, tok, TEXTS)
    tr = Translator.from_pretrained(hf_dir, max_decode_len=STEPS)
    # Same input ids first, so a text mismatch below is the decoding's fault.
    perm = id_permutation(tr.model.cfg.vocab_size, tr.tokenizer.cfg.reordered_ids)
    for t in TEXTS:
        assert [int(perm[i]) for i in tr.encode(t, None)] == tok(t)["input_ids"], t
    got = tr.translate(TEXTS)
    print(f"{which}: {got}")
    assert got == want
    assert any(got), "all outputs empty: the comparison proves little"


@pytest.mark.parametrize("which,tok_cls", [("t5_dir", "T5Tokenizer"),
                                           ("marian_dir", "MarianTokenizer")])
def test_decode_matches_reference(which, tok_cls, request):
    """Random id sequences (specials, sentinels and UNK included) decode to the same text."""
    hf_dir, ref = request.getfixturevalue(which)
    tok = getattr(transformers, tok_cls).from_pretrained(hf_dir)
    tr = Translator.from_pretrained(hf_dir)
    perm = id_permutation(tr.model.cfg.vocab_size, tr.tokenizer.cfg.reordered_ids)
    inv = np.argsort(perm)
    rng = np.random.default_rng(3)
    for n in rng.integers(1, 15, 60):
        orig = rng.integers(0, ref.config.vocab_size, n)  # EOS may come early: both stop there
        cut = list(orig).index(ref.config.eos_token_id) if ref.config.eos_token_id in orig else n
        want = tok.decode(orig[:cut].tolist(), skip_special_tokens=True)
        assert tr.tokenizer.decode(inv[orig]) == want, orig


def test_convert_cli_and_translate_cli(marian_dir, tmp_path):
    hf_dir, _ = marian_dir
    out = str(tmp_path / "converted")
    with redirect_stdout(io.StringIO()) as buf:
        assert cli.main(["convert", f"--from_hf={hf_dir}", f"--out={out}"]) == 0
    assert "marian" in buf.getvalue()
    cfg = json.loads(open(os.path.join(out, "jaxmt_config.json")).read())
    assert set(cfg) == {"model", "tokenizer", "decode"} and cfg["tokenizer"]["kind"] == "marian"
    pad = json.loads(open(os.path.join(hf_dir, "vocab.json")).read())["<pad>"]
    assert cfg["tokenizer"]["reordered_ids"] == [pad, 0, 1]
    assert cfg["tokenizer"]["suppressed_ids"] == [0]  # <pad>, now jaxmt's id 0
    # The generation defaults: generate()'s greedy decoding, the pad banned.
    decode = hf_import.read_configs(hf_dir, with_decode=True)[2]
    assert cfglib.load(out)["decode"] == decode
    assert (decode.strategy, decode.suppressed_ids, decode.no_repeat_ngram_size) == (
        "greedy", (0,), 0)
    direct = Translator.from_pretrained(hf_dir).translate(TEXTS)
    assert Translator.from_pretrained(out).translate(TEXTS) == direct
    src = tmp_path / "in.txt"
    src.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    dst = tmp_path / "out.txt"
    assert cli.main(["translate", f"--model_dir={out}", f"--input={src}", f"--output={dst}"]) == 0
    assert dst.read_text(encoding="utf-8").split("\n")[:-1] == direct
    with pytest.raises(FileExistsError):
        hf_import.convert(hf_dir, out)


def test_pytorch_bin_and_scan_layers(t5_dir, tmp_path, imported):
    """The .bin path (torch.load weights_only) with tied copies saved, and scanned layers."""
    hf_dir, ref = t5_dir
    d = tmp_path / "bin"
    d.mkdir()
    for name in ("config.json", "spiece.model"):
        shutil.copy(os.path.join(hf_dir, name), d / name)
    torch.save(ref.state_dict(), d / "pytorch_model.bin")  # embed_tokens and lm_head included
    from_bin = hf_import.import_checkpoint(str(d))
    base = _import(imported, "t5_dir", hf_dir)
    jax.tree.map(np.testing.assert_array_equal, from_bin.params, base.params)

    sharded = tmp_path / "sharded"
    ref.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    for name in ("config.json", "spiece.model"):
        shutil.copy(os.path.join(hf_dir, name), sharded / name)
    jax.tree.map(np.testing.assert_array_equal,
                 hf_import.import_checkpoint(str(sharded)).params, base.params)

    half = tmp_path / "bf16"  # numpy has no bfloat16: the raw safetensors reader
    shutil.copytree(hf_dir, half)
    _edit_weights(half, lambda s: s.update({k: v.to(torch.bfloat16) for k, v in s.items()}))
    rounded = jax.tree.map(lambda x: np.asarray(x.astype(jax.numpy.bfloat16), np.float32),
                           base.params)
    jax.tree.map(np.testing.assert_array_equal, hf_import.import_checkpoint(str(half)).params,
                 rounded)

    scanned = hf_import.import_checkpoint(hf_dir, scan_layers=True)
    assert "layers" in scanned.params["encoder"]
    src = np.array([[5, 9, 17, 1], [7, 1, 0, 0]], np.int32)
    a, b = (jax.jit(lambda p, m=EncoderDecoder(imp.model): m.apply(
        {"params": p}, src, method=EncoderDecoder.encode))(imp.params) for imp in (base, scanned))
    np.testing.assert_allclose(np.asarray(a)[src > 0], np.asarray(b)[src > 0], atol=1e-5)


# ----------------------------------------------------------------------------- tokenizer

def test_marian_multilingual_prefix(marian_dir, tmp_path):
    """A vocabulary with >>xx<< codes gets the prefix '>>{tgt}<< ' and checks tgt_lang."""
    hf_dir, _ = marian_dir
    d = tmp_path / "multi"
    shutil.copytree(hf_dir, d)
    vocab = json.loads((d / "vocab.json").read_text())
    pad = vocab.pop("<pad>")
    # Take over two ordinary ids for the codes; the model is random anyway.
    victims = [p for p, i in vocab.items() if i >= 3][:2]
    for code, victim in zip((">>fra<<", ">>deu<<"), victims):
        vocab[code] = vocab.pop(victim)
    vocab["<pad>"] = pad
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    imp = hf_import.import_checkpoint(str(d))
    assert imp.tokenizer.input_prefix == ">>{tgt}<< "
    assert set(imp.tokenizer.target_langs) == {"fra", "deu"}
    tr = Translator(imp.model, imp.params, _load_tok(str(d), imp))
    ref_tok = transformers.MarianTokenizer.from_pretrained(str(d))
    perm = id_permutation(imp.model.vocab_size, imp.tokenizer.reordered_ids)
    got = [int(perm[i]) for i in tr.encode("Jesus wept.", "deu")]
    assert got == ref_tok(">>deu<< Jesus wept.")["input_ids"]
    with pytest.raises(ValueError, match="tgt_lang is required"):
        tr.translate(["Jesus wept."])
    with pytest.raises(ValueError, match="tgt_lang='xx'"):
        tr.translate(["Jesus wept."], tgt_lang="xx")


def test_t5_input_prefix(t5_dir):
    hf_dir, _ = t5_dir
    prefix = "translate English to German: "
    tr = Translator.from_pretrained(hf_dir, input_prefix=prefix)
    ref_tok = transformers.T5Tokenizer.from_pretrained(hf_dir)
    assert tr.encode("Jesus wept.", None) == ref_tok(prefix + "Jesus wept.")["input_ids"]


def test_import_needs_neither_tensorflow_nor_torch():
    code = ("import sys; import jaxmt.inference.hf_import, jaxmt.inference.tokenizer, jaxmt.inference.translator, jaxmt.cli;"
            "bad = [m for m in ('tensorflow', 'seqio', 'torch', 'transformers')"
            " if m in sys.modules];"
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]


def _load_tok(d, imp):
    from jaxmt.inference.tokenizer import load_tokenizer
    return load_tokenizer(d, imp.tokenizer, imp.model.vocab_size)


# ----------------------------------------------------------------------------- errors

def _copy(hf_dir, tmp_path, name="broken"):
    d = tmp_path / name
    shutil.copytree(hf_dir, d)
    return d


def _edit_weights(d, fn):
    path = str(d / "model.safetensors")
    state = dict(load_torch_file(path))
    fn(state)
    save_file(state, path, metadata={"format": "pt"})


def _edit_config(d, **fields):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(fields)
    (d / "config.json").write_text(json.dumps(cfg))


K_WEIGHT = "encoder.block.1.layer.0.SelfAttention.k.weight"


def test_error_missing_tensor(t5_dir, tmp_path):
    d = _copy(t5_dir[0], tmp_path)
    _edit_weights(d, lambda s: s.pop(K_WEIGHT))
    with pytest.raises(hf_import.HFImportError, match=f"missing tensor '{K_WEIGHT}'"):
        hf_import.import_checkpoint(str(d))


def test_error_extra_tensor(t5_dir, tmp_path):
    d = _copy(t5_dir[0], tmp_path)
    _edit_weights(d, lambda s: s.update({"encoder.block.7.layer.0.SelfAttention.k.weight":
                                         s[K_WEIGHT].clone()}))
    with pytest.raises(hf_import.HFImportError,
                       match=r"unexpected tensors.*encoder\.block\.7\.layer\.0\.SelfAttention\.k"):
        hf_import.import_checkpoint(str(d))


def test_error_shape_mismatch(t5_dir, tmp_path):
    d = _copy(t5_dir[0], tmp_path)
    _edit_weights(d, lambda s: s.update({K_WEIGHT: s[K_WEIGHT][:, :8].contiguous()}))
    with pytest.raises(hf_import.HFImportError, match=f"tensor '{K_WEIGHT}' has shape"):
        hf_import.import_checkpoint(str(d))


def test_error_tied_copy_differs(t5_dir, tmp_path):
    d = _copy(t5_dir[0], tmp_path)
    _edit_weights(d, lambda s: s.update({"lm_head.weight": s["shared.weight"] + 1}))
    with pytest.raises(hf_import.HFImportError, match="'lm_head.weight' differs"):
        hf_import.import_checkpoint(str(d))


def test_error_unknown_model_type(t5_dir, tmp_path):
    d = _copy(t5_dir[0], tmp_path)
    _edit_config(d, model_type="bart")
    with pytest.raises(hf_import.HFImportError, match=r"config\.json: model_type='bart'"):
        hf_import.import_checkpoint(str(d))
    _edit_config(d, model_type="t5", architectures=["T5EncoderModel"])
    with pytest.raises(hf_import.HFImportError, match="architectures=.*T5EncoderModel"):
        hf_import.import_checkpoint(str(d))


@pytest.mark.parametrize("fields,name", [
    ({"share_encoder_decoder_embeddings": False}, "share_encoder_decoder_embeddings"),
    ({"decoder_attention_heads": 2}, "decoder_attention_heads"),
    ({"decoder_ffn_dim": 128}, "decoder_ffn_dim"),
    ({"activation_function": "mish"}, "activation_function"),
    ({"decoder_start_token_id": 0}, "decoder_start_token_id"),
])
def test_error_unsupported_marian_option(marian_dir, tmp_path, fields, name):
    d = _copy(marian_dir[0], tmp_path)
    _edit_config(d, **fields)
    with pytest.raises(hf_import.HFImportError, match=rf"config\.json: {name}="):
        hf_import.import_checkpoint(str(d))


@pytest.mark.parametrize("fields,name", [({"bad_words_ids": [[5, 6]]}, "bad_words_ids"),
                                         ({"forced_bos_token_id": 5}, "forced_bos_token_id")])
def test_error_unsupported_generation_option(marian_dir, tmp_path, fields, name):
    d = _copy(marian_dir[0], tmp_path)
    gen = json.loads((d / "generation_config.json").read_text())
    gen.update(fields)
    (d / "generation_config.json").write_text(json.dumps(gen))
    with pytest.raises(hf_import.HFImportError, match=rf"generation_config\.json: {name}="):
        hf_import.import_checkpoint(str(d))


def test_generation_defaults_from_config_json(marian_dir, tmp_path):
    """Without generation_config.json (older checkpoints) config.json's generation fields
    count; T5 checkpoints may ban ids too now that decoding applies suppressed_ids."""
    d = _copy(marian_dir[0], tmp_path)
    os.remove(d / "generation_config.json")
    _edit_config(d, num_beams=5, max_length=40, length_penalty=0.6, forced_eos_token_id=0)
    decode = hf_import.read_configs(str(d), with_decode=True)[2]
    assert (decode.strategy, decode.beam_size, decode.max_len_b, decode.alpha,
            decode.forced_eos) == ("beam", 5, 39, 0.6, True)


def test_t5_bad_words_become_suppressed_ids(t5_dir, tmp_path):
    d = _copy(t5_dir[0], tmp_path)
    gen = json.loads((d / "generation_config.json").read_text())
    (d / "generation_config.json").write_text(json.dumps({**gen, "bad_words_ids": [[7], [1]]}))
    _, tok, decode = hf_import.read_configs(str(d), with_decode=True)
    assert tok.suppressed_ids == decode.suppressed_ids == (7,)  # EOS is never banned


def test_error_missing_tokenizer_file(marian_dir, tmp_path):
    d = _copy(marian_dir[0], tmp_path)
    os.remove(d / "vocab.json")
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        hf_import.import_checkpoint(str(d))


def test_check_params_names_paths(imported, t5_dir):
    imp = _import(imported, "t5_dir", t5_dir[0])
    params = jax.tree.map(lambda x: x, imp.params)
    del params["encoder"]["layers_1"]["mlp"]["wo"]
    params["decoder"]["layers_0"]["mlp"]["wi_0"] = np.zeros((3, 3), np.float32)
    params["decoder"]["surprise"] = np.zeros(2, np.float32)
    with pytest.raises(hf_import.HFImportError) as e:
        hf_import.check_params(params, imp.model)
    msg = str(e.value)
    assert "missing encoder/layers_1/mlp/wo" in msg
    assert "unexpected decoder/surprise" in msg
    assert "decoder/layers_0/mlp/wi_0: shape (3, 3)" in msg
