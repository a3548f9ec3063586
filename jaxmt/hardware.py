"""What this machine computes natively: the rule behind ``ModelConfig.precision = "auto"``.

bf16 only pays where the hardware multiplies bf16 natively. Elsewhere XLA emulates it
and a bf16 run is slower than fp32 (on an AVX2-only CPU, about 0.75x). So "auto" is:

* **TPU**: bf16 (every TPU's matrix unit takes bf16).
* **CUDA GPU**: bf16 from compute capability 8.0 (Ampere) on, fp32 before it.
* **x86 CPU**: bf16 when it has AVX512_BF16 or AMX (the ``avx512_bf16`` / ``amx_bf16``
  flags of ``/proc/cpuinfo``), unless XLA is kept from them; fp32 otherwise. In jaxlib
  0.10.2 ``XLA_FLAGS=--xla_cpu_max_isa=AVX2`` (or any cap below AVX512_BF16) binds only
  XLA's generated code: its matmuls go through YNNPACK, which reads the CPU itself, so
  bf16 stays native and faster than fp32 under the cap alone. Only the cap together with
  YNNPACK off (``--xla_cpu_experimental_ynn_fusion_type=``, as in :data:`AVX2_XLA_FLAGS`)
  leaves bf16 emulated, as on an AVX2-only CPU (``benchmarks/precision.py --isa avx2``).
* **Anything else** (aarch64 CPUs, macOS, GPUs without a CUDA compute capability such as
  ROCm): fp32. jaxmt cannot reliably tell there whether XLA reaches native bf16 kernels;
  set ``ModelConfig.precision = "bf16"`` to try it.

:func:`choose_precision` is the rule on explicit inputs (the tests feed it synthetic
ones); :func:`auto_precision` applies it to this process's machine, once. JAX is
imported only there, so importing this module costs nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import re
from collections.abc import Iterable

# Compute capability from which CUDA GPUs have bf16 tensor cores (Ampere).
BF16_GPU_CAPABILITY = (8, 0)
# XLA's --xla_cpu_max_isa values for x86, oldest first
# (xla/backends/cpu/codegen/cpu_features.cc; it upper-cases the value). A cap at one of
# them disables every newer feature. Values it does not know are ignored, with a warning.
X86_ISAS = ("SSE4_2", "AVX", "AVX2", "AVX512", "AVX512_VNNI", "AVX512_BF16", "AMX",
            "AMX_FP16", "AMX_FP8")
# /proc/cpuinfo flag -> (its name in messages, the lowest cap that keeps it).
_BF16_FLAGS = {"avx512_bf16": ("AVX512_BF16", "AVX512_BF16"), "amx_bf16": ("AMX", "AMX")}
_X86_MACHINES = ("x86_64", "amd64", "i386", "i686", "x86")
_MAX_ISA = re.compile(r"(?:^|\s)--?xla_cpu_max_isa=(\S*)")
_YNN_FUSION = re.compile(r"(?:^|\s)--?xla_cpu_experimental_ynn_fusion_type=(\S*)")
# What an AVX2-only CPU gets, on a newer x86 CPU: XLA's code capped at AVX2 and its
# YNNPACK matmuls (which ignore the cap) off. The benchmarks' and the demo's `--isa avx2`.
AVX2_XLA_FLAGS = "--xla_cpu_max_isa=AVX2 --xla_cpu_experimental_ynn_fusion_type="


@dataclasses.dataclass(frozen=True)
class PrecisionChoice:
    """What ``precision = "auto"`` resolves to, and why (one clause, for logs)."""

    policy: str  # "bf16" or "fp32"
    reason: str

    def __str__(self) -> str:
        return f"{self.policy} ({self.reason})"


def max_isa(xla_flags: str) -> str | None:
    """The ISA ``--xla_cpu_max_isa`` caps XLA's CPU code at, upper-case; None when absent.

    The last occurrence wins, as in XLA's flag parsing; quotes around the value are
    dropped.
    """
    found = _MAX_ISA.findall(xla_flags or "")
    value = found[-1].strip("'\"").upper() if found else ""
    return value or None


def ynn_off(xla_flags: str) -> bool:
    """Whether ``XLA_FLAGS`` turns YNNPACK's fusions (its matmuls included) off: an empty
    ``--xla_cpu_experimental_ynn_fusion_type``, the last occurrence winning."""
    found = _YNN_FUSION.findall(xla_flags or "")
    return bool(found) and found[-1].strip("'\"") == ""


def read_cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """The first processor's feature flags (x86 ``flags``, Arm ``Features``); None when
    the file cannot be read (not Linux)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        return None
    return frozenset()


