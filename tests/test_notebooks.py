"""The notebooks run top to bottom (code cells in order, in one namespace) with a few steps."""

import json
from pathlib import Path

import gin
import pytest

pytestmark = pytest.mark.slow  # `make test-fast` skips these

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["quickstart.ipynb"])
def test_notebook_runs(name, tmp_path, monkeypatch):
    nb = json.loads((ROOT / "notebooks" / name).read_text())
    monkeypatch.setenv("JAXMT_NOTEBOOK_STEPS", "4")
    monkeypatch.setenv("JAXMT_NOTEBOOK_DIR", str(tmp_path / "model"))
    monkeypatch.setenv("JAXMT_NOTEBOOK_EVAL", "4")
    monkeypatch.chdir(ROOT)
    gin.clear_config()
    ns: dict = {"__name__": "__notebook__"}
    try:
        for cell in nb["cells"]:
            if cell["cell_type"] != "code":
                continue
            src = "".join(cell["source"])
            assert not any(l.lstrip().startswith(("!", "%")) for l in src.splitlines()), \
                "shell/magic lines would not run outside Jupyter"
            exec(compile(src, f"{name}:{cell.get('id')}", "exec"), ns)
    finally:
        gin.clear_config()
    assert (tmp_path / "model" / "checkpoints" / "4").exists()
    assert set(ns["result"]["directions"]) == {f"en-{l}" for l in ns["data_cfg"].langs[1:]} | \
        {f"{l}-en" for l in ns["data_cfg"].langs[1:]}
