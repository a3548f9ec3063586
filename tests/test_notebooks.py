"""The notebooks' shared conventions, checked without running them.

`make test` runs every notebook top to bottom in a real Jupyter kernel, in smoke mode
(`pytest --nbmake notebooks`, set up by notebooks/conftest.py). These checks are what
makes each one a Colab notebook: an "Open in Colab" badge first, a first code cell that
installs jaxmt only where it is missing, a device check, a smoke mode, and no stored
outputs.
"""

import json
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
REPO = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
OWNER_NAME = REPO.removeprefix("https://github.com/")


def cells(path: Path) -> list[tuple[str, str]]:
    return [(c["cell_type"], "".join(c["source"])) for c in json.loads(path.read_text())["cells"]]


def test_every_notebook_is_here():
    assert {p.name for p in NOTEBOOKS} == {
        "quickstart.ipynb", "pilot_then_scale.ipynb", "long_inputs.ipynb",
        "finetune_pretrained.ipynb", "compress.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_opens_with_a_colab_badge_for_this_file(path):
    kind, text = cells(path)[0]
    assert kind == "markdown"
    url = f"https://colab.research.google.com/github/{OWNER_NAME}/blob/main/notebooks/{path.name}"
    assert text.startswith("[![Open In Colab](https://colab.research.google.com/assets/"
                           f"colab-badge.svg)]({url})"), text[:300]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_first_code_cell_installs_jaxmt_only_where_it_is_missing(path):
    code = [text for kind, text in cells(path) if kind == "code"]
    lines = [l.strip() for l in code[0].splitlines() if l.strip() and not l.strip().startswith("#")]
    assert lines == ["import importlib.util", 'if importlib.util.find_spec("jaxmt") is None:',
                     f'%pip install -q "jaxmt @ git+{REPO}"'], code[0]
    assert not any("%pip" in c or "!pip" in c for c in code[1:])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_detects_the_device_and_has_a_smoke_mode(path):
    setup = [text for kind, text in cells(path) if kind == "code"][1]
    # jaxmt before JAX, so its start-up quieting applies (see jaxmt/__init__.py).
    assert setup.index("import jaxmt") < setup.index("import jax\n")
    assert "jax.devices()" in setup and re.search(r'"cpu":.*\n.*"gpu":.*\n.*"tpu":', setup)
    assert 'os.environ.get("JAXMT_NOTEBOOK_SMOKE") == "1"' in setup
    assert 'os.environ.get("JAXMT_NOTEBOOK_DIR", "runs")' in setup


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_is_stored_without_outputs_and_plots_something(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None for c in code)
    assert any("plt.show()" in "".join(c["source"]) for c in code)


def test_make_test_runs_the_notebooks_with_nbmake():
    makefile = (ROOT / "Makefile").read_text()
    test_target = makefile.split("\ntest:")[1].split("\n\n")[0]
    assert "--nbmake" in test_target and "notebooks" in test_target
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["dev"]
    assert {re.split(r"[<>=]", d)[0] for d in dev} >= {"nbmake", "ipykernel", "matplotlib"}
