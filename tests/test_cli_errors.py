"""The CLI answers mistakes with one line, and inference never writes into a model directory.

Every mistake (a missing or broken model directory, an unknown language, a bad flag
value, a binary file where text or a vocabulary belongs) ends the command with exactly
one line on stderr, ``error: ...``, and a non-zero status; ``--debug`` (anywhere) or
``JAXMT_DEBUG=1`` shows the traceback instead. Argument, directory and language checks
run before any model is loaded: they answer even when the checkpoints are missing, and
without importing JAX. ``--attention`` replaces only the encoder's implementation.
"""

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys

import pytest

from jaxmt import cli
from jaxmt import config as cfglib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="3")
ENV.pop("JAXMT_DEBUG", None)
TRAINED_ATTENTION = cfglib.AttentionConfig(decoder="local", cross="blockwise", window=16,
                                           block_size=64)

# Runs main() on several argument lists in one interpreter, doing what the interpreter
# does with an uncaught SystemExit (a string: printed on stderr, status 1), and notes
# whether JAX has been imported so far.
_DRIVER = """
import contextlib, io, json, sys, traceback
from jaxmt.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) or e.code is None else 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            rc = "raised"
    out.append({"argv": argv, "rc": rc or 0, "err": err.getvalue(), "jax": "jax" in sys.modules})
print(json.dumps(out))
"""


def _drive(*argvs):
    proc = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(argvs)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=ENV, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _jaxmt(*argv, env=None):
    return subprocess.run([sys.executable, "-m", "jaxmt.cli", *argv], cwd=ROOT, text=True,
                          capture_output=True, timeout=300, env=env or ENV,
                          stdin=subprocess.DEVNULL, check=False)


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def _expect_one_lines(cases: list, jax_after: int = 0) -> list[dict]:
    """Runs each ``(argv, pattern)`` case through :func:`_drive`: each fails with one
    error line matching its pattern, and none but the last ``jax_after`` imported JAX.

    Returns:
      The results, for further checks."""
    results = _drive(*[argv for argv, _ in cases])
    for (argv, want), r in zip(cases, results):
        assert r["rc"] not in (0, "raised"), (argv, r)
        line = _one_error_line(r["err"])
        assert re.search(want, line), (argv, line)
    assert [r["argv"] for r in results[:len(results) - jax_after] if r["jax"]] == []
    return results


def _spm(path):
    """A SentencePiece model trained in milliseconds on a few sentences."""
    import sentencepiece as spm

    sents = ["In the beginning God created the heaven and the earth.",
             "Am Anfang schuf Gott Himmel und Erde.", "And the earth was without form.",
             "Und die Erde war wüst und leer."] * 20
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sents), model_writer=f, vocab_size=60,
            user_defined_symbols=["<2en>", "<2de>"], hard_vocab_limit=False, pad_id=0,
            eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    return path


def _model_cfg():
    return cfglib.ModelConfig(vocab_size=64, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                              num_encoder_layers=1, num_decoder_layers=1, precision="fp32",
                              attention=TRAINED_ATTENTION)


def _model_dir(path):
    """A jaxmt model directory without checkpoints: config and vocabulary only."""
    os.makedirs(path)
    _spm(os.path.join(path, cfglib.VOCAB_FILE))
    with open(os.path.join(path, cfglib.CONFIG_FILE), "w") as f:
        f.write(cfglib.to_json(model=_model_cfg(),
                               data=cfglib.DataConfig(langs=("en", "de"), max_eval_len=32),
                               train=cfglib.TrainConfig()))
    return str(path)