def _gpu_capability(value: str | None) -> tuple[int, int] | None:
    m = re.fullmatch(r"\s*(\d+)(?:\.(\d+))?\s*", str(value or ""))
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def choose_precision(platform_name: str, *, cpu_flags: Iterable[str] | str | None = None,
                     machine: str = "x86_64", xla_flags: str = "",
                     compute_capability: str | None = None) -> PrecisionChoice:
    """The precision policy that "auto" picks for one backend (the rule in the module doc).

    Args:
      platform_name: JAX's platform of the first device: ``cpu``, ``gpu`` (or ``cuda``,
        ``rocm``), ``tpu``.
      cpu_flags: the CPU's feature flags (a set or ``/proc/cpuinfo``'s flags line); None
        when unknown.
      machine: ``platform.machine()``: x86 rules apply to x86 only.
      xla_flags: the ``XLA_FLAGS`` environment variable (its ``--xla_cpu_max_isa``).
      compute_capability: a CUDA device's ``compute_capability``, e.g. ``"8.6"``.
    """
    name = platform_name.lower()
    if name == "tpu":
        return PrecisionChoice("bf16", "TPUs compute bf16 natively")
    if name in ("gpu", "cuda", "rocm"):
        cc = _gpu_capability(compute_capability)
        if cc is None:
            return PrecisionChoice("fp32", f"cannot tell whether this GPU (compute capability "
                                   f"{compute_capability!r}) computes bf16 natively")
        shown = f"{cc[0]}.{cc[1]}"
        if cc >= BF16_GPU_CAPABILITY:
            return PrecisionChoice("bf16", f"this GPU (compute capability {shown}) has bf16 "
                                   "tensor cores")
        return PrecisionChoice("fp32", f"this GPU (compute capability {shown}) has no native "
                               "bf16; it needs 8.0 (Ampere) or newer")
    if name != "cpu":
        return PrecisionChoice("fp32", f"no bf16 rule for the {platform_name!r} backend")
    if machine.lower() not in _X86_MACHINES:
        return PrecisionChoice("fp32", f"cannot tell whether XLA computes bf16 natively on "
                               f"this {machine} CPU")
    if cpu_flags is None:
        return PrecisionChoice("fp32", "cannot read this CPU's features (no /proc/cpuinfo)")
    flags = set(cpu_flags.split() if isinstance(cpu_flags, str) else cpu_flags)
    native = [(shown, needs) for flag, (shown, needs) in _BF16_FLAGS.items() if flag in flags]
    if not native:
        return PrecisionChoice("fp32", "this CPU has no native bf16")
    cap = max_isa(xla_flags)
    if cap in X86_ISAS and ynn_off(xla_flags):  # YNNPACK ignores the cap: it must be off
        native = [(shown, needs) for shown, needs in native
                  if X86_ISAS.index(cap) >= X86_ISAS.index(needs)]
        if not native:
            return PrecisionChoice("fp32", f"XLA_FLAGS caps the CPU at {cap}")
    return PrecisionChoice("bf16", f"this CPU has {' and '.join(s for s, _ in native)}")


def device_precision(device) -> PrecisionChoice:
    """:func:`choose_precision` for one JAX device of this process's machine (also an
    ahead-of-time target's device: a TPU topology's chip gets bf16 whatever the host)."""
    return choose_precision(device.platform, cpu_flags=read_cpu_flags(),
                            machine=platform.machine(),
                            xla_flags=os.environ.get("XLA_FLAGS", ""),
                            compute_capability=getattr(device, "compute_capability", None))


@functools.cache
def auto_precision() -> PrecisionChoice:
    """:func:`device_precision` of JAX's default backend in this process, decided once.

    Initialises JAX's backend (``jax.devices()``), so on several hosts call it after
    ``jax.distributed.initialize``.
    """
    import jax

    return device_precision(jax.devices()[0])
