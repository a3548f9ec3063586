"""Where the gin presets are, and the one way jaxmt reads gin files.

``gin_configs/`` sits at the top of the repository (``arch/ models/ mesh/ attention/
runs/``). A wheel installs the same files as the package data ``jaxmt/gin_configs``
(see ``pyproject.toml``), so ``jaxmt train --gin_file=runs/demo.gin`` works from any
folder after ``pip install .``, not only inside a checkout.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import inspect
import logging
import os
from pathlib import Path
from tokenize import TokenError

from gin import config as gin_config
from gin import config_parser

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
    """Loads gin files then ``--gin.NAME=VALUE`` overrides, in that order, and checks them.

    gin itself ignores a macro nobody uses (``--gin.TRAIN_STPES=5``) and, with
    ``configs_only``, a binding of an unknown configurable; both are errors here, with the
    closest known name. Then the configs of :mod:`jaxmt.config` are built once, so a bad
    value fails now, naming its field, not after the data and model are set up.

    Args:
      gin_files: paths, or names under :data:`GIN_DIR` such as ``runs/demo.gin``.
      overrides: ``--gin.NAME=VALUE`` strings, e.g. ``--gin.TRAIN_STEPS=100``.
      configs_only: register only :mod:`jaxmt.config` (no JAX, no TF: for the data and
        vocabulary commands) and skip bindings of other configurables (e.g. ``train.*``
        of :mod:`jaxmt.train.run`), so a run's gin files load as they are.

    Raises:
      SystemExit: a missing file, bad syntax, an unknown configurable, parameter or
        macro, or a value a config rejects; one line, ``error: WHERE: WHAT``.
    """
    import gin

    from jaxmt import config as cfglib  # registers the configurables
    if not configs_only:
        import jaxmt.train.run  # noqa: F401  (registers the `train` entry point)

    gin.add_config_file_search_path(str(GIN_DIR))
    _guard_package_lookup()
    bindings = []
    for o in overrides:
        key, sep, value = o[len("--gin."):].partition("=")
        if not sep:
            raise SystemExit(f"error: {o}: expected --gin.NAME=VALUE")
        bindings.append((o, f"{key} = {value}"))
    paths = [resolve_gin_file(f) for f in gin_files]
    _Checker(configs_only).check(paths, bindings)
    # gin tries the bare include path before the search path and logs an ERROR for the miss.
    quiet = _DropMessage("Path not found")
    logging.getLogger().addFilter(quiet)
    try:
        gin.parse_config_files_and_bindings(paths, [b for _, b in bindings],
                                            skip_unknown=configs_only)
    except (ValueError, SyntaxError, OSError, ImportError, TokenError) as e:  # what checks miss
        raise SystemExit(f"error: {_one_line(e)}") from None
    finally:
        logging.getLogger().removeFilter(quiet)
    for cls in (cfglib.ModelConfig, cfglib.MeshConfig, cfglib.DataConfig, cfglib.TrainConfig):
        try:
            cls()
        except (ValueError, TypeError) as e:  # gin appends a line; the first names the field
            raise SystemExit(f"error: {(str(e).splitlines() or [repr(e)])[0]}") from None


# Configurables of jaxmt.train.run, which `configs_only` does not import: their bindings
# are skipped there, not errors.
_ELSEWHERE = ("train",)


def _one_line(e: BaseException) -> str:
    return "; ".join(line.strip() for line in str(e).splitlines() if line.strip())


class _Recorder(config_parser.ParserDelegate):
    """Parses without binding anything, recording the macros values use (``%NAME``)."""

    def __init__(self):
        self.pending: list[str] = []  # used by the statement being parsed

    def configurable_reference(self, scoped_configurable_name, evaluate):
        return None

    def macro(self, macro_name):
        if not gin_config._CONSTANTS.matching_selectors(macro_name):  # not gin.REQUIRED etc.
            self.pending.append(macro_name)
        return None


class _Checker:
    """What gin lets through: unused or undefined macros, unknown names under skip_unknown.

    It parses the same text gin will (files, their includes, then the overrides) before
    gin binds anything, so every error names the file and line, or the override.
    """

    def __init__(self, configs_only: bool):
        self.configs_only = configs_only
        self.recorder = _Recorder()
        self.macros: dict[str, str] = {}  # name -> where it was last set
        self.used: dict[str, str] = {}  # name -> where it was first used
        self.dynamic = False  # `from __gin__ import dynamic_registration`: gin checks alone
        registry = gin_config._REGISTRY
        self.configurables = {registry.minimal_selector(k): v.wrapped
                              for k, v in registry.items() if not k.startswith("gin.")}

    def check(self, paths: list[str], bindings: list[tuple[str, str]]) -> None:
        for path in paths:
            self._file(path, ())
        for where, text in bindings:
            self._parse(text, where, None)
        for name, where in self.macros.items():
            if name not in self.used:
                hint = _hint(name, self.used) if self.used else "; no gin file uses a macro"
                raise SystemExit(f"error: {where}: macro {name} is set but nothing uses it "
                                 f"(as %{name}){hint}")
        for name, where in self.used.items():
            if name not in self.macros:
                raise SystemExit(f"error: {where}: macro %{name} is used but never set"
                                 f"{_hint(name, self.macros)}")

    def _file(self, path: str, stack: tuple[str, ...]) -> None:
        if path in stack:
            raise SystemExit(f"error: {path}: includes itself (via {' -> '.join(stack)})")
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"error: {path}: {e}") from None
        self._parse(text, path, stack + (path,))

    def _parse(self, text: str, where: str, stack: tuple[str, ...] | None) -> None:
        """Checks one file's (``stack`` its includers) or one override's statements."""
        statements = iter(config_parser.ConfigParser(text, self.recorder))
        while True:
            try:
                st = next(statements, None)
            except (SyntaxError, TokenError, ValueError) as e:
                line = getattr(e, "lineno", None) or (  # TokenError: (msg, (line, column))
                    e.args[1][0] if isinstance(e, TokenError) else None)
                at = f"{where}:{line}" if stack is not None and line else where
                what = (e.msg if isinstance(e, SyntaxError) else e.args[0]
                        if isinstance(e, TokenError) else _one_line(e))
                raise SystemExit(f"error: {at}: invalid gin syntax: {what}") from None
            if st is None:
                return
            at = f"{where}:{st.location.line_num}" if stack is not None else where
            for name in self.recorder.pending:
                self.used.setdefault(name, at)
            self.recorder.pending.clear()
            if isinstance(st, config_parser.ImportStatement):
                module = st[0]  # (module, is_from, alias, location)
                self.dynamic |= module.startswith("__gin__")
                try:  # what gin will import, so its configurables are known below
                    importlib.import_module(module)
                except ImportError:
                    pass  # gin reports it (or skips it, under configs_only)
            elif isinstance(st, config_parser.IncludeStatement):
                if stack is None:
                    raise SystemExit(f"error: {where}: include only in gin files")
                self._file(_include_path(st.filename, at), stack)
            elif isinstance(st, config_parser.BindingStatement) and not st.arg_name:
                self.macros[f"{st.scope}/{st.selector}" if st.scope else st.selector] = at
            elif isinstance(st, config_parser.BindingStatement):
                self._binding(st.selector, st.arg_name, at)

    def _binding(self, selector: str, arg: str, at: str) -> None:
        matches = gin_config._REGISTRY.matching_selectors(selector)
        if self.dynamic:
            return
        if not matches:
            if self.configs_only and (selector in _ELSEWHERE or not difflib.get_close_matches(
                    selector, self.configurables)):
                return  # another module's configurable, skipped as gin skips it
            raise SystemExit(f"error: {at}: unknown configurable {selector!r}"
                             f"{_hint(selector, self.configurables)}")
        if len(matches) > 1:
            return  # ambiguous: gin's own error names the candidates
        fn = gin_config._REGISTRY[matches[0]].wrapped
        params = inspect.signature(fn).parameters
        if arg in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return
        name = gin_config._REGISTRY.minimal_selector(matches[0])
        known = [p for p in params if p != "self"]
        raise SystemExit(f"error: {at}: {name} has no parameter {arg!r}"
                         f"{_hint(arg, known, prefix=name + '.')}")


def _include_path(name: str, at: str) -> str:
    """Where gin finds an included file: as given, else under each search path."""
    prefixes = [""] if os.path.isabs(name) else gin_config._LOCATION_PREFIXES
    for prefix in prefixes:
        if os.path.isfile(os.path.join(prefix, name)):
            return os.path.join(prefix, name)
    raise SystemExit(f"error: {at}: include {name!r}: no such file (also looked in {GIN_DIR})")


def _hint(name: str, known, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    if close:
        return f"; did you mean {prefix}{close[0]}?"
    return f"; known: {', '.join(sorted(known))}" if known else ""


def _package_file_exists(path: str) -> bool:
    """gin's check for an include path inside an importable package, without its crash
    on a namespace package: ``include 'runs/demo.gin'`` run from a folder that has a
    ``runs/`` of its own (``make demo`` writes one) found that folder as package ``runs``
    with no ``__init__.py``, and gin raised TypeError instead of trying the search path."""
    from gin import resource_reader
    try:
        return resource_reader.system_path_file_exists(path)
    except TypeError:
        return False


def _guard_package_lookup() -> None:
    """Swaps :func:`_package_file_exists` in for gin's own check (gin has no public way
    to replace a registered file reader)."""
    from gin import resource_reader
    readers = gin_config._FILE_READERS
    for i, (reader, exists) in enumerate(readers):
        if exists is resource_reader.system_path_file_exists:
            readers[i] = (reader, _package_file_exists)


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