def _snapshot(root) -> dict:
    """Every path under ``root``: kind, size, mtime and (files) SHA-1."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(d, name)
            st = os.stat(p)
            digest = None
            if name in files:
                with open(p, "rb") as f:
                    digest = hashlib.sha1(f.read()).hexdigest()
            out[os.path.relpath(p, root)] = (name in dirs, st.st_size, st.st_mtime_ns, digest)
    out["."] = (True, 0, os.stat(root).st_mtime_ns, None)
    return out


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    model = _model_dir(tmp / "model")  # no checkpoints: a loaded model would fail
    (tmp / "empty").mkdir()
    (tmp / "corrupt").mkdir()
    (tmp / "corrupt" / cfglib.CONFIG_FILE).write_text('{"model": {')
    (tmp / "bert").mkdir()
    (tmp / "bert" / "config.json").write_text('{"model_type": "bert"}')
    marian = tmp / "marian"  # as `jaxmt convert` writes a multilingual opus-mt model
    marian.mkdir()
    tok = cfglib.TokenizerConfig(kind="marian", vocab_files=("source.spm", "target.spm",
                                                             "vocab.json"),
                                 input_prefix=">>{tgt}<< ", target_langs=("fra", "deu"))
    for name in tok.vocab_files:
        (marian / name).write_text("unused")
    (marian / cfglib.CONFIG_FILE).write_text(cfglib.to_json(model=_model_cfg(), tokenizer=tok))
    binary = tmp / "binary.tsv"  # an executable's bytes under a corpus name
    binary.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 40)
    return {"tmp": tmp, "model": model, "binary": str(binary)}


def test_mistakes_are_one_line_before_anything_loads(bad_inputs):
    tmp, model, binary = bad_inputs["tmp"], bad_inputs["model"], bad_inputs["binary"]
    before = _snapshot(tmp)
    tr = ["translate", f"--model_dir={model}"]
    cases = [  # (argv, what the line must name)
        (["translate", f"--model_dir={tmp / 'none'}", "--src_lang=en", "--tgt_lang=de"],
         "--model_dir=.*none: no such directory; pass a directory written by `jaxmt train`"),
        (["translate", f"--model_dir={tmp / 'empty'}", "--src_lang=en", "--tgt_lang=de"],
         "--model_dir=.*empty: not a model directory \\(no jaxmt_config.json\\)"),
        (["translate", f"--model_dir={tmp / 'corrupt'}", "--src_lang=en", "--tgt_lang=de"],
         "corrupt/jaxmt_config.json: .*JSON.*; fix the file"),
        (["eval", f"--model_dir={tmp / 'corrupt'}"], "corrupt/jaxmt_config.json"),
        (tr + ["--src_lang=xx", "--tgt_lang=de"],
         "--src_lang='xx' is not one of this model's languages; choose one of en, de"),
        (tr + ["--tgt_lang=de"], "--src_lang is required: this model translates between en, de"),
        (tr + ["--src_lang=en"], "--tgt_lang is required"),
        (tr + ["--src_lang=en", "--tgt_lang=de", "--attention=sparse"],
         "--attention=sparse: unknown implementation; choose one of xla, "),
        (tr + ["--src_lang=en", "--tgt_lang=de", "--max_len=-3"],
         "--max_len=-3: must be a positive number"),
        (tr + ["--src_lang=en", "--tgt_lang=de", "--max_len=0"],
         "--max_len=0: must be a positive number"),
        (["eval", f"--model_dir={model}", "--max_examples=-1"],
         "--max_examples=-1: must be a positive number"),
        (["eval", f"--model_dir={model}", "--step=7"],
         "--step=7: .*model has no checkpoint step 7 \\(it has none\\)"),
        (tr + ["--src_lang=en", "--tgt_lang=de", "--beam=0"],
         "--beam=0: DecodeConfig.beam_size: must be >= 1"),
        (tr + ["--src_lang=en", "--tgt_lang=de", "--beam=4", "--n_best=5"],
         "--n_best=5: DecodeConfig.n_best: 5 outputs per sentence, but strategy 'beam' gives 4"),
        (tr + ["--src_lang=en", "--tgt_lang=de", "--top_k=5"],
         "--top_k=5: applies to sampling only; add --sample"),
        (tr + ["--src_lang=en", "--tgt_lang=de", "--sample", "--top_p=1.5"],
         "--top_p=1.5: DecodeConfig.top_p: must be <= 1"),
        (tr + ["--src_lang=en", "--tgt_lang=de", "--sample", "--beam=2"],
         "--sample and --beam: pick one"),
        (tr + ["--src_lang=en", "--tgt_lang=de", "--length_penalty=long"],
         "--length_penalty=long: give ALPHA"),
        (tr + ["--src_lang=en", "--tgt_lang=de", "--length_penalty=wu:0.6"],
         "--length_penalty=wu:0.6: DecodeConfig.length_penalty: unknown value 'wu'"),
        (["eval", f"--model_dir={model}", "--max_len_a=-1"],
         "--max_len_a=-1.0: DecodeConfig.max_len_a: must be >= 0"),
        (tr + ["--src_lang=en", "--tgt_lang=de", "--mesh=data=4,tensr=2"],
         "--mesh=data=4,tensr=2: unknown axis 'tensr' \\(did you mean 'tensor'\\?\\); give "
         "AXIS=SIZE pairs"),
        (tr + ["--src_lang=en", "--tgt_lang=de", "--mesh=tensor=two"],
         "--mesh=tensor=two: tensor=two: not an integer"),
        (["eval", f"--model_dir={model}", "--mesh=data=-1,fsdp=-1"],
         "--mesh=data=-1,fsdp=-1: MeshConfig.replica/data/fsdp/tensor: at most one axis may "
         "be -1"),
        (tr + ["--src_lang=en", "--tgt_lang=de", f"--input={tmp / 'none.txt'}"],
         "--input=.*none.txt: no such file"),
        (["translate", f"--model_dir={tmp / 'marian'}"],
         ("--tgt_lang is required: this model's input prefix is '>>{tgt}<< '; pass "
          "--tgt_lang=CODE \\(one of fra, deu\\)")),
        (["translate", f"--model_dir={tmp / 'marian'}", "--tgt_lang=xx"],
         "--tgt_lang='xx' is not one of this model's target languages; choose one of fra, "),
        (["eval", f"--model_dir={tmp / 'marian'}"], "no data section \\(an imported model\\)"),
        (["vocab", "report", f"--vocab={binary}", "--langs=en"],
         "binary.tsv: not a SentencePiece model \\(.*\\); pass --vocab=FILE.model"),
        (["data", "validate", "--src_lang=en", "--tgt_lang=de", binary],
         "binary.tsv: not a UTF-8 text corpus .*; pass a UTF-8 TSV, JSONL or text file"),
        (["train", f"--model_dir={tmp / 'ft'}", f"--init_from={tmp / 'none'}"],
         "--init_from=.*none: no such directory"),
        (["export", f"--model_dir={tmp / 'none'}", f"--out={tmp / 'out'}"],
         "--model_dir=.*none: no such directory"),
        (["export", f"--model_dir={model}", f"--out={binary}"],
         "--out=.*binary.tsv: already exists and is not an empty directory"),
        # `jaxmt distill translate`: flags, teacher, --out and gin, before JAX.
        (["distill", "translate", f"--teacher={tmp / 'none'}", f"--out={tmp / 'd'}"],
         "--teacher=.*none: no such directory; pass a model directory"),
        (["distill", "translate", f"--teacher={tmp / 'empty'}", f"--out={tmp / 'd'}"],
         "--teacher=.*empty: not a model directory \\(no jaxmt_config.json\\)"),
        (["distill", "translate", f"--teacher={model}", f"--out={binary}/d"],
         "--out=.*binary.tsv/d: .*binary.tsv is a file, not a directory"),
        (["distill", "translate", f"--teacher={model}", f"--out={model}/d"],
         "--out=.*model/d: inside the teacher's directory, which is only read"),
        (["distill", "translate", f"--teacher={model}", f"--out={tmp / 'd'}", "--beam=0"],
         "--beam=0: DecodeConfig.beam_size: must be >= 1"),
        (["distill", "translate", f"--teacher={model}", f"--out={tmp / 'd'}",
          "--max_per_direction=0"], "--max_per_direction=0: must be positive"),
        (["distill", "translate", f"--teacher={model}", f"--out={tmp / 'd'}",
          "--num_processes=2"], "missing: --coordinator_address"),
        (["distill", "translate", f"--teacher={model}", f"--out={tmp / 'd'}",
          f"--gin_file={tmp / 'none.gin'}"], "--gin_file=.*none.gin: no such file"),
        (["distill", "translate", f"--teacher={model}", f"--out={tmp / 'd'}",
          "--gin.TRAIN_STPES=5"], "macro TRAIN_STPES is set but nothing uses it"),
        # The one case that parses gin (which locks its config in this interpreter).
        (["distill", "translate", f"--teacher={model}", f"--out={tmp / 'd'}"],
         "--teacher=.*model cannot translate en-fr, a training direction of the gin config: "
         "tgt_lang='fr' is not one of this model's languages; choose one of en, de"),
        # Hugging Face folders are read with hf_import, which imports JAX: last.
        (["convert", f"--from_hf={tmp / 'empty'}", f"--out={tmp / 'out'}"],
         "empty: not a Hugging Face checkpoint \\(no config.json\\)"),
        (["convert", f"--from_hf={tmp / 'bert'}", f"--out={tmp / 'out'}"],
         "bert/config.json: model_type='bert': unsupported; jaxmt imports t5, mt5, marian"),
        (["translate", f"--model_dir={tmp / 'bert'}"], "model_type='bert': unsupported"),
    ]
    results = _drive(*[argv for argv, _ in cases])
    for (argv, want), r in zip(cases, results):
        assert r["rc"] not in (0, "raised"), (argv, r)
        line = _one_error_line(r["err"])
        assert re.search(want, line), (argv, line)
        print(" ".join(argv[:1] + [a.replace(str(tmp), "T") for a in argv[1:]]), "->", line)
    # Nothing so far loaded a model, or even JAX, except to read a Hugging Face config.
    assert [r["argv"] for r in results[:-3] if r["jax"]] == []
    assert _snapshot(tmp) == before  # no checkpoints/, no output directory


def test_one_line_from_the_command_and_debug_shows_the_traceback(bad_inputs):
    corrupt = f"--model_dir={bad_inputs['tmp'] / 'corrupt'}"
    p = _jaxmt("translate", corrupt, "--src_lang=en", "--tgt_lang=de")
    assert p.returncode == 1 and "jaxmt_config.json" in _one_error_line(p.stderr)
    for argv, env in ((["--debug", "translate", corrupt], ENV),
                      (["translate", corrupt, "--debug"], ENV),
                      (["translate", corrupt], dict(ENV, JAXMT_DEBUG="1"))):
        p = _jaxmt(*argv, env=env)
        assert p.returncode == 1 and "Traceback (most recent call last)" in p.stderr, argv
        assert "jaxmt_config.json" in p.stderr.splitlines()[-1]
    p = _jaxmt("data", "validate", "--src_lang=en", "--tgt_lang=de", bad_inputs["binary"])
    assert p.returncode == 1 and "not a UTF-8 text corpus" in _one_error_line(p.stderr)


def test_unexpected_errors_are_one_line_too(monkeypatch, capsys):
    from jaxmt.cli import model_commands

    def broken(args, gin_overrides):
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(model_commands, "cmd_translate", broken)
    with pytest.raises(SystemExit) as e:
        cli.main(["translate", "--model_dir=m"])
    assert e.value.code == ("error: unexpected RuntimeError: something broke (rerun with "
                            "--debug for the traceback)")
    with pytest.raises(RuntimeError, match="something"):
        cli.main(["translate", "--model_dir=m", "--debug"])
    with pytest.raises(SystemExit) as e:  # argparse's usage errors stay as they are
        cli.main(["translate"])
    assert e.value.code == 2


# ---------------------------------------------------------------- with a checkpoint

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model directory with a (randomly initialised) params checkpoint at step 1."""
    import jax
    import numpy as np

    from jaxmt.checkpoint import save_params
    from jaxmt.modeling.model import EncoderDecoderModel

    d = _model_dir(tmp_path_factory.mktemp("trained") / "model")
    rng = np.random.default_rng(0)  # random values of the right shapes: nothing compiles
    params = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(s.dtype),
                          EncoderDecoderModel(_model_cfg()).param_shapes())
    save_params(d, params, {"step": 1})
    return d


