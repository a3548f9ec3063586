"""The architecture, checked: one folder per stage and imports that only run downwards.

Walks every module of ``jaxmt/`` with ``ast`` (function-level imports included) and
asserts the rules the layout depends on:

* ``data/`` and ``kernels/`` import nothing from the stages above them;
* every import goes to the same or a lower layer (:data:`LAYERS`);
* there are no import cycles between modules;
* no module imports (or reaches through an imported module for) another's private name;
* only the Model touches the network Module (``.module``), in ``jaxmt/`` and ``benchmarks/``.

And, each in a fresh interpreter, that the data pipeline and the kernels load no Flax,
and the core (model, kernels, partitioning, train step, decoding, Translator) no TensorFlow.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "jaxmt"

# A module may import modules of its own layer or lower ones. Root modules are named
# whole; folders by their package. ``fileio`` is standard library only, so ``data``
# may use it; ``hardware`` (what the machine computes natively) imports no jaxmt module.
LAYERS = {
    "jaxmt.fileio": 0, "jaxmt.hostmem": 0, "jaxmt.checkpoint": 0, "jaxmt.hardware": 0,
    "jaxmt.data": 1, "jaxmt.kernels": 1,
    "jaxmt.config": 2,
    "jaxmt.sharding": 3,
    "jaxmt.modeling": 4,
    "jaxmt.train": 5, "jaxmt.inference": 5, "jaxmt.compress": 5,
    "jaxmt.plan": 5,
    "jaxmt.gin_files": 6, "jaxmt.cli": 6, "jaxmt.demo": 6, "jaxmt": 6,
}
# The stages above data/ and kernels/ (the rule, stated on its own).
ABOVE_DATA_AND_KERNELS = ("jaxmt.modeling", "jaxmt.train", "jaxmt.inference", "jaxmt.compress",
                          "jaxmt.plan",
                          "jaxmt.sharding", "jaxmt.config", "jaxmt.gin_files", "jaxmt.cli")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _layer(module: str) -> tuple[str, int]:
    """(the layer's key, its rank) of a jaxmt module."""
    parts = module.split(".")
    for n in (2, 1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return key, LAYERS[key]
    raise AssertionError(f"{module}: not in tests/test_layout.py's LAYERS; give it a layer")


def _imports(name: str, path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported jaxmt module, names taken from it) for every import in a file."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if a.name.startswith("jaxmt")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([node.module] if node.module else []))
            if not base.startswith("jaxmt"):
                continue
            names = [a.name for a in node.names]
            subs = [n for n in names if f"{base}.{n}" in MODULES]  # `from pkg import module`
            out += [(node.lineno, f"{base}.{n}", []) for n in subs]
            rest = [n for n in names if n not in subs]
            if rest or not subs:
                out.append((node.lineno, base, rest))
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_root_holds_at_most_eight_modules():
    root = sorted(p.name for p in PKG.glob("*.py"))
    assert len(root) <= 8, root


def test_every_module_has_a_layer():
    for name in MODULES:
        _layer(name)


def test_data_and_kernels_import_nothing_above_them():
    bad = []
    for name, imports in GRAPH.items():
        if name.startswith(("jaxmt.data", "jaxmt.kernels")):
            bad += [f"{MODULES[name]}:{line}: imports {mod}" for line, mod, _ in imports
                    if mod.startswith(ABOVE_DATA_AND_KERNELS)]
    assert not bad, "\n".join(bad)


def test_kernels_import_only_kernels():
    bad = [f"{MODULES[name]}:{line}: imports {mod}" for name, imports in GRAPH.items()
           if name.startswith("jaxmt.kernels") for line, mod, _ in imports
           if not mod.startswith("jaxmt.kernels")]
    assert not bad, "\n".join(bad)


def test_imports_run_downwards():
    bad = []
    for name, imports in GRAPH.items():
        key, rank = _layer(name)
        for line, mod, _ in imports:
            other, other_rank = _layer(mod)
            if other_rank > rank:
                bad.append(f"{MODULES[name]}:{line}: {key} (layer {rank}) imports {mod} "
                           f"(layer {other_rank})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    edges = {name: {m for _, m, _ in imports if m in MODULES and m != name
                    and not name.startswith(m + ".")}  # a package's own __init__ runs first
             for name, imports in GRAPH.items()}
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []
    cycles = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(edges[n]):
            if state.get(m) == 1:
                cycles.append(" -> ".join(stack[stack.index(m):] + [m]))
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(edges):
        if n not in state:
            visit(n)
    assert not cycles, "\n".join(cycles)


def test_no_private_names_across_modules():
    bad = []
    for name, path in MODULES.items():
        imported_modules = set()
        for line, mod, names in GRAPH[name]:
            if mod == name:
                continue
            bad += [f"{path}:{line}: imports {mod}.{n}" for n in names
                    if n.startswith("_") and not n.startswith("__")]
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):  # aliases bound to jaxmt modules: `from x import y as z`
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for a in node.names:
                    full = a.name if isinstance(node, ast.Import) else f"{node.module}.{a.name}"
                    if full in MODULES and full != name:
                        imported_modules.add(a.asname or a.name.split(".")[-1])
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in imported_modules and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                bad.append(f"{path}:{node.lineno}: uses {node.value.id}.{node.attr}")
    assert not bad, "\n".join(bad)


def test_only_the_model_touches_the_module():
    allowed = PKG / "modeling" / "model.py"
    bad = []
    for path in sorted(PKG.rglob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py")):
        if path == allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "module" and isinstance(
                    node.ctx, ast.Load):
                bad.append(f"{path}:{node.lineno}: .module")
    assert not bad, "call EncoderDecoderModel's methods instead:\n" + "\n".join(bad)


def test_every_package_is_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    packages = {n for n, p in MODULES.items() if p.name == "__init__.py"}
    assert packages <= listed, f"add {sorted(packages - listed)} to pyproject.toml's packages"
    assert "jaxmt.gin_configs" in listed


@pytest.mark.parametrize("module, absent", [
    ("jaxmt.data.pipeline", ("flax", "seqio", "jaxmt.modeling", "jaxmt.train")),
    ("jaxmt.data.cache", ("jaxmt.modeling", "jaxmt.train", "jaxmt.inference")),  # seqio loads flax
    ("jaxmt.kernels.flash_attention", ("flax", "tensorflow", "jaxmt.modeling")),
    ("jaxmt.kernels.performer_attention", ("flax", "tensorflow", "jaxmt.modeling")),
    ("jaxmt.modeling.model", ("tensorflow", "seqio")),
    ("jaxmt.sharding.partitioning", ("tensorflow", "seqio")),
    ("jaxmt.train.trainer", ("tensorflow", "seqio")),
    ("jaxmt.inference.translator", ("tensorflow", "seqio")),
])
def test_fresh_interpreter_imports(module, absent):
    code = (f"import sys, {module}; print([m for m in {list(absent)!r} "
            f"if any(k == m or k.startswith(m + '.') for k in sys.modules)])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", f"{module} loads {out.stdout.strip()}"
