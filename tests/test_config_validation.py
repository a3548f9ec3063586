"""Every config value is checked, gin typos fail, and jaxmt_config.json is validated.

Fast: no training, no compilation. The gin tests use ``configs_only=True`` (no JAX
import); one subprocess runs the real ``jaxmt train`` command line up to its gin check.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import gin
import numpy as np
import pytest

from jaxmt import config as cfglib
from jaxmt.config import DataConfig, MeshConfig, ModelConfig, TokenizerConfig, TrainConfig
from jaxmt.data.sources import CleanConfig, CorpusSource
from jaxmt.gin_files import GIN_DIR, parse_gin

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_construct():
    for cls in (ModelConfig, MeshConfig, DataConfig, TrainConfig, CleanConfig):
        cls()
    train = TrainConfig()
    assert (train.max_nonfinite_steps, train.preemption_grace_s) == (10, 30.0)
    TokenizerConfig(kind="t5", vocab_files=("spiece.model",))


BAD = [
    (TrainConfig, {"steps": 2.5}, "steps", "must be an int, got 2.5"),
    (TrainConfig, {"steps": "5"}, "steps", "got '5' (str)"),  # --gin.TrainConfig.steps='"5"'
    (TrainConfig, {"steps": 0}, "steps", ">= 1"),
    (TrainConfig, {"batch_size": True}, "batch_size", "must be an int, got True"),
    (TrainConfig, {"learning_rate": "abc"}, "learning_rate", "finite number, got 'abc'"),
    (TrainConfig, {"learning_rate": 0.0}, "learning_rate", "> 0"),
    (TrainConfig, {"learning_rate": float("nan")}, "learning_rate", "finite"),
    (TrainConfig, {"log_every": 0}, "log_every", ">= 1, got 0"),
    (TrainConfig, {"checkpoint_every": -1}, "checkpoint_every", ">= 1, got -1"),
    (TrainConfig, {"warmup_steps": -5}, "warmup_steps", ">= 0, got -5"),
    (TrainConfig, {"grad_clip": -1.0}, "grad_clip", "> 0, got -1.0"),
    (TrainConfig, {"keep_checkpoints": 0}, "keep_checkpoints", ">= 1"),
    (TrainConfig, {"weight_decay": -0.1}, "weight_decay", ">= 0"),
    (TrainConfig, {"z_loss": -1e-4}, "z_loss", ">= 0"),
    (TrainConfig, {"seed": -1}, "seed", ">= 0"),
    (TrainConfig, {"label_smoothing": 1.0}, "label_smoothing", "[0, 1)"),
    (TrainConfig, {"optimizer": "sgd"}, "optimizer", "unknown optimizer"),
    (TrainConfig, {"max_nonfinite_steps": 0}, "max_nonfinite_steps", ">= 1"),
    (TrainConfig, {"preemption_grace_s": 0}, "preemption_grace_s", "> 0"),
    (ModelConfig, {"emb_dim": 64.5}, "emb_dim", "must be an int, got 64.5"),
    (ModelConfig, {"num_heads": 0}, "num_heads", ">= 1"),
    (ModelConfig, {"dropout_rate": "0.1"}, "dropout_rate", "finite number"),
    (ModelConfig, {"norm_epsilon": 0.0}, "norm_epsilon", "> 0"),
    (ModelConfig, {"use_bias": 1}, "use_bias", "True or False, got 1"),
    (ModelConfig, {"mlp_activations": "gelu"}, "mlp_activations", "tuple of strings"),
    (ModelConfig, {"precision": "fp8"}, "precision", "choose one of"),
    (MeshConfig, {"data": 2.0}, "data", "must be an int"),
    (MeshConfig, {"shard_params": "yes"}, "shard_params", "True or False"),
    (DataConfig, {"vocab_size": -3}, "vocab_size", "must exceed 267"),
    (DataConfig, {"vocab_size": 100}, "vocab_size", "256 byte pieces"),
    (DataConfig, {"max_eval_len": 0}, "max_eval_len", ">= 1, got 0"),
    (DataConfig, {"vocab_sample_per_lang": 0}, "vocab_sample_per_lang", ">= 1"),
    (DataConfig, {"src_len": 0}, "src_len", ">= 1"),
    (DataConfig, {"temperature": 0}, "temperature", "> 0"),
    (DataConfig, {"mixture_cap": -1}, "mixture_cap", ">= 0"),
    (DataConfig, {"langs": ("en", "EN_us")}, "langs", "invalid language code"),
    (DataConfig, {"bucket_lengths": (16, 32.5)}, "bucket_lengths", "tuple of ints"),
    (DataConfig, {"mixture_caps": 5}, "mixture_caps", "must be a dict"),
    (DataConfig, {"cache_dir": None}, "cache_dir", "must be a string"),
    (DataConfig, {"clean": {"max_char": 5}}, "clean", "did you mean 'max_chars'"),
    (DataConfig, {"corpora": "data/x.tsv"}, "corpora", "must be a tuple"),
    (DataConfig, {"corpora": ({"path": "x.tsv", "src_lang": "en"},)}, "corpora", "tgt_lang"),
    (CleanConfig, {"max_chars": True}, "max_chars", "positive integer"),
    (CleanConfig, {"max_length_ratio": "3"}, "max_length_ratio", ">= 1 or None"),
    (CleanConfig, {"dedup": "no"}, "dedup", "True or False"),
    (CorpusSource, {"path": 3, "src_lang": "en", "tgt_lang": "de"}, "path", "path"),
    (CorpusSource, {"path": "x.tsv", "src_lang": "en", "tgt_lang": "de",
                    "both_directions": "yes"}, "both_directions", "True or False"),
    (TokenizerConfig, {"kind": "t5", "vocab_files": "spiece.model"}, "vocab_files", "tuple"),
    (TokenizerConfig, {"kind": "t5", "vocab_files": ("s",), "suppressed_ids": (-1,)},
     "suppressed_ids", ">= 0"),
]


@pytest.mark.parametrize("cls,kwargs,field,what", BAD,
                         ids=[f"{c.__name__}.{f}-{i}" for i, (c, _, f, _) in enumerate(BAD)])
def test_bad_value_names_the_field(cls, kwargs, field, what):
    with pytest.raises(ValueError) as e:
        cls(**kwargs)
    first = str(e.value).splitlines()[0]
    assert first.startswith(f"{cls.__name__}.{field}: "), first
    assert what in first, first


def test_values_are_normalised():
    t = TrainConfig(learning_rate=1, steps=np.int64(7), preemption_grace_s=5)
    assert (type(t.learning_rate), type(t.steps), t.preemption_grace_s) == (float, int, 5.0)
    d = DataConfig(langs=["en", "de"], bucket_lengths=[8, 16])
    assert d.langs == ("en", "de") and d.bucket_lengths == (8, 16)


# ---------------------------------------------------------------- gin

def _gin_error(files, overrides, configs_only=True) -> str:
    gin.clear_config()
    try:
        with pytest.raises(SystemExit) as e:
            parse_gin(files, overrides, configs_only=configs_only)
    finally:
        gin.clear_config()
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("override,fragments", [
    ("--gin.TRAIN_STPES=5", ["--gin.TRAIN_STPES=5", "TRAIN_STPES", "did you mean TRAIN_STEPS"]),
    ("--gin.TrainConfig.stpes=5", ["TrainConfig has no parameter 'stpes'",
                                   "did you mean TrainConfig.steps"]),
    ("--gin.TrainConfg.steps=5", ["unknown configurable 'TrainConfg'", "did you mean TrainConfig"]),
    ("--gin.TrainConfig.steps=%TRAIN_STPES", ["%TRAIN_STPES is used but never set",
                                              "did you mean TRAIN_STEPS"]),
    ("--gin.TrainConfig.steps='5'", ["TrainConfig.steps: must be an int, got '5'"]),
    ("--gin.TrainConfig.log_every=0", ["TrainConfig.log_every: must be >= 1, got 0"]),
    ("--gin.TrainConfig.steps=(", ["--gin.TrainConfig.steps=(", "invalid gin syntax"]),
])
def test_gin_typo_in_an_override_fails_with_a_suggestion(override, fragments):
    msg = _gin_error(["runs/demo.gin"], [override])
    for fragment in fragments:
        assert fragment in msg, msg


def test_gin_typo_in_a_file_names_file_and_line(tmp_path):
    run = tmp_path / "run.gin"
    run.write_text("include 'runs/demo.gin'\nBATCH_SIZ = 8\n")
    msg = _gin_error([str(run)], [])
    assert f"{run}:2: macro BATCH_SIZ" in msg and "did you mean BATCH_SIZE" in msg, msg
    run.write_text("include 'runs/demo.gin'\n\nDataConfig.vocab_sise = 900\n")
    assert f"{run}:3: DataConfig has no parameter 'vocab_sise'" in _gin_error([str(run)], [])
    run.write_text("ModelConfig.emb_dim = 128\nModelConfig.mlp_activations = (\n")
    assert f"error: {run}:3: invalid gin syntax" in _gin_error([str(run)], [])
    run.write_text("include 'models/tiyn.gin'\n")
    assert f"{run}:1: include 'models/tiyn.gin': no such file" in _gin_error([str(run)], [])


def test_bindings_of_other_modules_are_skipped_under_configs_only(tmp_path):
    """`jaxmt data mixture` loads a run's gin file whose `train.*` JAX never registers."""
    _assert_run_file_parses(tmp_path, "include 'runs/demo.gin'\nPROGRESS = False\n"
                                      "train.progress = %PROGRESS\n")


