"""``ModelConfig.precision = "auto"``: the native-bf16 rule on synthetic machines (backend,
GPU compute capability, /proc/cpuinfo flags, XLA_FLAGS caps), its lazy, cached use by
ModelConfig, and its reading of the real environment in a fresh interpreter."""

import json
import os
import subprocess
import sys

import pytest

from jaxmt import config as cfglib
from jaxmt import hardware
from jaxmt.config import ModelConfig
from jaxmt.hardware import AVX2_XLA_FLAGS, choose_precision, max_isa, read_cpu_flags, ynn_off

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Real flag lines, shortened: an EPYC with AVX-512 bf16, a Sapphire Rapids, an AVX2 EPYC.
NO_YNN = "--xla_cpu_experimental_ynn_fusion_type="  # YNNPACK's matmuls off
ZEN4 = "fpu sse4_2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 avx512vl"
SPR = "fpu sse4_2 avx avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8"
ZEN2 = "fpu sse4_2 avx avx2 fma sha_ni"


def _choice(platform="cpu", **kw):
    c = choose_precision(platform, **kw)
    return c.policy, c.reason


@pytest.mark.parametrize("cc, policy, reason", [
    ("8.0", "bf16", "this GPU (compute capability 8.0) has bf16 tensor cores"),
    ("8.6", "bf16", "compute capability 8.6"),
    ("9.0", "bf16", "compute capability 9.0"),
    ("10", "bf16", "compute capability 10.0"),
    ("12.0", "bf16", "compute capability 12.0"),
    ("7.5", "fp32", "this GPU (compute capability 7.5) has no native bf16; it needs 8.0"),
    ("6.1", "fp32", "no native bf16"),
    ("gfx90a", "fp32", "cannot tell whether this GPU (compute capability 'gfx90a')"),
    (None, "fp32", "cannot tell"),
])
def test_gpu_needs_ampere(cc, policy, reason):
    for name in ("gpu", "cuda"):
        got = _choice(name, compute_capability=cc)
        assert got[0] == policy and reason in got[1], got


def test_tpu_and_unknown_backends():
    assert _choice("tpu") == ("bf16", "TPUs compute bf16 natively")
    assert _choice("METAL") == ("fp32", "no bf16 rule for the 'METAL' backend")


@pytest.mark.parametrize("flags, policy, reason", [
    (ZEN4, "bf16", "this CPU has AVX512_BF16"),
    (SPR, "bf16", "this CPU has AVX512_BF16 and AMX"),
    ("avx2 amx_bf16", "bf16", "this CPU has AMX"),
    (ZEN2, "fp32", "this CPU has no native bf16"),
    ("avx512f avx512_vnni avx512bw", "fp32", "this CPU has no native bf16"),  # Cascade Lake
    ("", "fp32", "this CPU has no native bf16"),
    (None, "fp32", "cannot read this CPU's features (no /proc/cpuinfo)"),  # macOS
    (set(ZEN4.split()), "bf16", "this CPU has AVX512_BF16"),
])
def test_cpu_flags(flags, policy, reason):
    assert _choice(cpu_flags=flags) == (policy, reason)


