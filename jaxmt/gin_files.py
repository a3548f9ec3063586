"""Where the gin presets are, and the one way jaxmt reads gin files.

``gin_configs/`` sits at the top of the repository (``arch/ models/ mesh/ attention/
runs/``). A wheel installs the same files as the package data ``jaxmt/gin_configs``
(see ``pyproject.toml``), so ``jaxmt train --gin_file=runs/demo.gin`` works from any
folder after ``pip install .``, not only inside a checkout.
"""

from __future__ import annotations

import ast
import dataclasses
import logging
from pathlib import Path

from jaxmt.config import MeshConfig


def _find_gin_dir() -> Path:
    here = Path(__file__).resolve().parent
    installed = here / "gin_configs"  # a wheel's package data
    return installed if installed.is_dir() else here.parent / "gin_configs"  # a checkout


GIN_DIR = _find_gin_dir()
MESH_PRESETS = ("dp", "zero1", "fsdp", "tp", "fsdp_tp")


def resolve_gin_file(name: str) -> str:
    """``name`` as given, else under :data:`GIN_DIR` (with or without ``.gin``).

    Raises:
      SystemExit: no such file, with one line naming it.
    """
    for cand in (Path(name), GIN_DIR / name, GIN_DIR / f"{name}.gin"):
        if cand.is_file():
            return str(cand)
    raise SystemExit(f"error: --gin_file={name}: no such file (also looked in {GIN_DIR})")


def parse_gin(gin_files: list[str], overrides: list[str], configs_only: bool = False) -> None:
    """Loads gin files then ``--gin.NAME=VALUE`` overrides, in that order.

    Args:
      gin_files: paths, or names under :data:`GIN_DIR` such as ``runs/demo.gin``.
      overrides: ``--gin.NAME=VALUE`` strings, e.g. ``--gin.TRAIN_STEPS=100``.
      configs_only: register only :mod:`jaxmt.config` (no JAX, no TF: for the data and
        vocabulary commands) and skip bindings of other configurables (e.g. ``train.*``
        of :mod:`jaxmt.train.run`), so a run's gin files load as they are.
    """
    import gin

    import jaxmt.config  # noqa: F401  (registers the configurables)
    if not configs_only:
        import jaxmt.train.run  # noqa: F401  (registers the `train` entry point)

    gin.add_config_file_search_path(str(GIN_DIR))
    bindings = []
    for o in overrides:
        key, sep, value = o[len("--gin."):].partition("=")
        if not sep:
            raise SystemExit(f"error: {o}: expected --gin.NAME=VALUE")
        bindings.append(f"{key} = {value}")
    # gin tries the bare include path before the search path and logs an ERROR for the miss.
    quiet = _DropMessage("Path not found")
    logging.getLogger().addFilter(quiet)
    try:
        gin.parse_config_files_and_bindings([resolve_gin_file(f) for f in gin_files], bindings,
                                            skip_unknown=configs_only)
    finally:
        logging.getLogger().removeFilter(quiet)


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def mesh_preset(name: str, **overrides) -> MeshConfig:
    """The MeshConfig of ``gin_configs/mesh/<name>.gin``, read without touching the
    global gin config (for notebooks, benchmarks and tests; runs include the file).

    Args:
      name: a preset name (:data:`MESH_PRESETS`) or a path to such a file.
      **overrides: MeshConfig fields to set after the file's, e.g. ``tensor=4``.

    Raises:
      ValueError: the file has a line other than ``MeshConfig.<field> = <literal>``.
    """
    path = Path(name) if name.endswith(".gin") else GIN_DIR / "mesh" / f"{name}.gin"
    if not path.is_file():
        raise ValueError(f"no mesh preset {name!r}: {path} does not exist; presets are "
                         f"{', '.join(MESH_PRESETS)}")
    fields = {f.name for f in dataclasses.fields(MeshConfig)}
    values = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = line.partition("=")
        cls, _, field = key.strip().partition(".")
        if not sep or cls != "MeshConfig" or field not in fields:
            raise ValueError(f"{path}:{i}: expected `MeshConfig.<field> = <value>` with a field "
                             f"in {sorted(fields)}, got {line!r}")
        values[field] = ast.literal_eval(value.strip())
    return MeshConfig(**{**values, **overrides})
