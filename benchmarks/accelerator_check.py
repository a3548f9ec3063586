"""One prepared accelerator check: flash correctness, attention TFLOP/s and a train step's MFU.

Run it through ``benchmarks/accelerator_check.sh``, whose header holds the exact device-tool
call. It writes ONE JSON file (rewritten after every part, so a killed run still leaves
what it measured) and prints a summary of it as its last stdout line; the exit code is 0
only if every part passed. Each part is guarded: a failing part records its error and
traceback, and the rest still run.

Parts, in the order they run (the cheap and the important first; the sweep last, since it
stops at the time budget):

* ``env``: jax/jaxlib versions, devices, device kind, compute capability, CUDA and cuDNN
  versions where jax exposes them, and which of TensorFlow/seqio/gin this process loaded.
* ``flash``: :func:`jaxmt.kernels.flash_attention.flash_attention` run for real (Triton on
  GPU, no interpret mode; interpret mode in the CPU dry run) at its default tiles
  (``default_block_sizes("gpu")``) with the T5 relative-position bias, against
  :func:`jaxmt.kernels.common.reference_attention`: output and the gradients of q, k, v and
  the bias table, in bfloat16 and float32, on an encoder case (bidirectional buckets,
  two packed segments and padding, far tiles) and a decoder case (causal, unidirectional,
  a length that is not a tile multiple). The truth is the reference in float32 at
  ``highest`` matmul precision on the same (already rounded) inputs; the error of each
  tensor is ``max|x - truth| / max|truth|``. The bfloat16 rows also give the XLA
  reference's own bfloat16 error for scale. Pass: every error under ``TOLERANCE``.
* ``train_step``: a bf16 train step of the base model (``gin_configs/models/base.gin``,
  read by :func:`model_config_from_gin`, a parser of its plain ``ModelConfig.x = v`` lines:
  no gin needed) through jaxmt's :class:`~jaxmt.train.trainer.Trainer` on one device
  (T5's Adafactor, the default optimizer), compiled once ahead of time (the CPU dry run:
  the tiny preset with one encoder and one decoder layer). The batch is halved
  while the compiled step needs more than 85% of the device's memory. Reports the step
  time (median of timed steps after warm-up), tokens/s (source + target positions), and
  ``mfu = cost_analysis flops / step time / peak`` with the bf16 peak of
  ``jaxmt.plan.targets.device_chip``; a ``jax.profiler`` trace of one step is packed
  into ``<json stem>_trace.tar.gz`` beside the JSON (one file: the device tool returns
  files at most two folders deep). The model's attention is ``xla``, the base preset's,
  so cost_analysis counts every flop (it cannot see inside Pallas or cuDNN calls).
* ``attention_tflops``: TFLOP/s of ``flash`` (the Pallas kernel), ``dot_product``
  (``jax.nn.dot_product_attention``: cuDNN on a CUDA GPU, XLA on CPU; the row records
  which was asked for) and ``xla`` (jaxmt's materialising einsum attention), each through
  :func:`jaxmt.modeling.attention.attend`, the function the model calls, with the T5
  bias, bfloat16, forward and forward+backward (gradients of q, k, v and the table).
  Flops: forward ``4*B*H*S*S*D`` (QK^T and PV), backward 2.5x the forward (dQ, dK, dV, dP
  and the recomputed QK^T, FlashAttention-2's convention), so forward+backward is 3.5x;
  the same count for every implementation. Time per call: the median of ``repeats`` timed
  runs after two warm-up calls, each run a few back-to-back calls (enough for ~20 ms)
  ended by ``block_until_ready``.

Sizes (:data:`GPU`, :data:`CPU`): on the GPU the flash check takes 2 x 4 heads x 64 at
lengths 1024 (encoder) and 1000 (decoder); the sweep 12 heads x 64 (the base model's) with
16384 tokens a call (batch 16 at 1k ... 2 at 8k); the train step batch 32 x (512 + 512).

Usage: ``accelerator_check.py [--cpu] [OUT.json] [--budget_s S] [--parts a,b]``.
``--cpu`` (or ``ACCEL_CHECK_CPU=1``) is the dry run: tiny sizes, interpret-mode Pallas on
CPU. ``--parts`` runs a subset of flash, train_step, attention_tflops (env always runs),
e.g. to rerun one. The default path is ``$OUT/accelerator_check.json`` when ``$OUT`` is set.

No TensorFlow, seqio or gin: :mod:`jaxmt.config` decorates its dataclasses with
``gin.configurable``, and the GPU image has no gin, so where ``import gin`` fails this
script puts a stand-in module whose ``configurable`` returns the class unchanged into
``sys.modules`` before importing jaxmt (nothing here parses gin files).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import re
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
import traceback
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CPU_MODE = "--cpu" in sys.argv[1:] or os.environ.get("ACCEL_CHECK_CPU") == "1"
if CPU_MODE:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax is imported
HEAVY = ("tensorflow", "seqio", "gin")


def _gin_stand_in() -> bool:
    """Puts a no-op ``gin`` into sys.modules where gin is missing; True if it did."""
    try:
        import gin  # noqa: F401
        return False
    except ImportError:
        stub = types.ModuleType("gin")
        stub.__doc__ = "accelerator_check.py's stand-in: configurable() returns its argument."
        stub.configurable = lambda fn=None, **_: fn if fn is not None else (lambda f: f)
        sys.modules["gin"] = stub
        return True


GIN_STAND_IN = _gin_stand_in()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxmt.config import AttentionConfig, MeshConfig, ModelConfig, TrainConfig  # noqa: E402
from jaxmt.fileio import write_atomic  # noqa: E402
from jaxmt.kernels.common import RelPos, reference_attention  # noqa: E402
from jaxmt.kernels.dot_product import dot_product_implementation, platform  # noqa: E402
from jaxmt.kernels.flash_attention import default_block_sizes, flash_attention  # noqa: E402
from jaxmt.modeling.attention import Masking, attend  # noqa: E402
from jaxmt.plan.memory import compiled_bytes, compiled_flops  # noqa: E402
from jaxmt.sharding.partitioning import Partitioner  # noqa: E402
from jaxmt.train.trainer import Trainer  # noqa: E402

# max|x - truth| / max|truth| allowed per dtype (output and every gradient).
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}
FWD_BWD_FACTOR = 3.5  # forward + backward = (1 + 2.5) x forward flops
MEMORY_SHARE = 0.85  # the train step may take this share of the device's memory
PARTS = ("flash", "train_step", "attention_tflops")  # env always runs first
TRACE_RETURN_LIMIT = 16 << 20  # the device tool brings back files up to 16 MiB


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What each part runs: the GPU sizes, or the CPU dry run's tiny ones."""

    flash_batch: int
    flash_heads: int
    flash_head_dim: int
    flash_enc_len: int  # encoder case: two packed segments + padding
    flash_dec_len: int  # decoder case: causal, not a multiple of the tile
    lengths: tuple[int, ...]  # the TFLOP/s sweep
    sweep_tokens: int  # batch = sweep_tokens // length (at least 1)
    sweep_heads: int
    sweep_head_dim: int
    repeats: int
    model: str  # a gin_configs/models preset
    layers: int | None  # encoder and decoder layers instead of the preset's (None: keep)
    batch: int
    src_len: int
    tgt_len: int
    timed_steps: int
    budget_s: float  # the sweep stops starting new rows after this much wall time


