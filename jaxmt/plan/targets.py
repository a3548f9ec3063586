"""Hardware tables for the planner: what one chip computes, holds and moves, per target.

A target is written as text (``tpu-v5e:4x4``, ``h100:8x4``, ``cpu:8``) and parsed into a
:class:`Target`: the chip's figures (:class:`Chip`), how many devices and hosts, the
ahead-of-time topology name for TPUs, and the bandwidths a collective sees inside a
slice or host (ICI, NVLink) and across them (DCN, InfiniBand). Every figure carries its
source. CPU figures are estimates from ``/proc/cpuinfo`` and say so.

Bandwidth convention (what :mod:`jaxmt.plan.step_time` divides bytes by):
``intra_bandwidth`` and ``inter_bandwidth`` are the bytes per second ONE device sends
into one collective over one mesh axis, so a ring all-gather of ``V`` bytes per device
over ``g`` devices takes ``(g - 1) * V / bandwidth``.

* TPU ICI: one mesh axis runs as a bidirectional ring along one torus dimension, i.e.
  over 2 of the chip's ICI ports, sending one way on each. Google quotes the chip's
  bidirectional ICI bandwidth over all its ports, so one axis gets
  ``bidirectional / ports`` (v5e: 400 GB/s over 4 ports = 100 GB/s). An axis folded over
  two torus dimensions could use more ports; the table does not count on it.
* TPU DCN: Google's per-chip data-centre network bandwidth (v5e: the host's 2 x 100 Gbps
  NICs shared by its 8 chips).
* NVIDIA NVLink: the per-GPU NVLink bandwidth is quoted bidirectional (H100: 900 GB/s),
  so one direction, which a ring collective is limited by, is half of it.
* InfiniBand: one ConnectX-7 400 Gb/s NIC per GPU in DGX/HGX H100 systems (50 GB/s).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re

GB = 1e9
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One device's figures.

    Attributes:
      name: e.g. "TPU v5e", "H100 SXM", "CPU (2 cores, AVX-512, estimated)".
      hbm_bytes: device memory per chip.
      peak_flops: per chip, by compute dtype ("bfloat16", "float32", "float16", "int8").
      hbm_bandwidth: bytes/s per chip.
      source: where the figures come from (document/URL).
    """

    name: str
    hbm_bytes: int
    peak_flops: dict[str, float]
    hbm_bandwidth: float
    source: str

    def peak(self, dtype: str) -> float:
        """Peak FLOP/s for a compute dtype (``bfloat16``, ``float32``, ...)."""
        try:
            return self.peak_flops[dtype]
        except KeyError:
            raise ValueError(f"no peak for dtype {dtype!r} on {self.name}; known: "
                             f"{sorted(self.peak_flops)}") from None


@dataclasses.dataclass(frozen=True)
class Target:
    """A machine to plan for: ``num_devices`` chips in ``num_hosts`` hosts.

    Attributes:
      text: as written: "tpu-v5e:4x4", "h100:8x4", "cpu:8".
      kind: "tpu" | "gpu" | "cpu".
      chip: the per-device figures.
      num_devices: JAX devices (one per chip; v4 and v5p chips are one megacore device).
      num_hosts: hosts (VMs) the devices sit in.
      topology: the ahead-of-time topology name for TPUs ("v5e:4x4"; per slice), else None.
      intra_bandwidth: bytes/s per device for a collective inside a slice/host (ICI, NVLink).
      inter_bandwidth: bytes/s per device across slices/hosts (DCN, InfiniBand).
      source: where the bandwidths come from.
      num_slices: TPU slices joined over DCN (``tpu-v5e:16x16*2``); 1 otherwise.
      chip_config_name: what ``get_topology_desc`` needs besides the name (v4: "megacore").
    """

    text: str
    kind: str
    chip: Chip
    num_devices: int
    num_hosts: int
    topology: str | None
    intra_bandwidth: float
    inter_bandwidth: float
    source: str
    num_slices: int = 1
    chip_config_name: str | None = None

    @property
    def num_domains(self) -> int:
        """Groups of devices joined by the fast interconnect: TPU slices, GPU hosts (one
        NVLink domain each), 1 for CPU. A collective between groups uses
        ``inter_bandwidth``."""
        if self.kind == "tpu":
            return self.num_slices
        if self.kind == "gpu":
            return self.num_hosts
        return 1

    @property
    def devices_per_domain(self) -> int:
        return self.num_devices // self.num_domains

    def topology_kwargs(self) -> dict:
        """Keyword arguments of ``jax.experimental.topologies.get_topology_desc`` for an
        ahead-of-time compile (TPU only)."""
        if self.kind != "tpu":
            raise ValueError(f"target {self.text!r} has no TPU topology")
        kw = {"topology_name": self.topology, "platform": "tpu"}
        if self.chip_config_name:
            kw["chip_config_name"] = self.chip_config_name
        if self.num_slices > 1:
            kw["num_slices"] = self.num_slices
        return kw