@pytest.mark.parametrize("xla_flags, policy, reason", [
    ("--xla_cpu_max_isa=AVX2", "fp32", "XLA_FLAGS caps the CPU at AVX2"),
    ("--xla_cpu_max_isa=avx2", "fp32", "XLA_FLAGS caps the CPU at AVX2"),  # XLA upper-cases
    ("--xla_cpu_max_isa=SSE4_2", "fp32", "XLA_FLAGS caps the CPU at SSE4_2"),
    ("--xla_cpu_max_isa=AVX", "fp32", "XLA_FLAGS caps the CPU at AVX"),
    ("--xla_cpu_max_isa=AVX512", "fp32", "XLA_FLAGS caps the CPU at AVX512"),
    ("--xla_cpu_max_isa=AVX512_VNNI", "fp32", "XLA_FLAGS caps the CPU at AVX512_VNNI"),
    ("--xla_cpu_max_isa=AVX512_BF16", "bf16", "this CPU has AVX512_BF16"),
    ("--xla_cpu_max_isa=AMX", "bf16", "this CPU has AVX512_BF16"),
    ("--xla_cpu_max_isa=AMX_FP16", "bf16", "this CPU has AVX512_BF16"),
    ("--xla_cpu_max_isa=FOO", "bf16", "this CPU has AVX512_BF16"),  # XLA warns, ignores it
    ("--xla_cpu_max_isa=NEON", "bf16", "this CPU has AVX512_BF16"),  # not an x86 cap
    ("--xla_cpu_max_isa=", "bf16", "this CPU has AVX512_BF16"),
    ("--xla_force_host_platform_device_count=8 --xla_cpu_max_isa=AVX2", "fp32", "at AVX2"),
    ("--xla_cpu_max_isa=AVX2 --xla_cpu_max_isa=AVX512_BF16", "bf16", "AVX512_BF16"),  # last wins
    ("--xla_cpu_max_isa=AVX512_BF16 --xla_cpu_max_isa=AVX2", "fp32", "at AVX2"),
    ("--xla_cpu_max_isa='AVX2'", "fp32", "at AVX2"),
    ("-xla_cpu_max_isa=AVX2", "fp32", "at AVX2"),
    ("--xla_cpu_max_isa_x=AVX2", "bf16", "AVX512_BF16"),  # another flag
])
def test_xla_isa_cap_on_a_bf16_cpu(xla_flags, policy, reason):
    """With YNNPACK off (its matmuls ignore the cap), the cap decides."""
    got = _choice(cpu_flags=ZEN4, xla_flags=xla_flags + " " + NO_YNN)
    assert got[0] == policy and reason in got[1], got


@pytest.mark.parametrize("xla_flags", [
    "--xla_cpu_max_isa=AVX2",  # YNNPACK on (the default): bf16 matmuls stay native
    f"{NO_YNN} --xla_cpu_max_isa=AVX2 --xla_cpu_experimental_ynn_fusion_type=dot",
    NO_YNN,  # YNNPACK off without a cap: XLA's own code reaches AVX512_BF16
])
def test_a_cap_binds_bf16_only_with_ynnpack_off(xla_flags):
    assert _choice(cpu_flags=ZEN4, xla_flags=xla_flags) == ("bf16", "this CPU has AVX512_BF16")
    assert _choice(cpu_flags=ZEN4, xla_flags=AVX2_XLA_FLAGS) == (
        "fp32", "XLA_FLAGS caps the CPU at AVX2")
    assert ynn_off(AVX2_XLA_FLAGS) and not ynn_off("--xla_cpu_max_isa=AVX2")


def test_caps_between_the_two_bf16_features():
    # Sapphire Rapids capped below AMX keeps AVX512_BF16; an AMX-only CPU does not.
    assert _choice(cpu_flags=SPR, xla_flags=f"--xla_cpu_max_isa=AVX512_BF16 {NO_YNN}") == (
        "bf16", "this CPU has AVX512_BF16")
    assert _choice(cpu_flags="avx2 amx_bf16",
                   xla_flags=f"--xla_cpu_max_isa=AVX512_BF16 {NO_YNN}") == (
        "fp32", "XLA_FLAGS caps the CPU at AVX512_BF16")
    # A cap cannot add what the CPU lacks.
    assert _choice(cpu_flags=ZEN2, xla_flags="--xla_cpu_max_isa=AMX")[0] == "fp32"


@pytest.mark.parametrize("machine", ["aarch64", "arm64", "ppc64le"])
def test_other_cpus_stay_fp32(machine):
    policy, reason = _choice(cpu_flags="fp asimd bf16 sve", machine=machine)
    assert policy == "fp32"
    assert reason == f"cannot tell whether XLA computes bf16 natively on this {machine} CPU"