GPU = Sizes(flash_batch=2, flash_heads=4, flash_head_dim=64, flash_enc_len=1024,
            flash_dec_len=1000, lengths=(1024, 2048, 4096, 8192), sweep_tokens=16384,
            sweep_heads=12, sweep_head_dim=64, repeats=10, model="base", layers=None,
            batch=32, src_len=512, tgt_len=512, timed_steps=10, budget_s=420.0)
# 256: the encoder case reaches far tiles (the buckets saturate at offset 92 here).
CPU = Sizes(flash_batch=1, flash_heads=2, flash_head_dim=32, flash_enc_len=256,
            flash_dec_len=200, lengths=(128, 256), sweep_tokens=256, sweep_heads=2,
            sweep_head_dim=32, repeats=2, model="tiny", layers=1, batch=2, src_len=32,
            tgt_len=32, timed_steps=3, budget_s=240.0)


def model_config_from_gin(path: Path, **overrides) -> ModelConfig:
    """A :class:`ModelConfig` from a model preset's plain lines (``gin_configs/models/*.gin``).

    Only comments, blank lines and ``ModelConfig.field = <Python literal>`` lines are
    accepted (the model presets hold nothing else); anything else raises ValueError, so
    the check never silently builds another model than the preset.
    """
    fields = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        m = re.fullmatch(r"ModelConfig\.(\w+)\s*=\s*(.+)", text)
        if not m:
            raise ValueError(f"{path}:{n}: not a plain 'ModelConfig.x = v' line: {line!r}")
        fields[m.group(1)] = ast.literal_eval(m.group(2))
    return ModelConfig(**{**fields, **overrides})