# ---------------------------------------------------------------------------- TPUs
# Under JAX's default matmul precision a float32 dot runs as one bfloat16 pass on TPU
# (and as TF32 on Ampere+ GPUs): https://docs.jax.dev/en/latest/201/precision.html.
# jaxmt's model matmuls use the default, so float32 gets the bf16 rate (its memory
# traffic, counted elsewhere, doubles).
_TPU_F32_NOTE = "; float32 = bf16 rate (JAX's default matmul precision: one bf16 pass)"


@dataclasses.dataclass(frozen=True)
class _TpuRow:
    chip: Chip
    dims: int  # torus dimensions: AxB (2) or AxBxC (3)
    ports: int  # ICI ports per chip
    ici_bidir: float  # bytes/s per chip, bidirectional, all ports
    dcn_per_chip: float  # bytes/s
    max_chips: int  # largest single slice
    chips_per_host: int  # in multi-host slices
    single_host_max: int  # slices up to this many chips sit in one host
    topology_prefix: str
    chip_config_name: str | None
    source: str


def _tpu(name, bf16, int8, hbm, bw, source):
    return Chip(name, hbm, {"bfloat16": bf16, "float16": bf16, "float32": bf16, "int8": int8},
                bw, source + _TPU_F32_NOTE)


_V5E_SRC = "https://cloud.google.com/tpu/docs/v5e (system architecture table)"
_V5P_SRC = "https://cloud.google.com/tpu/docs/v5p (system architecture table)"
_V6E_SRC = "https://cloud.google.com/tpu/docs/v6e (system architecture table)"
_V4_SRC = ("https://cloud.google.com/tpu/docs/v4 (system architecture table); ICI: Jouppi "
           "et al., 'TPU v4: An Optically Reconfigurable Supercomputer', ISCA 2023 "
           "(6 links, 50 GB/s each way)")
TPUS: dict[str, _TpuRow] = {
    "v5e": _TpuRow(
        _tpu("TPU v5e", 197e12, 393e12, 16 * GIB, 819 * GB,
             _V5E_SRC + ": 197 TFLOP/s bf16, 393 TOP/s int8, 16 GiB HBM2 at 819 GB/s"),
        dims=2, ports=4, ici_bidir=400 * GB, dcn_per_chip=2 * 100e9 / 8 / 8,
        max_chips=256, chips_per_host=4, single_host_max=8, topology_prefix="v5e",
        chip_config_name=None,
        source=_V5E_SRC + ": ICI 400 GB/s bidirectional per chip over 4 ports; DCN 2 x 100 "
        "Gbps NICs per 8-chip host"),
    "v5p": _TpuRow(
        _tpu("TPU v5p", 459e12, 918e12, 95 * GIB, 2765 * GB,
             _V5P_SRC + ": 459 TFLOP/s bf16, 95 GiB HBM2e at 2765 GB/s; int8 918 TOP/s "
             "(Google Cloud v5p announcement)"),
        dims=3, ports=6, ici_bidir=1200 * GB, dcn_per_chip=50e9 / 8,
        max_chips=6144, chips_per_host=4, single_host_max=4, topology_prefix="v5p",
        chip_config_name=None,
        source=_V5P_SRC + ": ICI 1200 GB/s bidirectional per chip over 6 ports (3D torus); "
        "DCN 50 Gbps per chip"),
    "v6e": _TpuRow(
        _tpu("TPU v6e", 918e12, 1836e12, 32 * GB, 1638 * GB,
             _V6E_SRC + ": 918 TFLOP/s bf16, 1836 TOP/s int8, 32 GB HBM at 1638 GB/s"),
        dims=2, ports=4, ici_bidir=800 * GB, dcn_per_chip=4 * 200e9 / 8 / 8,
        max_chips=256, chips_per_host=4, single_host_max=8, topology_prefix="v6e",
        chip_config_name=None,
        source=_V6E_SRC + ": ICI 800 GB/s bidirectional per chip over 4 ports; DCN 4 x 200 "
        "Gbps NICs per 8-chip host (estimated from the v6e host NIC configuration)"),
    "v4": _TpuRow(
        _tpu("TPU v4", 275e12, 275e12, 32 * GIB, 1200 * GB,
             _V4_SRC + ": 275 TFLOP/s bf16 or int8, 32 GiB HBM2 at 1200 GB/s"),
        dims=3, ports=6, ici_bidir=6 * 2 * 50 * GB, dcn_per_chip=25e9 / 8,
        max_chips=4096, chips_per_host=4, single_host_max=4, topology_prefix="v4",
        chip_config_name="megacore",
        source=_V4_SRC + "; DCN 25 Gbps per chip (estimated; Google publishes no v4 "
        "per-chip DCN figure)"),
}