def test_max_isa_and_the_printed_form():
    assert max_isa("") is None and max_isa("--xla_cpu_use_thunk_runtime=true") is None
    assert max_isa(' --xla_cpu_max_isa="avx512_vnni" ') == "AVX512_VNNI"
    c = choose_precision("cpu", cpu_flags=ZEN2)
    assert str(c) == "fp32 (this CPU has no native bf16)"
    assert str(choose_precision("cpu", cpu_flags=ZEN4, xla_flags=AVX2_XLA_FLAGS)) == (
        "fp32 (XLA_FLAGS caps the CPU at AVX2)")


def test_read_cpu_flags(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text(f"processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: {ZEN4}\n\n"
                   "processor\t: 1\nflags\t\t: fpu\n")
    assert read_cpu_flags(str(x86)) == frozenset(ZEN4.split())  # the first processor's
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\nCPU implementer\t: 0x41\n")
    assert read_cpu_flags(str(arm)) == {"fp", "asimd", "bf16"}
    assert read_cpu_flags(str(tmp_path / "missing")) is None
    empty = tmp_path / "empty"
    empty.write_text("processor\t: 0\n")
    assert read_cpu_flags(str(empty)) == frozenset()


@pytest.fixture
def fake_machine(monkeypatch):
    """auto_precision() on a machine that picks ``fp32``, counting the detections."""
    calls = []

    def detect(device):
        calls.append(device)
        return hardware.PrecisionChoice("fp32", "this CPU has no native bf16")

    hardware.auto_precision.cache_clear()
    monkeypatch.setattr(hardware, "device_precision", detect)
    yield calls
    hardware.auto_precision.cache_clear()  # the real machine again for later tests


def test_model_config_resolves_auto_lazily_and_once(fake_machine):
    cfg = ModelConfig()
    assert cfg.precision == "auto" and not fake_machine  # nothing detected on construction
    assert (cfg.resolved_precision, cfg.dtype, cfg.param_dtype) == ("fp32", "float32", "float32")
    assert ModelConfig(emb_dim=64).dtype == "float32"
    assert len(fake_machine) == 1  # cached: once per process
    # A concrete policy never asks the machine.
    assert ModelConfig(precision="bf16").dtype == "bfloat16"
    assert ModelConfig(precision="bf16_params").param_dtype == "bfloat16"
    assert len(fake_machine) == 1


def test_precision_values_and_round_trip(tmp_path):
    with pytest.raises(ValueError, match=r"ModelConfig.precision: unknown value 'fp8'; "
                                         r"choose one of \('auto', 'fp32', 'bf16'"):
        ModelConfig(precision="fp8")
    for policy in cfglib.PRECISION_CHOICES:
        cfg = ModelConfig(precision=policy)
        (tmp_path / cfglib.CONFIG_FILE).write_text(cfglib.to_json(model=cfg))
        assert cfglib.load(str(tmp_path))["model"] == cfg  # "auto" stays lazy on load
    # A directory from before "auto" (written with the then-default "bf16") keeps it.
    raw = json.loads(cfglib.to_json(model=ModelConfig(precision="bf16")))
    (tmp_path / cfglib.CONFIG_FILE).write_text(json.dumps(raw))
    assert cfglib.load(str(tmp_path))["model"].precision == "bf16"


@pytest.mark.parametrize("xla_flags", ["", AVX2_XLA_FLAGS])
def test_fresh_interpreter_reads_this_machine(xla_flags):
    """The real inputs: this CPU's /proc/cpuinfo and the XLA_FLAGS the backend starts with."""
    code = ("from jaxmt.config import ModelConfig; from jaxmt import hardware; "
            "print(ModelConfig().resolved_precision, '|', hardware.auto_precision())")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    want = choose_precision("cpu", cpu_flags=read_cpu_flags(), machine=os.uname().machine,
                            xla_flags=xla_flags)
    assert out.stdout.strip().splitlines()[-1] == f"{want.policy} | {want}"
    if xla_flags:
        assert want.policy == "fp32"