def _median_time(fn, args, repeats: int, min_run_s: float = 0.02) -> tuple[float, int]:
    """Seconds per call of ``fn(*args)``: the median of ``repeats`` timed runs, after 2
    warm-up calls, and the calls per run.

    A run is ``inner`` back-to-back calls ended by one block_until_ready, with ``inner``
    chosen so a run lasts about ``min_run_s``: a sub-millisecond kernel timed one call
    at a time would measure the launch and the host round trip, not the kernel.
    """
    for _ in range(2):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        one = time.perf_counter() - t0
    inner = int(min(50, max(1, np.ceil(min_run_s / max(one, 1e-6)))))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times), inner


def _segments(b: int, length: int, packed: bool) -> np.ndarray:
    """[b, length] ids: all ones, or two packed segments then 2.5% padding (id 0)."""
    seg = np.ones((b, length), np.int32)
    if packed:
        seg[:, int(length * 0.6):] = 2
        seg[:, length - max(1, length // 40):] = 0
    return seg

# ----------------------------------------------------------------------------- parts


def part_env(need_gpu: bool) -> dict:
    """Versions and devices; cheap. Fails only where a GPU is needed and absent."""
    import importlib.metadata as md

    dev = jax.devices()[0]
    loaded = [m for m in HEAVY if isinstance(sys.modules.get(m), types.ModuleType)
              and not (m == "gin" and GIN_STAND_IN)]  # real modules, not None or the stand-in
    out = {"jax": jax.__version__, "jaxlib": md.version("jaxlib"),
           "python": sys.version.split()[0], "backend": jax.default_backend(),
           "devices": [str(d) for d in jax.devices()], "device_kind": dev.device_kind,
           "platform_version": dev.client.platform_version,
           "compute_capability": getattr(dev, "compute_capability", None),
           "gin_stand_in": GIN_STAND_IN,
           "heavy_modules_loaded": loaded,
           "xla_flags": os.environ.get("XLA_FLAGS", "")}
    stats = dev.memory_stats() or {}
    if "bytes_limit" in stats:
        out["device_bytes_limit"] = int(stats["bytes_limit"])
    pkgs = {}
    for pkg in ("jax-cuda13-plugin", "jax-cuda12-plugin", "nvidia-cudnn-cu13", "nvidia-cudnn-cu12",
                "nvidia-cuda-runtime", "flax", "optax"):
        try:
            pkgs[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    out["packages"] = pkgs
    if out["backend"] == "gpu":
        try:  # jax's own view of the CUDA libraries it loaded (a private module: guarded)
            from jax._src.lib import cuda_versions
            out["cuda"] = {"cudnn": cuda_versions.cudnn_get_version(),
                           "runtime": cuda_versions.cuda_runtime_get_version(),
                           "driver": cuda_versions.cuda_driver_get_version()}
        except Exception as e:  # noqa: BLE001
            out["cuda"] = f"not exposed: {type(e).__name__}: {e}"
        try:  # versions and nvidia-smi's table (clocks, memory, driver)
            out["environment_info"] = jax.print_environment_info(return_string=True)
        except Exception as e:  # noqa: BLE001
            out["environment_info"] = f"{type(e).__name__}: {e}"
    out["passed"] = True  # informational: it passes once it ran
    if need_gpu and out["backend"] != "gpu":  # GPU sizes on a CPU would run for hours
        out.update(passed=False, error=f"no GPU: jax's backend is {out['backend']!r}; "
                                       "pass --cpu for the dry run")
    return out


def _out_and_grads(fn, q, k, v, table, ct, highest=False, **kw):
    """(output, dq, dk, dv, dtable) of ``fn(q, k, v, bias_table=table, **kw)`` for the
    output cotangent ``ct``, in one jit; ``highest``: float32 matmuls at full precision."""

    def run(q, k, v, table, ct):
        out, vjp = jax.vjp(lambda *a: fn(*a[:3], bias_table=a[3], **kw), q, k, v, table)
        return (out,) + vjp(ct.astype(out.dtype))

    if highest:  # read at trace time, so the context must hold around the first call
        with jax.default_matmul_precision("highest"):
            return jax.jit(run)(q, k, v, table, ct)
    return jax.jit(run)(q, k, v, table, ct)


def part_flash(s: Sizes, interpret: bool) -> dict:
    """Flash vs the reference: output and q/k/v/table gradients, bf16 and fp32."""
    rng = np.random.default_rng(0)
    b, h, d = s.flash_batch, s.flash_heads, s.flash_head_dim
    blocks = default_block_sizes("gpu")
    cases = [("encoder", s.flash_enc_len, RelPos(32, 128, True), False, True),
             ("decoder", s.flash_dec_len, RelPos(32, 128, False), True, False)]
    rows, passed = [], True
    for name, length, relpos, causal, packed in cases:
        shape = (b, length, h, d)
        base = [rng.normal(size=shape).astype(np.float32) * 0.5 for _ in range(3)]
        table0 = rng.normal(size=(relpos.num_buckets, h)).astype(np.float32)
        ct = jnp.asarray(rng.normal(size=shape), jnp.float32)
        seg = jnp.asarray(_segments(b, length, packed))
        kw = {"relpos": relpos, "q_segment_ids": seg, "kv_segment_ids": seg, "causal": causal}
        for dtype in ("bfloat16", "float32"):
            q, k, v = (jnp.asarray(x, dtype) for x in base)
            table = jnp.asarray(table0)
            f32 = [x.astype(jnp.float32) for x in (q, k, v)]  # the same rounded inputs
            truth = _out_and_grads(reference_attention, *f32, table, ct, highest=True, **kw)
            t0 = time.perf_counter()
            got = _out_and_grads(flash_attention, q, k, v, table, ct, block_sizes=blocks,
                                 backend="gpu", interpret=interpret, **kw)
            jax.block_until_ready(got)
            row = {"case": name, "dtype": dtype, "shape": list(shape), "causal": causal,
                   "relpos": list(relpos), "blocks": [blocks.block_q, blocks.block_k],
                   "interpret": interpret,
                   "flash_seconds": round(time.perf_counter() - t0, 2),  # compile + run
                   "tolerance": TOLERANCE[dtype]}
            others = {"flash": got}
            if dtype == "bfloat16":
                others["xla_bf16"] = _out_and_grads(reference_attention, q, k, v, table, ct, **kw)
            for label, vals in others.items():
                for tname, x, t in zip(("out", "dq", "dk", "dv", "dtable"), vals, truth):
                    x, t = np.asarray(x, np.float32), np.asarray(t, np.float32)
                    err = float(np.max(np.abs(x - t)))
                    rel = err / max(float(np.max(np.abs(t))), 1e-30)
                    key = tname if label == "flash" else f"{label}_{tname}"
                    row[key] = {"max_abs": err, "rel": rel}
                    if label == "flash":
                        ok = bool(np.isfinite(x).all()) and rel <= TOLERANCE[dtype]
                        row[key]["passed"] = ok
                        passed &= ok
            row["max_rel"] = max(row[t]["rel"] for t in ("out", "dq", "dk", "dv", "dtable"))
            rows.append(row)
    return {"passed": passed, "rows": rows, "max_rel": {
        dt: max(r["max_rel"] for r in rows if r["dtype"] == dt) for dt in TOLERANCE}}


def _attention_fns(impl: str, options: AttentionConfig, relpos: RelPos):
    """Jitted forward and forward+backward (grads of q, k, v, table) of ``attend``."""

    def fwd(q, k, v, table, seg):
        m = Masking(seg, seg, table, impl=impl, relpos=relpos, options=options)
        return attend(q, k, v, m)  # [b, s, h, d]

    def loss(q, k, v, table, seg, cot):
        return jnp.sum(fwd(q, k, v, table, seg).astype(jnp.float32) * cot)

    return jax.jit(fwd), jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))


def part_sweep(s: Sizes, interpret: bool, deadline: float) -> dict:
    """TFLOP/s of flash, dot_product and xla, forward and forward+backward."""
    relpos = RelPos(32, 128, True)
    options = AttentionConfig(flash_interpret=interpret)
    plat, cc = platform()
    rows, errors, skipped = [], 0, 0
    h, d = s.sweep_heads, s.sweep_head_dim
    for length in s.lengths:
        b = max(1, s.sweep_tokens // length)
        rng = np.random.default_rng(length)
        shape = (b, length, h, d)
        q, k, v, cot = (jnp.asarray(rng.normal(size=shape) * 0.5, jnp.bfloat16) for _ in range(4))
        table = jnp.asarray(rng.normal(size=(relpos.num_buckets, h)), jnp.float32)
        seg = jnp.ones((b, length), jnp.int32)
        flops_fwd = 4 * b * h * length * length * d
        for impl in ("flash", "dot_product", "xla"):
            fwd, fwd_bwd = _attention_fns(impl, options, relpos)
            for kind, fn, args, flops in (("fwd", fwd, (q, k, v, table, seg), flops_fwd),
                                          ("fwd_bwd", fwd_bwd, (q, k, v, table, seg, cot),
                                           FWD_BWD_FACTOR * flops_fwd)):
                row = {"impl": impl, "pass": kind, "length": length, "batch": b, "heads": h,
                       "head_dim": d, "flops": flops}
                if impl == "dot_product":
                    row["implementation"] = dot_product_implementation(
                        plat, jnp.bfloat16, d, length, length, True, cc)[0]
                if time.monotonic() > deadline:
                    row["skipped"] = "time budget spent"
                    skipped += 1
                    rows.append(row)
                    continue
                try:
                    t0 = time.perf_counter()
                    jax.block_until_ready(fn(*args))  # compile + first run
                    row["first_call_s"] = round(time.perf_counter() - t0, 2)
                    sec, inner = _median_time(fn, args, s.repeats)
                    row.update(median_s=sec, calls_per_run=inner,
                               tflops=round(flops / sec / 1e12, 4))
                except Exception as e:  # noqa: BLE001  (an OOM or a cuDNN refusal: keep going)
                    row["error"] = f"{type(e).__name__}: {e}"[:1500]
                    errors += 1
                rows.append(row)
                print(f"  {impl:>11} {kind:>7} S={length:<5} "
                      f"{row.get('tflops', row.get('error', row.get('skipped')))}", flush=True)
    ratios = {}
    for r in rows:
        if r["impl"] != "flash" or "tflops" not in r:
            continue
        for other in ("dot_product", "xla"):
            o = next((x for x in rows if x["impl"] == other and x["pass"] == r["pass"]
                      and x["length"] == r["length"] and "tflops" in x), None)
            if o:
                ratios[f"flash_vs_{other}_{r['pass']}_{r['length']}"] = round(
                    r["tflops"] / o["tflops"], 3)
    return {"passed": errors == 0 and skipped == 0, "errors": errors, "skipped": skipped,
            "flops_formula": "fwd = 4*B*H*S*S*D (QK^T and PV); bwd = 2.5 x fwd "
                             "(FlashAttention-2 convention); fwd_bwd = 3.5 x fwd",
            "dtype": "bfloat16", "relative_bias": True, "rows": rows, "flash_ratio": ratios}


def _peak(device) -> tuple[float | None, str]:
    """The device's bf16 peak (flop/s) and where it comes from."""
    from jaxmt.plan.targets import device_chip

    chip = device_chip(device)
    return chip.peak_flops.get("bfloat16"), f"jaxmt.plan.targets: {chip.name} ({chip.source})"


def part_train(s: Sizes, trace_path: Path) -> dict:
    """A bf16 train step of the preset model: step time, tokens/s, MFU, profiler trace."""
    device = jax.devices()[0]
    layers = {} if s.layers is None else dict(num_encoder_layers=s.layers,
                                              num_decoder_layers=s.layers)
    cfg = model_config_from_gin(ROOT / "gin_configs" / "models" / f"{s.model}.gin",
                                precision="bf16", **layers)
    limit = (device.memory_stats() or {}).get("bytes_limit")
    batch, tries = s.batch, []
    while True:
        trainer = Trainer(cfg, TrainConfig(batch_size=batch, steps=1000),
                          Partitioner(MeshConfig(), devices=[device]), s.src_len, s.tgt_len)
        t0 = time.perf_counter()
        compiled = trainer.compile_step(s.src_len, s.tgt_len)
        need = compiled_bytes(compiled.memory_analysis())
        tries.append({"batch": batch, "compiled_bytes": need,
                      "compile_s": round(time.perf_counter() - t0, 1)})
        if limit is None or need <= MEMORY_SHARE * limit or batch == 1:
            break
        batch //= 2
    out = {"model": f"gin_configs/models/{s.model}.gin (parsed: plain ModelConfig lines)",
           "precision": "bf16", "optimizer": trainer.cfg.optimizer, "batch": batch,
           "layers": [cfg.num_encoder_layers, cfg.num_decoder_layers],
           "src_len": s.src_len, "tgt_len": s.tgt_len, "params": trainer.num_params(),
           "attention": cfg.attention.encoder, "compiles": tries,
           "device_bytes_limit": limit}
    flops = compiled_flops(compiled)
    out["flops_per_step"] = flops
    state = trainer.init_state(0)
    data = trainer.partitioner.shard_batch(
        trainer.model.random_batch(batch, s.src_len, s.tgt_len), batch)
    rng = jax.device_put(jax.random.PRNGKey(0), trainer.partitioner.replicated)
    losses, times = [], []
    for i in range(2 + s.timed_steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, data, rng)
        losses.append(float(jax.block_until_ready(metrics["loss"])))
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens = batch * (s.src_len + s.tgt_len)
    out.update(step_s=step_s, step_s_min=min(times), tokens_per_step=tokens,
               tokens_per_s=round(tokens / step_s, 1), loss_first=losses[0],
               loss_last=losses[-1])
    try:
        peak, source = _peak(device)
    except ValueError as e:  # an unknown device kind: the rest of the part still counts
        peak, source = None, f"no peak: {e}"
    out["peak_flops_bf16"], out["peak_source"] = peak, source
    out["achieved_tflops"] = round(flops / step_s / 1e12, 3) if flops else None
    out["mfu"] = round(flops / step_s / peak, 4) if flops and peak else None
    try:  # one step under the profiler, packed into one file
        tmp = Path(tempfile.mkdtemp(prefix="accel_trace_"))
        with jax.profiler.trace(str(tmp)):
            state, metrics = compiled(state, data, rng)
            jax.block_until_ready(metrics["loss"])
        with tarfile.open(trace_path, "w:gz") as tar:
            tar.add(tmp, arcname="profile")
        shutil.rmtree(tmp, ignore_errors=True)
        size = trace_path.stat().st_size
        out["trace"] = {"file": str(trace_path), "bytes": size,
                        "read": f"tar xzf {trace_path.name}; tensorboard --logdir profile"}
        if size > TRACE_RETURN_LIMIT:
            out["trace"]["note"] = "larger than the device tool returns (16 MiB a file)"
    except Exception as e:  # noqa: BLE001  (a trace is a bonus: the part still passes)
        out["trace"] = {"error": f"{type(e).__name__}: {e}"[:1000]}
    out["passed"] = bool(np.isfinite(losses).all()) and flops is not None
    return out

# ----------------------------------------------------------------------------- driver


def summary(result: dict) -> dict:
    """The last stdout line: pass/fail per part and the headline figures."""
    parts = result["parts"]
    out = {"passed": result["passed"], "mode": result["mode"],
           "parts": {k: v.get("passed", False) for k, v in parts.items()},
           "wall_s": result.get("wall_s"), "json": result["json"]}
    if "max_rel" in parts.get("flash", {}):
        out["flash_max_rel"] = parts["flash"]["max_rel"]
    if "step_s" in parts.get("train_step", {}):
        t = parts["train_step"]
        out["train_step"] = {k: t.get(k) for k in ("batch", "step_s", "tokens_per_s", "mfu")}
    rows = parts.get("attention_tflops", {}).get("rows", [])
    if rows:
        out["fwd_bwd_tflops"] = {f"{r['impl']}@{r['length']}": r.get("tflops")
                                 for r in rows if r["pass"] == "fwd_bwd"}
    errors = {k: v["error"][:200] for k, v in parts.items() if "error" in v}
    if errors:
        out["errors"] = errors
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", help="the JSON file (default $OUT/accelerator_check.json)")
    ap.add_argument("--cpu", action="store_true", help="dry run: tiny sizes, interpret-mode Pallas")
    ap.add_argument("--budget_s", type=float, help="wall seconds after which the sweep stops")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"comma-separated subset of {','.join(PARTS)} (env always runs)")
    a = ap.parse_args()
    parts = [p for p in a.parts.split(",") if p]
    if not parts or set(parts) - set(PARTS):
        print(f"error: --parts={a.parts}: choose from {','.join(PARTS)}", file=sys.stderr)
        return 2
    path = a.out or (os.path.join(os.environ["OUT"], "accelerator_check.json")
                     if os.environ.get("OUT") else None)
    if not path:
        print("error: OUT.json: give a path (or set $OUT)", file=sys.stderr)
        return 2
    path = Path(path).resolve()
    start = time.monotonic()
    sizes = CPU if CPU_MODE else GPU
    if a.budget_s is not None:
        sizes = dataclasses.replace(sizes, budget_s=a.budget_s)
    result = {"mode": "cpu-dry-run" if CPU_MODE else "gpu", "json": str(path),
              "sizes": dataclasses.asdict(sizes), "parts": {}, "passed": False}

    def run(name, fn, *args):
        print(f"[{time.monotonic() - start:6.1f}s] {name} ...", flush=True)
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            rec = fn(*args)
        except Exception as e:  # noqa: BLE001  (each part is guarded)
            rec = {"passed": False, "error": f"{type(e).__name__}: {e}"[:2000],
                   "traceback": traceback.format_exc()[-4000:]}
        # Process CPU seconds beside wall seconds: far more CPU than wall x cores, or wall
        # far above CPU, says other programs competed for the machine.
        rec.update(seconds=round(time.perf_counter() - t0, 1),
                   cpu_s=round(time.process_time() - c0, 1))
        result["parts"][name] = rec
        result["wall_s"] = round(time.monotonic() - start, 1)
        write_atomic(path, json.dumps(result, indent=1, default=str))
        print(f"[{result['wall_s']:6.1f}s] {name}: {'passed' if rec.get('passed') else 'FAILED'}"
              + (f" ({rec['error'][:300]})" if "error" in rec else ""), flush=True)

    run("env", part_env, not CPU_MODE)
    if result["parts"]["env"]["passed"]:
        interpret = CPU_MODE
        if "flash" in parts:
            run("flash", part_flash, sizes, interpret)
        if "train_step" in parts:
            run("train_step", part_train, sizes, path.with_name(path.stem + "_trace.tar.gz"))
        if "attention_tflops" in parts:
            run("attention_tflops", part_sweep, sizes, interpret, start + sizes.budget_s)
    result["passed"] = all(p.get("passed") for p in result["parts"].values())
    result["wall_s"] = round(time.monotonic() - start, 1)
    write_atomic(path, json.dumps(result, indent=1, default=str))
    print(json.dumps(summary(result)))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