# ---------------------------------------------------------------------------- GPUs
_H100_SRC = ("NVIDIA H100 Tensor Core GPU datasheet (SXM5): dense BF16/FP16 989.4 TFLOP/s, "
             "TF32 494.7 (XLA's float32 matmuls use TF32 by default), INT8 1978.9 TOP/s, "
             "80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s bidirectional")
_H200_SRC = ("NVIDIA H200 Tensor Core GPU datasheet (SXM): compute as H100 SXM, 141 GB HBM3e "
             "at 4.8 TB/s, NVLink 900 GB/s bidirectional")
_A100_SRC = ("NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB): dense BF16/FP16 312 TFLOP/s, "
             "TF32 156, INT8 624 TOP/s, 80 GB HBM2e at 2039 GB/s, NVLink 600 GB/s "
             "bidirectional")
_IB_NDR = ("DGX H100 / HGX H100 reference architecture: one ConnectX-7 400 Gb/s InfiniBand "
           "NIC per GPU (50 GB/s)")
_IB_HDR = "DGX A100: one ConnectX-6 200 Gb/s HDR InfiniBand NIC per GPU (25 GB/s)"


@dataclasses.dataclass(frozen=True)
class _GpuRow:
    chip: Chip
    nvlink_bidir: float  # bytes/s per GPU
    ib_per_gpu: float  # bytes/s per GPU across hosts
    max_per_host: int
    source: str


def _gpu(name, bf16, tf32, int8, hbm, bw, source):
    return Chip(name, hbm, {"bfloat16": bf16, "float16": bf16, "float32": tf32, "int8": int8},
                bw, source)


GPUS: dict[str, _GpuRow] = {
    "h100": _GpuRow(_gpu("H100 SXM", 989.4e12, 494.7e12, 1978.9e12, 80 * GB, 3.35e12,
                         _H100_SRC), 900 * GB, 400e9 / 8, 8, _H100_SRC + "; " + _IB_NDR),
    "h200": _GpuRow(_gpu("H200 SXM", 989.4e12, 494.7e12, 1978.9e12, 141 * GB, 4.8e12,
                         _H200_SRC), 900 * GB, 400e9 / 8, 8, _H200_SRC + "; " + _IB_NDR),
    "a100": _GpuRow(_gpu("A100 SXM 80GB", 312e12, 156e12, 624e12, 80 * GB, 2.039e12,
                         _A100_SRC), 600 * GB, 200e9 / 8, 8, _A100_SRC + "; " + _IB_HDR),
}
# device_kind of a live CUDA device (a prefix after lower-casing) -> chip. PCIe parts have
# less: H100 PCIe 756 TFLOP/s bf16 dense, 80 GB HBM2e at 2.0 TB/s (H100 datasheet).
_H100_PCIE = _gpu("H100 PCIe", 756e12, 378e12, 1513e12, 80 * GB, 2.0e12,
                  "NVIDIA H100 Tensor Core GPU datasheet (PCIe): dense BF16 756 TFLOP/s, "
                  "TF32 378, INT8 1513 TOP/s, 80 GB HBM2e at 2.0 TB/s")
_A100_40 = dataclasses.replace(GPUS["a100"].chip, name="A100 SXM 40GB", hbm_bytes=40 * GB,
                               hbm_bandwidth=1.555e12,
                               source=_A100_SRC.replace("80 GB HBM2e at 2039", "(40GB: 40 GB "
                                                        "HBM2 at 1555)"))
_GPU_KINDS = (("nvidia h100 pcie", _H100_PCIE), ("nvidia h100", GPUS["h100"].chip),
              ("nvidia h200", GPUS["h200"].chip), ("nvidia a100-sxm4-40gb", _A100_40),
              ("nvidia a100", GPUS["a100"].chip))