def _assert_run_file_parses(tmp_path, text):
    """A run file of ``text`` loads with configs_only and takes a macro override."""
    run = tmp_path / "run.gin"
    run.write_text(text)
    gin.clear_config()
    try:
        parse_gin([str(run)], ["--gin.TRAIN_STEPS=7"], configs_only=True)
        assert TrainConfig().steps == 7
    finally:
        gin.clear_config()


def test_include_works_beside_a_folder_named_like_the_preset_folder(tmp_path, monkeypatch):
    """`make demo` then `make test` in one checkout: the demo's `runs/` folder, on
    sys.path, is a namespace package `runs`, and gin's package lookup of
    `include 'runs/demo.gin'` raised TypeError on it."""
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    monkeypatch.syspath_prepend(str(tmp_path))
    _assert_run_file_parses(tmp_path, "include 'runs/demo.gin'\n")


@pytest.mark.parametrize("path", sorted(p.relative_to(GIN_DIR).as_posix()
                                        for p in GIN_DIR.rglob("*.gin")))
def test_every_shipped_gin_file_parses(path):
    gin.clear_config()
    try:
        parse_gin([path], [], configs_only=True)
    finally:
        gin.clear_config()


def test_cli_gin_typo_is_one_line_without_traceback(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "jaxmt.cli", "train", f"--model_dir={tmp_path / 'm'}",
         "--gin_file=runs/demo.gin", "--gin.TRAIN_STPES=5"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "TRAIN_STPES" in errors[0] and "TRAIN_STEPS" in errors[0], \
        proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------- jaxmt_config.json

def _configs() -> dict:
    return {"model": ModelConfig(), "mesh": MeshConfig(), "data": DataConfig(),
            "train": TrainConfig()}


def _write(tmp_path, raw) -> Path:
    text = raw if isinstance(raw, str) else json.dumps(raw)
    (tmp_path / cfglib.CONFIG_FILE).write_text(text)
    return tmp_path / cfglib.CONFIG_FILE


def _load_error(tmp_path, raw) -> str:
    path = _write(tmp_path, raw)
    with pytest.raises(ValueError) as e:
        cfglib.load(str(tmp_path))
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg, msg
    return msg


def test_config_json_round_trips(tmp_path):
    configs = _configs()
    configs["data"] = DataConfig(corpora=({"path": "a.tsv", "src_lang": "en",
                                           "tgt_lang": "pt-BR"},), clean={"max_chars": 99})
    _write(tmp_path, cfglib.to_json(**configs))
    assert cfglib.load(str(tmp_path)) == configs


def test_corrupt_config_json_names_file_line_and_column(tmp_path):
    text = cfglib.to_json(**_configs())
    msg = _load_error(tmp_path, text[:200])
    assert "invalid JSON at line" in msg and "column" in msg, msg
    assert "expected a JSON object" in _load_error(tmp_path, "[1, 2]")


@pytest.mark.parametrize("edit,fragments", [
    (lambda r: r.update(trian=r.pop("train")), ["unknown section 'trian'", "did you mean 'train'"]),
    (lambda r: r["train"].update(stpes=5), ["train: unknown field 'stpes'", "'steps'"]),
    (lambda r: r["model"]["attention"].update(windw=5), ["model.attention: unknown field 'windw'"]),
    (lambda r: r["data"]["clean"].pop("dedup"), ["data.clean: missing field(s) ['dedup']"]),
    (lambda r: r["train"].pop("steps"), ["train: missing field(s) ['steps']"]),
    (lambda r: r["train"].update(steps="1000"), ["TrainConfig.steps: must be an int"]),
    (lambda r: r["model"].update(emb_dim=64.5), ["ModelConfig.emb_dim: must be an int"]),
    (lambda r: r.update(mesh=[1, 2]), ["mesh: expected an object of MeshConfig fields"]),
    (lambda r: r["data"].update(corpora=[{"path": "a.tsv", "src_lang": "en"}]),
     ["DataConfig.corpora: corpus 0"]),
])
def test_bad_config_json_is_a_clear_error(tmp_path, edit, fragments):
    raw = json.loads(cfglib.to_json(**_configs()))
    edit(raw)
    msg = _load_error(tmp_path, raw)
    for fragment in fragments:
        assert fragment in msg, msg


def test_oldest_config_json_layout_still_loads(tmp_path):
    """A directory written before every later field (and with the two renamed keys)."""
    raw = json.loads(cfglib.to_json(**_configs()))
    for section, cls in (("model", "ModelConfig"), ("mesh", "MeshConfig"),
                         ("data", "DataConfig"), ("train", "TrainConfig")):
        for field in cfglib._ADDED_LATER[cls]:
            del raw[section][field]
    raw["model"].update(dtype="bfloat16", param_dtype="float32")
    del raw["model"]["precision"]
    raw["data"]["pack"] = raw["data"].pop("batching") == "pack"
    _write(tmp_path, raw)
    # Those directories computed in bf16 (the default then, before "auto"), and keep it.
    want = _configs()
    want["model"] = dataclasses.replace(want["model"], precision="bf16")
    assert cfglib.load(str(tmp_path)) == want
