"""jaxmt: multilingual encoder-decoder translation in JAX/Flax.

``from jaxmt import Translator`` is the inference API; it needs no TensorFlow.

Importing jaxmt keeps two libraries quiet at start-up, without changing what they compute:

* **libtpu** (the ``tpu_aot`` extra, for ahead-of-time TPU compiles from any machine).
  With it installed and ``JAX_PLATFORMS`` unset, JAX tries a TPU backend on every start:
  libtpu prints ``E0000 ... unexpected worker hostname`` and TPU warnings, takes the
  machine-wide ``/tmp/libtpu_lockfile`` (which then fails AOT compiles in other
  processes), and the attempt fails. Where it can only fail (Linux, no TPU chip on the
  PCI bus or in ``/dev``, no other PJRT plugin), jaxmt sets ``JAX_PLATFORMS=cpu``, the
  backend JAX would have chosen anyway; JAX skips CUDA the same way without a GPU.
  A ``JAX_PLATFORMS`` you set, even to ``""``, wins; TPU topologies for AOT compiles
  (:func:`jaxmt.sharding.partitioning.topology_devices`) still load libtpu.
* **TensorFlow** (through seqio) prints ``I0000`` lines (oneDNN, "Could not find cuda
  drivers") twice while it is imported, whatever ``TF_CPP_MIN_LOG_LEVEL`` says
  (tensorflow/tensorflow#100442). jaxmt drops those INFO lines and absl's "before
  InitializeLog" preamble from that import only (warnings and errors still show), and
  sets ``TF_CPP_MIN_LOG_LEVEL=3`` before it, as the ``jaxmt`` command always did, unless
  you set the variable. ``JAXMT_DEBUG=1`` turns both off.
"""

import contextlib
import glob
import importlib.util
import os
import re
import sys

__version__ = "0.1.0"
__all__ = ["Translator"]

# Google's PCI vendor id, as jax._src.hardware_utils reads it, and the Google devices
# that are not TPUs (gVNIC, NVMe). Any other Google device might be a TPU newer than
# this list: then JAX is left to look for itself.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_GOOGLE_NOT_TPU = {"0x0042", "0x001f"}
# What TensorFlow's import prints through absl before anyone calls InitializeLog: the
# preamble, INFO records, and the second line of cpu_feature_guard's INFO record.
_TF_IMPORT_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to "
    r"STDERR|I\d{4} [\d:.]+ +\d+ \S+:\d+\] .*|To enable the following instructions: .* "
    r"rebuild TensorFlow with the appropriate compiler flags\.)$")


def __getattr__(name):
    # Lazy, so `import jaxmt` stays cheap and the CLI starts fast.
    if name == "Translator":
        from jaxmt.inference.translator import Translator
        return Translator
    raise AttributeError(f"module 'jaxmt' has no attribute {name!r}")


def _tpu_may_be_present() -> bool:
    """False only when neither the PCI bus nor /dev shows anything a TPU could be."""
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return True  # TPU device nodes (v2-v4 / v5 on); a container may hide the PCI bus
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() != _GOOGLE_PCI_VENDOR:
                    continue
            with open(os.path.join(os.path.dirname(vendor), "device")) as f:
                if f.read().strip() not in _GOOGLE_NOT_TPU:
                    return True
        except OSError:
            return True
    return False


def _only_cpu_possible() -> bool:
    """True where JAX's automatic choice can only end on CPU, after a failed libtpu start."""
    if not sys.platform.startswith("linux") or any(
            v in os.environ for v in ("JAX_PLATFORMS", "JAX_FORCE_TPU_INIT",
                                      "PJRT_NAMES_AND_LIBRARY_PATHS")):
        return False
    if importlib.util.find_spec("libtpu") is None or _tpu_may_be_present():
        return False  # no libtpu: nothing to quiet; a TPU: JAX must find it
    if importlib.util.find_spec("jax_plugins") is not None:
        return False  # a CUDA/ROCm/other PJRT plugin: let JAX decide
    from importlib.metadata import entry_points
    return not entry_points(group="jax_plugins")


def _skip_absent_tpu() -> None:
    if not _only_cpu_possible():
        return
    jax = sys.modules.get("jax")
    if jax is None:
        os.environ["JAX_PLATFORMS"] = "cpu"
    elif not jax.config.jax_platforms:  # jax came first; its backends start lazily
        jax.config.update("jax_platforms", "cpu")


class _QuietTensorFlow:
    """A meta-path finder for the first ``import tensorflow``: sets TensorFlow's log level
    to :data:`_TF_LOG_LEVEL` first (its libraries read the variable when they first log,
    some only after the import) and drops the preamble and INFO lines its absl logging
    writes to file descriptor 2 during the import."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow" or self not in sys.meta_path:
            return None
        sys.meta_path.remove(self)  # once; the import below uses the other finders
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader:
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self.loader  # as if never wrapped
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = _TF_LOG_LEVEL
        with _drop_stderr_lines(_TF_IMPORT_NOISE):
            self.loader.exec_module(module)


@contextlib.contextmanager
def _drop_stderr_lines(pattern: re.Pattern):
    """Sends file descriptor 2 to a file meanwhile, then writes back the lines that
    ``pattern`` does not match (C++ libraries write there, past ``sys.stderr``)."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all
        yield
        return
    import tempfile
    with tempfile.TemporaryFile() as tmp:
        _flush_stderr()
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            _flush_stderr()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().decode(errors="replace").splitlines(True)
                    if not pattern.match(line.rstrip("\n"))]
            if kept and sys.stderr is not None:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def _flush_stderr() -> None:
    if sys.stderr is not None:
        sys.stderr.flush()


# TensorFlow (only seqio's data pipeline uses it) logs fatal errors only, as the jaxmt
# command has always asked with TF_CPP_MIN_LOG_LEVEL=3 (which XLA reads too), unless the
# user set the variable. JAX's import sets it to 1 when unset, which lets through e.g.
# "failed call to cuInit" on machines with CUDA libraries and no GPU: after JAX, a 1
# counts as unset.
_TF_LOG_LEVEL = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3")
if "jax" in sys.modules and _TF_LOG_LEVEL == "1":
    _TF_LOG_LEVEL = "3"
_skip_absent_tpu()
if os.environ.get("JAXMT_DEBUG", "").strip() in ("", "0") and "tensorflow" not in sys.modules:
    sys.meta_path.insert(0, _QuietTensorFlow())