_TPU_KINDS = {"tpu v5 lite": "v5e", "tpu v5e": "v5e", "tpu v5": "v5p", "tpu v5p": "v5p",
              "tpu v6 lite": "v6e", "tpu v6e": "v6e", "tpu v4": "v4"}

# ---------------------------------------------------------------------------- CPU
# Nominal FLOPs per cycle per core, float32, by vector ISA: two FMA pipes of 8 lanes
# (AVX2, AMD's AVX-512 which runs 512-bit ops as two halves) = 32; Intel server cores with
# two 512-bit FMA pipes = 64. Native bf16 (AVX512_BF16 dot products) doubles it; AMX
# tiles do 1024 bf16 FLOPs per cycle. Without native bf16, XLA emulates it at about 0.75x
# float32 (docs/stack-notes: AVX2-only CPU). Measured here (2-core AMD EPYC, AVX-512 bf16):
# ~195 GFLOP/s float32 and ~420 bf16 matmul peak, i.e. ~37 and ~80 per cycle per core.
_CPU_SOURCE = ("estimated from /proc/cpuinfo (cores, ISA flags, cpu MHz) with nominal "
               "FLOPs/cycle per ISA; memory bandwidth nominal 10 GB/s per core")
_CPU_BW_PER_CORE = 10 * GB


@functools.cache
def _cpuinfo() -> dict:
    info = {"cores": os.cpu_count() or 1, "mhz": 2000.0, "flags": frozenset(), "vendor": "",
            "mem": 8 * GIB}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
        n = len(re.findall(r"^processor\s*:", text, re.M))
        info["cores"] = n or info["cores"]
        for key, pat in (("mhz", r"^cpu MHz\s*:\s*([\d.]+)"),
                         ("vendor", r"^vendor_id\s*:\s*(\S+)")):
            m = re.search(pat, text, re.M)
            if m:
                info[key] = float(m.group(1)) if key == "mhz" else m.group(1)
        m = re.search(r"^(?:flags|Features)\s*:(.*)$", text, re.M)
        if m:
            info["flags"] = frozenset(m.group(1).split())
    except OSError:
        pass
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            m = re.search(r"MemTotal:\s*(\d+)\s*kB", f.read())
        if m:
            info["mem"] = int(m.group(1)) * 1024
    except OSError:
        pass
    return info