@pytest.mark.slow
def test_inference_never_writes_into_the_model_dir(trained, bad_inputs, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("In the beginning.\nUnd die Erde.\n")
    no_checkpoints = bad_inputs["model"]
    before = _snapshot(trained), _snapshot(no_checkpoints)
    results = _drive(
        ["translate", f"--model_dir={trained}", "--src_lang=en", "--tgt_lang=de",
         f"--input={src}", f"--output={tmp_path / 'out.txt'}", "--attention=local"],
        ["eval", f"--model_dir={trained}", "--max_examples=2", "--json"],
        ["translate", f"--model_dir={no_checkpoints}", "--src_lang=en", "--tgt_lang=de",
         f"--input={src}"],
        ["eval", f"--model_dir={no_checkpoints}", "--max_examples=2"])
    assert [r["rc"] for r in results] == [0, 0, 1, 1], results
    assert len((tmp_path / "out.txt").read_text().splitlines()) == 2
    for r in results[2:]:
        assert "checkpoints: no checkpoints there" in _one_error_line(r["err"])
        print(" ".join(r["argv"]), "->", _one_error_line(r["err"]))
    assert (_snapshot(trained), _snapshot(no_checkpoints)) == before
    assert not os.path.exists(os.path.join(no_checkpoints, "checkpoints"))


@pytest.mark.slow
def test_attention_flag_replaces_only_the_encoder(trained, tmp_path, monkeypatch):
    from jaxmt.inference import translator

    loaded = []
    original = translator.Translator.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        loaded.append(original(cls, *args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(translator.Translator, "from_pretrained", classmethod(spy))
    src = tmp_path / "in.txt"
    src.write_text("In the beginning.\n")
    assert cli.main(["translate", f"--model_dir={trained}", "--src_lang=en", "--tgt_lang=de",
                     f"--input={src}", f"--output={tmp_path / 'out.txt'}",
                     "--attention=performer", "--max_len=16"]) == 0
    got = loaded[0].model.cfg.attention
    assert got == dataclasses.replace(TRAINED_ATTENTION, encoder="performer")
    assert (got.decoder, got.cross, got.window, got.block_size) == ("local", "blockwise", 16, 64)
    assert loaded[0].max_src_len == loaded[0].max_decode_len == 16
    # Without --attention the trained settings, whole; an explicit step restores too.
    assert translator.Translator.from_pretrained(trained, step=1).model.cfg.attention == (
        TRAINED_ATTENTION)


def test_failed_save_noise_from_libraries_is_dropped_without_debug():
    """A failed Orbax save is reported by jaxmt in one line; without --debug the
    libraries' own reports of it (absl ERRORs with tracebacks from Orbax's threads,
    asyncio's unawaited futures, the closed loop's unraisable errors) are dropped,
    while other warnings still print, without tracebacks."""
    script = r'''
import logging, sys
from jaxmt.cli import _quiet_library_noise
_quiet_library_noise()
from absl import logging as absl_logging
exec(compile("from absl import logging as a\ntry:\n    1 / 0\nexcept Exception:\n"
             "    a.exception('writer thread failed')", "/x/orbax/checkpoint/fake.py", "exec"))
try:
    1 / 0
except Exception:
    absl_logging.warning("kept, without its traceback", exc_info=True)
logging.getLogger("asyncio").error("Task exception was never retrieved")
class U: pass
u = U(); u.exc_type, u.exc_value, u.exc_traceback = RuntimeError, RuntimeError("Event loop is closed"), None
u.err_msg, u.object = None, None
sys.unraisablehook(u)
'''
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == ["WARNING:absl:kept, without its traceback"], r.stderr


def test_quantize_mistakes_are_one_line_before_jax(bad_inputs):
    """`jaxmt quantize`: a missing or non-model directory, an --out in the way, an
    already quantized model or a Hugging Face folder: one line each, without JAX."""
    tmp, model = bad_inputs["tmp"], bad_inputs["model"]
    quantized = tmp / "quantized"  # a quantized model's configs (no weights needed)
    if not quantized.exists():
        quantized.mkdir()
        (quantized / cfglib.CONFIG_FILE).write_text(cfglib.to_json(
            model=dataclasses.replace(_model_cfg(), quant="int8"),
            data=cfglib.DataConfig(langs=("en", "de")), train=cfglib.TrainConfig()))
        _spm(quantized / cfglib.VOCAB_FILE)
    before = _snapshot(tmp)
    out = f"--out={tmp / 'out'}"
    cases = [
        (["quantize", f"--model_dir={tmp / 'none'}", out], "--model_dir=.*none: no such directory"),
        (["quantize", f"--model_dir={model}", f"--out={bad_inputs['binary']}"],
         "--out=.*binary.tsv: already exists and is not an empty directory"),
        (["quantize", f"--model_dir={model}", f"--out={quantized}"],
         "--out=.*quantized: already exists and is not an empty directory"),
        (["quantize", f"--model_dir={tmp / 'empty'}", out],
         "--model_dir=.*empty: not a model directory \\(no jaxmt_config.json\\)"),
        (["quantize", f"--model_dir={quantized}", out],
         "--model_dir=.*quantized: already quantized \\(ModelConfig.quant='int8'\\); quantize "
         "its float source"),
        (["quantize", f"--model_dir={tmp / 'bert'}", out],
         "--model_dir=.*bert: a Hugging Face folder; convert it first"),
        (["quantize", f"--model_dir={model}", f"--out={model}/int8"],
         "--out=.*/int8: inside --model_dir, which is only read"),
    ]
    _expect_one_lines(cases)
    assert _snapshot(tmp) == before


def test_prune_mistakes_are_one_line(bad_inputs):
    tmp, model = bad_inputs["tmp"], bad_inputs["model"]  # model: 2 heads, mlp_dim 32
    before = _snapshot(tmp)
    out = f"--out={tmp / 'out'}"
    pr = ["prune", f"--model_dir={model}", out]
    cases = [
        (["prune", f"--model_dir={tmp / 'none'}", out, "--structured=0.3"],
         "--model_dir=.*none: no such directory"),
        (["prune", f"--model_dir={model}", f"--out={bad_inputs['binary']}", "--sparsity=0.5"],
         "--out=.*binary.tsv: already exists and is not an empty directory"),
        (pr + ["--sparsity=0.5", "--structured=0.3"],
         "--sparsity and --structured: give exactly one"),
        (pr, "--sparsity and --structured: give exactly one"),
        (pr + ["--structured=1.5"], "--structured=1.5: must be a fraction in \\(0, 1\\)"),
        (pr + ["--sparsity=0"], "--sparsity=0.0: must be a fraction in \\(0, 1\\)"),
        (pr + ["--structured=0.3", "--multiple_of=0"], "--multiple_of=0: must be >= 1"),
        (["prune", f"--model_dir={tmp / 'empty'}", out, "--sparsity=0.5"],
         "--model_dir=.*empty: not a model directory \\(no jaxmt_config.json\\)"),
        (["prune", f"--model_dir={tmp / 'bert'}", out, "--sparsity=0.5"],
         "--model_dir=.*bert: a Hugging Face folder; convert it first"),
        (["prune", f"--model_dir={model}", f"--out={model}", "--sparsity=0.5"],
         "--out=.*: inside --model_dir, which is only read"),
        # Counting the kept heads takes jaxmt.compress.prune (JAX), still before any weights.
        (pr + ["--structured=0.9"],
         "--structured=0.9: would leave no num_heads of ModelConfig.num_heads=2; use a "
         "smaller fraction"),
    ]
    _expect_one_lines(cases, jax_after=1)
    assert _snapshot(tmp) == before


def test_plan_mistakes_are_one_line_before_jax(bad_inputs, tmp_path):
    """`jaxmt plan`: a bad model, target, batch, length, headroom, --verify or output path
    is one line naming the flag, before JAX is imported; a model and batch no mesh over
    the target splits is one line too (after the analytic pass starts)."""
    tmp = bad_inputs["tmp"]
    ok = ["--target=cpu:8", "--batch=8", "--src_len=16", "--tgt_len=16", "--verify=0"]
    plan = ["plan", "--model=tiny"]
    cases = [
        (["plan", "--model=huge", *ok],
         "--model=huge: unknown model; give a preset \\(.*base.*tiny.*\\) or a gin file"),
        (["plan", f"--model={tmp / 'none.gin'}", *ok], "--model=.*none.gin: no such gin file"),
        (plan + ["--target=tpu-v9:4x4", "--batch=8", "--src_len=16", "--tgt_len=16"],
         "--target=tpu-v9:4x4: bad target 'tpu-v9:4x4': unknown TPU 'v9'.*accepted forms: cpu:N"),
        (plan + ["--target=gpu8", "--batch=8", "--src_len=16", "--tgt_len=16"],
         "--target=gpu8: bad target 'gpu8': expected FAMILY:SIZES"),
        (plan + ["--target=cpu:8", "--batch=8", "--batch_tokens=256", "--src_len=16",
                 "--tgt_len=16"], "--batch and --batch_tokens: give exactly one"),
        (plan + ["--target=cpu:8", "--src_len=16", "--tgt_len=16"],
         "--batch and --batch_tokens: give exactly one"),
        (plan + ["--target=cpu:8", "--batch=0", "--src_len=16", "--tgt_len=16"],
         "--batch=0: must be a positive number of rows"),
        (plan + ["--target=cpu:8", "--batch_tokens=20", "--src_len=16", "--tgt_len=16"],
         "--batch_tokens=20: must be at least one row of --src_len \\+ --tgt_len = 32 tokens"),
        (plan + ["--target=cpu:8", "--batch=8", "--src_len=0", "--tgt_len=16"],
         "--src_len=0: must be a positive number of tokens"),
        (plan + [*ok, "--headroom=1.5"], "--headroom=1.5: must be a fraction in \\(0, 1\\]"),
        (plan + [*ok[:-1], "--verify=-1"], "--verify=-1: must be >= 0"),
        (plan + [*ok, f"--out={tmp}"], "--out=.*: a directory; give a file name"),
        (plan + [*ok, f"--plot={bad_inputs['binary']}/p.png"],
         "--plot=.*binary.tsv/p.png: cannot write there \\(.*binary.tsv is not a writable"),
        # Past the checks (JAX loads): 3 devices split neither tiny's 4 heads nor a batch of 2.
        (plan + ["--target=cpu:3", "--batch=2", "--src_len=16", "--tgt_len=16", "--verify=0"],
         "--model=tiny --target=cpu:3 --batch=2: no mesh over the 3 devices of cpu:3 splits "
         "this model and batch 2"),
    ]
    _expect_one_lines(cases, jax_after=1)
    assert not list(tmp_path.iterdir())


def test_profile_mistakes_are_one_line_before_jax(bad_inputs):
    tmp, model = bad_inputs["tmp"], bad_inputs["model"]
    before = _snapshot(tmp)
    cases = [
        (["profile", f"--model_dir={tmp / 'none'}"],
         "--model_dir=.*none: no such directory; pass a directory written by `jaxmt train`"),
        (["profile", f"--model_dir={bad_inputs['binary']}"],
         "--model_dir=.*binary.tsv: a file, not a directory"),
        (["profile", f"--model_dir={tmp / 'empty'}"],
         "--model_dir=.*empty: not a model directory \\(no jaxmt_config.json\\)"),
        (["profile", f"--model_dir={tmp / 'corrupt'}"], "corrupt/jaxmt_config.json: "),
        (["profile", f"--model_dir={tmp / 'marian'}"],
         "--model_dir=.*marian: its jaxmt_config.json has no data, train section"),
        (["profile", f"--model_dir={model}", "--steps=0"], "--steps=0: must be at least 1"),
        (["profile", f"--model_dir={model}", "--warmup=0"], "--warmup=0: must be at least 1"),
    ]
    _expect_one_lines(cases)
    assert _snapshot(tmp) == before  # no profile/ written
