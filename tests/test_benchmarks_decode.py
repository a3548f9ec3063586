"""benchmarks/decode.py at toy sizes: it runs every engine, checks that they decode the
same ids (the script stops on a greedy difference), and reports what its JSON promises;
without CTranslate2 it skips those engines and says why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a model conversion and one subprocess per engine: ~40 s

pytest.importorskip("torch", reason="the benchmark needs torch (pip install 'jaxmt[hf]')")
pytest.importorskip("transformers", reason="the benchmark needs transformers")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "decode.py"
TOY = ["--batch", "2", "--src_len", "8", "--new_tokens", "8", "--repeats", "1", "--json"]
STRATEGIES = ("greedy", "beam4")


def _run(*args: str, env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, str(SCRIPT), *TOY, *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_all_engines_agree_and_report():
    pytest.importorskip("ctranslate2", reason="pip install -e '.[bench]'")
    res = _run()
    for s in STRATEGIES:
        assert set(res[s]) == {"jaxmt", "hf", "ct2_fp32", "ct2_int8"}
        assert all(v > 0 for v in res[s].values()), res[s]
        for e in ("hf", "ct2_fp32", "ct2_int8"):
            assert res[f"ratio_vs_{e}_{s}"] > 0
        # fp32 engines on the same weights: the same greedy ids and beam search outputs.
        for pair in ("jaxmt_vs_hf", "jaxmt_vs_ct2_fp32", "hf_vs_ct2_fp32"):
            assert res["agreement"][f"{s}_{pair}"] == {"outputs": 1.0, "tokens": 1.0}, pair
    assert set(res["jaxmt_compile_s"]) == set(STRATEGIES)
    assert res["threads"] == 1 and res["isa"] == "native" and res["skipped"] == {}
    assert all(info["cores"] and len(info["cores"]) == 1 for info in res["info"].values())
    assert res["info"]["hf"]["torch_threads"] == 1
    for key in ("jax", "torch", "transformers", "ctranslate2", "model", "new_tokens"):
        assert res[key], key


def test_ctranslate2_missing_is_skipped(tmp_path):
    # A ctranslate2 package that fails to import, ahead of the installed one.
    (tmp_path / "ctranslate2").mkdir()
    (tmp_path / "ctranslate2" / "__init__.py").write_text("raise ImportError('hidden')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    res = _run("--engines", "jaxmt,ct2_fp32,ct2_int8", env=env)
    for s in STRATEGIES:
        assert res[s]["jaxmt"] > 0
        assert res[s]["hf"] is None and res[s]["ct2_fp32"] is None and res[s]["ct2_int8"] is None
        assert res[f"ratio_vs_ct2_fp32_{s}"] is None
    assert set(res["skipped"]) == {"ct2_fp32", "ct2_int8"}
    assert "ctranslate2" in res["skipped"]["ct2_fp32"] and res["ctranslate2"] is None