def cpu_chip(num_devices: int = 1) -> Chip:
    """This host's CPU as ``num_devices`` fake devices: each gets 1/N of the cores'
    estimated peak, memory and bandwidth."""
    info = _cpuinfo()
    flags, cores, hz = info["flags"], info["cores"], info["mhz"] * 1e6
    if "avx512f" in flags:
        f32 = 64 if info["vendor"] == "GenuineIntel" else 32
        isa = "AVX-512"
    elif "avx2" in flags and "fma" in flags:
        f32, isa = 32, "AVX2"
    else:
        f32, isa = 8, "SSE/NEON"
    if "amx_bf16" in flags:
        bf16, isa = 1024, isa + "+AMX"
    elif "avx512_bf16" in flags:
        bf16, isa = 2 * f32, isa + " bf16"
    else:
        bf16 = 0.75 * f32
    int8 = 4 * f32 if ("avx512_vnni" in flags or "avx_vnni" in flags) else 2 * f32
    per = cores * hz / num_devices
    name = f"CPU ({cores} cores, {isa}, {info['mhz']:.0f} MHz, estimated)"
    if num_devices > 1:
        name = f"CPU 1/{num_devices} of {cores} cores ({isa}, estimated)"
    return Chip(name, int(info["mem"] // num_devices),
                {"float32": f32 * per, "bfloat16": bf16 * per, "float16": f32 * per,
                 "int8": int8 * per},
                cores * _CPU_BW_PER_CORE / num_devices, _CPU_SOURCE)


# ---------------------------------------------------------------------------- parsing
ACCEPTED = ("cpu:N (N fake devices on this host)",
            "tpu-v5e:AxB, tpu-v6e:AxB (e.g. 4x4, 16x16)",
            "tpu-v5p:AxBxC, tpu-v4:AxBxC (e.g. 2x2x2, 2x2x4)",
            "any TPU form with *S for S slices over DCN (tpu-v5e:16x16*2)",
            "h100:N, h200:N, a100:N (one host of N <= 8 GPUs)",
            "h100:NxM (M hosts of N GPUs over InfiniBand)")


def _bad(text: str, why: str) -> ValueError:
    return ValueError(f"bad target {text!r}: {why}; accepted forms: " + "; ".join(ACCEPTED))


def _dims(text: str, spec: str) -> list[int]:
    if not re.fullmatch(r"\d+(x\d+)*", spec):
        raise _bad(text, f"{spec!r} is not sizes joined by 'x'")
    dims = [int(d) for d in spec.split("x")]
    if any(d < 1 for d in dims):
        raise _bad(text, "sizes must be positive")
    return dims


def parse_target(text: str) -> Target:
    """Parses target text (see :data:`ACCEPTED`) into a :class:`Target`.

    Raises:
      ValueError: naming the text and listing the accepted forms.
    """
    if not isinstance(text, str):
        raise _bad(str(text), "not a string")
    family, sep, spec = text.strip().lower().partition(":")
    if not sep or not spec:
        raise _bad(text, "expected FAMILY:SIZES")
    if family == "cpu":
        dims = _dims(text, spec)
        if len(dims) != 1:
            raise _bad(text, "cpu takes one device count")
        n = dims[0]
        chip = cpu_chip(n)
        # Fake devices exchange through host memory: a copy reads and writes it.
        bw = chip.hbm_bandwidth / 2
        return Target(text, "cpu", chip, n, 1, None, bw, bw,
                      "estimated: collectives between fake CPU devices are memory copies "
                      "at half the per-device memory bandwidth")
    if family.startswith("tpu-"):
        gen = family[4:]
        if gen not in TPUS:
            raise _bad(text, f"unknown TPU {gen!r} (known: {sorted(TPUS)})")
        row = TPUS[gen]
        spec, star, slices = spec.partition("*")
        if star and not slices.isdigit() or star and int(slices) < 1:
            raise _bad(text, "the slice count after '*' must be a positive integer")
        num_slices = int(slices) if star else 1
        dims = _dims(text, spec)
        if len(dims) != row.dims:
            shape = "AxB" if row.dims == 2 else "AxBxC"
            raise _bad(text, f"tpu-{gen} topologies are {shape}")
        chips = math.prod(dims)
        if chips > row.max_chips:
            raise _bad(text, f"one tpu-{gen} slice has at most {row.max_chips} chips")
        hosts = 1 if chips <= row.single_host_max else -(-chips // row.chips_per_host)
        return Target(text, "tpu", row.chip, chips * num_slices, hosts * num_slices,
                      f"{row.topology_prefix}:{spec}", row.ici_bidir / row.ports,
                      row.dcn_per_chip, row.source, num_slices, row.chip_config_name)
    if family in GPUS:
        row = GPUS[family]
        dims = _dims(text, spec)
        if len(dims) > 2:
            raise _bad(text, f"{family} takes N or NxM")
        per_host, hosts = dims[0], (dims[1] if len(dims) == 2 else 1)
        if per_host > row.max_per_host:
            raise _bad(text, f"one {family} host has at most {row.max_per_host} GPUs; write "
                       f"{row.max_per_host}x{-(-per_host // row.max_per_host)} for several")
        return Target(text, "gpu", row.chip, per_host * hosts, hosts, None,
                      row.nvlink_bidir / 2, row.ib_per_gpu, row.source)
    raise _bad(text, f"unknown family {family!r}")


def device_chip(device) -> Chip:
    """The :class:`Chip` of a live (or ahead-of-time topology) JAX device.

    CPU devices get this host's estimate divided among the process's CPU devices. An
    unknown GPU or TPU kind raises ValueError (no silent guess: MFU against a wrong peak
    misleads); callers that can go on without a peak catch it.
    """
    platform = device.platform.lower()
    kind = str(getattr(device, "device_kind", "")).strip()
    if platform == "cpu":
        import jax
        return cpu_chip(max(1, jax.local_device_count("cpu")))
    if platform == "tpu":
        gen = _TPU_KINDS.get(kind.lower())
        if gen is None:
            raise ValueError(f"unknown TPU kind {kind!r}: no peak figures for it (known: "
                             f"{sorted(_TPU_KINDS)})")
        return TPUS[gen].chip
    if platform in ("gpu", "cuda", "rocm"):
        for prefix, chip in _GPU_KINDS:
            if kind.lower().startswith(prefix):
                return chip
        raise ValueError(f"unknown GPU kind {kind!r}: no peak figures for it (known: "
                         f"{', '.join(p for p, _ in _GPU_KINDS)})")
    raise ValueError(f"no peak figures for platform {device.platform!r} ({kind!r})")
