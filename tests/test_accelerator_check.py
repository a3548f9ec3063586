"""benchmarks/accelerator_check.sh's CPU dry run: every part runs and passes, the flash
kernel (Pallas interpret mode) matches reference_attention, and the script needs neither
TensorFlow, seqio nor gin (the GPU image has none of them): the run goes with all three
blocked, as a sitecustomize that sets them to None in sys.modules."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "accelerator_check.sh"
BLOCKED = ("tensorflow", "seqio", "gin")


def _module():
    """benchmarks/accelerator_check.py imported (registered first: its dataclass needs it)."""
    if "accelerator_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "accelerator_check", ROOT / "benchmarks" / "accelerator_check.py")
        mod = sys.modules["accelerator_check"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return sys.modules["accelerator_check"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("accel")
    (tmp / "block").mkdir()
    (tmp / "block" / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in BLOCKED))
    out = tmp / "check.json"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(tmp / "block")}
    proc = subprocess.run(["bash", str(SCRIPT), "--cpu", str(out)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=600, check=False)
    return proc, out


@pytest.mark.slow  # the dry run: ~35 s on 2 idle cores
def test_dry_run_passes_every_part(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    full = json.loads(out.read_text())
    parts = ("env", "flash", "train_step", "attention_tflops")
    assert summary["passed"] is True and summary["mode"] == "cpu-dry-run"
    assert summary["parts"] == dict.fromkeys(parts, True)
    assert set(full["parts"]) == set(parts) and full["passed"] is True

    env = full["parts"]["env"]
    assert env["gin_stand_in"] is True and env["heavy_modules_loaded"] == []
    assert env["backend"] == "cpu" and env["jax"]


@pytest.mark.slow
def test_dry_run_flash_matches_reference(dry_run):
    full = json.loads(dry_run[1].read_text())
    flash = full["parts"]["flash"]
    rows = {(r["case"], r["dtype"]): r for r in flash["rows"]}
    assert set(rows) == {(c, d) for c in ("encoder", "decoder") for d in ("bfloat16", "float32")}
    for (case, dtype), r in rows.items():
        assert r["interpret"] is True and r["blocks"] == [64, 64]  # the GPU default tiles
        for t in ("out", "dq", "dk", "dv", "dtable"):
            assert r[t]["passed"] and r[t]["rel"] <= r["tolerance"], (case, dtype, t, r[t])
    assert flash["max_rel"]["float32"] < 1e-5  # interpret mode: float32 is near exact
    # bf16: no worse than 3x what XLA's own bf16 attention gets against the same truth.
    for (case, dtype), r in rows.items():
        if dtype == "bfloat16":
            for t in ("out", "dq", "dk", "dv", "dtable"):
                assert r[t]["rel"] <= 3 * r[f"xla_bf16_{t}"]["rel"] + 1e-3, (case, t)


@pytest.mark.slow
def test_dry_run_sweep_and_train_step(dry_run):
    full = json.loads(dry_run[1].read_text())
    sweep = full["parts"]["attention_tflops"]
    lengths = full["sizes"]["lengths"]
    got = {(r["impl"], r["pass"], r["length"]) for r in sweep["rows"]}
    assert got == {(i, p, n) for i in ("flash", "dot_product", "xla")
                   for p in ("fwd", "fwd_bwd") for n in lengths}
    for r in sweep["rows"]:
        fwd = 4 * r["batch"] * r["heads"] * r["length"] ** 2 * r["head_dim"]
        assert r["flops"] == (fwd if r["pass"] == "fwd" else 3.5 * fwd)
        assert r["tflops"] > 0 and r["median_s"] > 0
        if r["impl"] == "dot_product":
            assert r["implementation"] == "xla"  # cuDNN only on a CUDA GPU

    train = full["parts"]["train_step"]
    assert train["precision"] == "bf16" and train["batch"] >= 1
    assert train["flops_per_step"] > 0 and train["step_s"] > 0 and train["tokens_per_s"] > 0
    assert 0 < train["mfu"] < 1 and train["peak_flops_bf16"] > 0
    with tarfile.open(train["trace"]["file"]) as tar:
        assert any(n.endswith(".xplane.pb") for n in tar.getnames())


def test_model_presets_parse_like_gin():
    gin = pytest.importorskip("gin")
    from jaxmt.config import ModelConfig
    from jaxmt.gin_files import parse_gin

    mod = _module()
    for name in ("tiny", "base"):
        gin.clear_config()
        parse_gin([f"models/{name}.gin"], [])
        assert mod.model_config_from_gin(
            ROOT / "gin_configs" / "models" / f"{name}.gin") == ModelConfig(), name
    gin.clear_config()


def test_model_preset_parser_refuses_other_lines(tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text("ModelConfig.emb_dim = 64\ninclude 'models/base.gin'\n")
    with pytest.raises(ValueError, match=r"bad.gin:2: not a plain"):
        _module().model_config_from_gin(bad)


def test_gpu_mode_without_a_gpu_stops_at_once(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300, check=False)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["parts"] == {"env": False} and "--cpu" in summary["errors"]["env"]
    assert json.loads(out.read_text())["parts"]["env"]["backend"] == "cpu"
