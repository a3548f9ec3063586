"""``jaxmt profile``: where a trained model's training step spends its time.

:func:`profile` replays a model directory's training run for a few steps: the configs
in its ``jaxmt_config.json``, the same input pipeline (``jaxmt.data.pipeline``, with the
pre-tokenised cache when the run has a fresh one) and the state of its latest
checkpoint, restored in memory (a fresh init when there is none: the report says which).
Nothing is saved: the checkpoints are opened read-only and the only files written are
the trace, under ``DIR/profile/plugins/profile/<time>/`` (``tensorboard --logdir
DIR/profile``; or ``perfetto_trace.json.gz`` there, opened at ui.perfetto.dev). The
stream starts at batch 0 of the run's seed: the position does not change the rate.

Each profiled step is timed as it runs, synchronously: ``next(batches)``, then the step
dispatched and waited for (``block_until_ready``). Its wall time splits into

* ``input``: blocked in ``next(batches)`` (the trace's ``jaxmt_input`` spans);
* ``device``: some device is running an XLA op: the union of the trace's op
  intervals inside the step's ``train`` span (outside the input wait). On CPU the ops
  run on the host's XLA threads (``tf_XLAPjRtCpuClient``/``tf_XLAEigen``) as events
  with ``hlo_op``/``hlo_module`` args, recorded at ``host_tracer_level=3``; on GPU/TPU
  the device's "XLA Ops" line. Without op events in the trace, the time blocked in
  ``block_until_ready`` after dispatch stands in (``device_source: "wall clock"``);
* ``host``: the rest (dispatch, placing the batch on the devices, Python),

so the three fractions partition the measured wall time and sum to 1.

MFU is ``flops_per_step / (step_s * peak_flops)``. ``flops_per_step`` is the compiled
step's ``cost_analysis()["flops"]`` (per device, times the devices) plus the matmul
flops XLA leaves out: cost analysis counts a ``lax.scan`` body once, so with
``ModelConfig.scan_layers`` or ``TrainConfig.num_microbatches`` > 1 the missing
``length - 1`` iterations of every scan (nested ones multiplied out) are counted from
the traced program's ``dot_general`` shapes (:func:`scan_correction`). Remat's
recomputation is in the compiled program, so this is hardware flops. ``peak_flops``
is :func:`jaxmt.plan.targets.device_chip`'s peak for the model's compute dtype, times
the mesh's devices (a CPU's fake devices share its peak). ``step_s`` is the mean wall
time of a profiled step, the input wait included.

The steps run synchronously, unlike ``jaxmt train``'s loop, which keeps one step in
flight while it fetches the next batch: here each part shows alone, and the loop's
step time is at most this one's.

The bottleneck (:func:`bottleneck`), from the fractions:

1. ``input`` >= 0.25, or the largest part: **input-bound**. tf.data reads and
   tokenises in background threads while a step runs, so a wait W after a step of C
   means a batch every C + W: the pipeline supplies ``C / (C + W) = 1 - input`` of what
   the step consumes. Remedy: a pre-tokenised cache (``jaxmt data cache``) when the run
   reads text, else more host CPU for the pipeline.
2. else ``host`` >= ``device``: **host-bound** (dispatch and transfers cost more than
   the device's work: a larger batch per step amortises them).
3. else, collectives (all-reduce, all-gather, reduce-scatter, ...) >= 50% of the op
   time: **communication-bound** (fewer ways over fsdp/tensor, more rows per device).
   Not for a CPU's fake devices: they share the host's cores, so their collectives'
   time is mostly one device's thread waiting for the others (``collective_share`` is
   still reported).
4. else **compute-bound**, with the MFU: at 25% or more, the device is used well (a
   faster step needs fewer flops or more chips); below it, the device is busy but far
   from its peak (memory traffic, small matmuls): the top op is named.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import math
import os
import re
import sys
import time

PROFILE_DIR = "profile"  # under the model directory: the only thing profiling writes
STEP_SPAN = "train"  # jax.profiler.StepTraceAnnotation name: TensorBoard's steps
INPUT_SPAN = "jaxmt_input"  # TraceAnnotation around next(batches)
TOP_OPS = 10
INPUT_BOUND = 0.25  # input fraction from which input is named the bottleneck
COLLECTIVE_BOUND = 0.5  # collectives' share of op time from which they are named
_COLLECTIVE = re.compile(r"^(all-reduce|all-gather|reduce-scatter|all-to-all|"
                         r"collective-permute|send|recv)")
GOOD_MFU = 0.25  # MFU from which a device-dominated step counts as using it well


# ------------------------------------------------------------------ flops of scans

def _dot_flops(eqn) -> float:
    """2 x output elements x contracted size of one ``dot_general``."""
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    out = eqn.outvars[0].aval.shape
    return 2.0 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)


def _sub_jaxprs(value):
    """The jaxprs in one equation parameter (a Jaxpr, ClosedJaxpr or a tuple of them)."""
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def matmul_flops(jaxpr, scan_once: bool = False) -> float:
    """Matmul flops of a (Closed)Jaxpr: every ``scan`` body times its length, or once
    with ``scan_once`` (as XLA's cost analysis counts it). A ``cond`` counts its
    dearest branch; a ``while`` body counts once (its trip count is not static)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
            continue
        subs = [matmul_flops(j, scan_once) for v in eqn.params.values()
                for j in _sub_jaxprs(v)]
        if not subs:
            continue
        if name == "scan":
            total += sum(subs) * (1 if scan_once else eqn.params["length"])
        elif name == "cond":
            total += max(subs)
        else:
            total += sum(subs)
    return total


def scan_correction(jaxpr) -> float:
    """Matmul flops (whole step, all devices) that cost analysis leaves out: the scan
    iterations after the first."""
    return matmul_flops(jaxpr) - matmul_flops(jaxpr, scan_once=True)


# ------------------------------------------------------------------ the trace

def trace_files(trace_root: str) -> str:
    """The newest ``perfetto_trace.json.gz`` jax.profiler wrote under ``trace_root``."""
    found = sorted(glob.glob(os.path.join(trace_root, "plugins", "profile", "*",
                                          "perfetto_trace.json.gz")))
    if not found:
        raise FileNotFoundError(f"{trace_root}: jax.profiler wrote no perfetto_trace.json.gz")
    return found[-1]


def read_events(path: str) -> list[dict]:
    """The complete ("X") events of a Chrome/Perfetto JSON trace, with ``thread`` and
    ``process`` names added, timestamps and durations in microseconds."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    threads, procs = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e.get("pid"), e.get("tid"))] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e.get("pid")] = e["args"]["name"]
    out = []
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            out.append(dict(e, thread=threads.get((e.get("pid"), e.get("tid")), ""),
                            process=procs.get(e.get("pid"), "")))
    return out


def op_events(events: list[dict]) -> list[dict]:
    """The XLA op executions: a device's "XLA Ops" line where the trace has one; else
    the events carrying an ``hlo_op`` on device planes (``/device:GPU:0``: kernels on
    their streams); else every event carrying an ``hlo_op`` (CPU: thunks on the host's
    XLA threads)."""
    lines = [e for e in events if e["thread"] == "XLA Ops"]
    if lines:
        return lines
    ops = [e for e in events if "hlo_op" in (e.get("args") or {})
           and not e["name"].startswith("end: ")]
    on_device = [e for e in ops if e["process"].startswith("/device:")]
    return on_device or ops


def _op_name(e: dict) -> str:
    """The HLO instruction an event ran (a GPU kernel's name is the kernel's)."""
    return (e.get("args") or {}).get("hlo_op") or e["name"]


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _overlap(merged: list[tuple[float, float]], a: float, b: float) -> float:
    return sum(max(0.0, min(b, y) - max(a, x)) for x, y in merged)


def self_times(ops: list[dict]) -> list[tuple[str, float]]:
    """``(op name, exclusive microseconds)`` per event: a op nested in another on the
    same line (a while loop's body on CPU) is taken out of its parent's time."""
    out = []
    by_line: dict = {}
    for e in ops:
        by_line.setdefault((e.get("pid"), e.get("tid")), []).append(e)
    for line in by_line.values():
        line.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list] = []  # [end, name, self time]
        for e in line:
            while stack and e["ts"] >= stack[-1][0]:
                done = stack.pop()
                out.append((done[1], max(done[2], 0.0)))
            if stack:
                stack[-1][2] -= e["dur"]
            stack.append([e["ts"] + e["dur"], _op_name(e), e["dur"]])
        out.extend((s[1], max(s[2], 0.0)) for s in stack)
    return out


_HLO_OP = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = .*?metadata=\{op_name="([^"]*)"', re.M)


def hlo_sources(hlo_text: str) -> dict[str, str]:
    """Instruction name -> the JAX operation it came from (its ``op_name`` metadata, e.g.
    ``jit(_train_step)/.../encoder/layers_0/mlp/wi/dot_general``), from the compiled
    module's ``as_text()``: what the trace's op names (``ynn_fusion.12``) stand for."""
    return {m.group(1): m.group(2) for m in _HLO_OP.finditer(hlo_text)}


def top_ops(ops: list[dict], n: int = TOP_OPS, steps: int = 1,
            sources: dict[str, str] | None = None) -> list[dict]:
    """The ``n`` ops with the most exclusive time, summed over the profiled steps and
    devices: ``name``, ``total_ms``, ``ms_per_step``, ``share`` (of all op time) and
    ``source`` (:func:`hlo_sources`; "" when unknown)."""
    totals: dict[str, float] = {}
    for name, us in self_times(ops):
        totals[name] = totals.get(name, 0.0) + us
    whole = sum(totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:n]
    sources = sources or {}
    return [{"name": k, "total_ms": round(v / 1e3, 3), "ms_per_step": round(v / 1e3 / steps, 3),
             "share": round(v / whole, 4), "source": sources.get(k, "")} for k, v in ranked]


def breakdown(events: list[dict], steps: int, sources: dict[str, str] | None = None
              ) -> dict | None:
    """Seconds of ``wall``, ``input``, ``device`` and ``host`` over the profiled steps
    (the trace's ``train`` spans), and the top ops; None when the trace lacks the spans
    or any op event."""
    spans = sorted((e for e in events if e["name"] == STEP_SPAN), key=lambda e: e["ts"])
    waits = [e for e in events if e["name"] == INPUT_SPAN]
    ops = op_events(events)
    if len(spans) != steps or len(waits) != steps or not ops:
        return None
    spans_iv = [(e["ts"], e["ts"] + e["dur"]) for e in spans]
    ops = [e for e in ops if any(a <= e["ts"] < b for a, b in spans_iv)]
    if not ops:
        return None
    busy = _union([(e["ts"], e["ts"] + e["dur"]) for e in ops])
    exclusive = self_times(ops)
    collective = sum(us for name, us in exclusive if _COLLECTIVE.match(name))
    wall = sum(b - a for a, b in spans_iv)
    wait = sum(e["dur"] for e in waits)
    device = sum(_overlap(busy, a, b) for a, b in spans_iv)
    device -= sum(_overlap(busy, e["ts"], e["ts"] + e["dur"]) for e in waits)
    device = min(device, wall - wait)
    return {"wall": wall / 1e6, "input": wait / 1e6, "device": device / 1e6,
            "host": (wall - wait - device) / 1e6,
            "collective_share": collective / max(sum(us for _, us in exclusive), 1e-9),
            "top_ops": top_ops(ops, steps=steps, sources=sources)}


# ------------------------------------------------------------------ the verdict

def bottleneck(fractions: dict[str, float], mfu: float | None, cached: bool,
               top: list[dict] | None = None, collective_share: float = 0.0,
               precision: str = "") -> str:
    """The bottleneck in one sentence (rules in the module docstring); ``precision``
    (ModelConfig's) decides whether bf16 is suggested."""
    fi, fd, fh = fractions["input"], fractions["device"], fractions["host"]
    if fi >= INPUT_BOUND or fi >= max(fd, fh):
        fix = ("the pre-tokenised cache is already read: give the pipeline more host CPU "
               "(fewer processes per host, a larger host)" if cached else
               "build a cache (`jaxmt data cache`), the run tokenises on the fly")
        return (f"input-bound: the step waits for its batch {fi:.0%} of the time, so the "
                f"pipeline supplies {1 - fi:.2f} of what the step consumes; {fix}")
    if fh >= fd:
        return (f"host-bound: {fh:.0%} of the step is host work (dispatch, batch transfer, "
                f"Python) against {fd:.0%} on the device; a larger batch per step "
                "(TrainConfig.batch_size) amortises it")
    busy = f"the device computes {fd:.0%} of the step"
    if collective_share >= COLLECTIVE_BOUND:
        return (f"communication-bound: collectives (all-reduce, all-gather, ...) take "
                f"{collective_share:.0%} of the device's op time; {busy}; fewer ways over "
                "fsdp/tensor or more rows per device (TrainConfig.batch_size) shrink their "
                "share")
    if mfu is None:
        return f"compute-bound: {busy} (no peak figures for this device, so no MFU)"
    if mfu >= GOOD_MFU:
        return (f"compute-bound: MFU {mfu:.0%}; {busy}; a faster step needs fewer flops "
                "(less remat, a smaller model) or more chips")
    worst = ""
    if top:
        worst = (f"; the top op is {top[0]['name']} ({top[0]['share']:.0%} of op time: "
                 f"{_short(top[0].get('source', ''), 60)})")
    bf16 = "bf16 (ModelConfig.precision) or " if precision == "fp32" else ""
    return (f"compute-bound at a low MFU ({mfu:.1%}): {busy} but far from its peak (memory "
            f"traffic, small matmuls){worst}; try {bf16}more rows per device")


def _short(source: str, width: int = 80) -> str:
    """An op_name without its ``jit(...)/`` prefix; its start and end when too long."""
    source = re.sub(r"^jit\([^)]*\)/", "", source)
    if len(source) <= width:
        return source
    head = width // 3
    return source[:head] + "..." + source[-(width - head - 3):]


def format_report(r: dict) -> str:
    """The report as readable lines."""
    f, parts = r["fractions"], r["parts_s"]
    lines = [f"profile of {r['model_dir']}: {r['steps']} steps after {r['warmup']} warm-up; "
             f"{r['state']}",
             f"device: {r['device']} x {r['num_devices']}; mesh {r['mesh']}; precision "
             f"{r['precision']}",
             f"step: {r['step_s'] * 1e3:.1f} ms = device {f['device']:.1%} "
             f"({parts['device'] * 1e3:.1f} ms) + input {f['input']:.1%} "
             f"({parts['input'] * 1e3:.1f} ms) + host {f['host']:.1%} "
             f"({parts['host'] * 1e3:.1f} ms)  [device time from the {r['device_source']}]"]
    if r["mfu"] is not None:
        lines.append(f"MFU: {r['mfu']:.2%} = {r['flops_per_step'] / 1e9:.2f} GFLOP/step / "
                     f"{r['step_s'] * 1e3:.1f} ms / {r['peak_flops'] / 1e12:.3f} TFLOP/s peak "
                     f"({r['peak_source']})")
    else:
        lines.append(f"MFU: unknown ({r['peak_source']}); {r['flops_per_step'] / 1e9:.2f} "
                     "GFLOP/step")
    if r["scan_flops"]:
        lines.append(f"  of which {r['scan_flops'] / 1e9:.2f} GFLOP are scan iterations "
                     "cost_analysis counts once, added from the traced program")
    if r["top_ops"]:
        lines.append("top ops (exclusive time, all profiled steps and devices):")
        w = max(len(o["name"]) for o in r["top_ops"])
        for o in r["top_ops"]:
            lines.append(f"  {o['name']:<{w}}  {o['total_ms']:9.2f} ms  {o['share']:6.1%}  "
                         f"{_short(o['source'])}")
    lines.append(f"bottleneck: {r['bottleneck']}")
    lines.append(f"trace: {r['trace_dir']} (tensorboard --logdir "
                 f"{os.path.join(r['model_dir'], PROFILE_DIR)}, or perfetto_trace.json.gz at "
                 "ui.perfetto.dev)")
    return "\n".join(lines)


# ------------------------------------------------------------------ the run

@dataclasses.dataclass
class _Run:
    trainer: object
    batches: object
    state: object
    note: str  # where the state came from
    cached: bool
    bucket_shapes: tuple  # (rows, length) of each bucket; () unless batching="bucket"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _setup(model_dir: str, cfgs: dict) -> _Run:
    """The run's trainer, input pipeline and state, as ``jaxmt train`` builds them,
    without writing anything."""
    from jaxmt import config as cfglib
    from jaxmt.checkpoint import Checkpointer, checkpoint_dir
    from jaxmt.config import MeshConfig
    from jaxmt.data import bucketing, cache, pipeline, tasks
    from jaxmt.inference import pretrained
    from jaxmt.modeling import param_tree
    from jaxmt.sharding.partitioning import Partitioner
    from jaxmt.train.trainer import Trainer

    model_cfg, data_cfg, train_cfg = cfgs["model"], cfgs["data"], cfgs["train"]
    if train_cfg.distill.teacher:
        raise ValueError(f"{model_dir}: a distillation run (TrainConfig.distill.teacher="
                         f"{train_cfg.distill.teacher!r}); `jaxmt profile` does not replay "
                         "its teacher yet")
    partitioner = Partitioner(cfgs.get("mesh") or MeshConfig())
    trainer = Trainer(model_cfg, train_cfg, partitioner, data_cfg.src_len, data_cfg.tgt_len)
    record = pretrained.read_record(model_dir)  # {} unless fine-tuned from a base
    base = lambda: pretrained.base_of(model_dir, scan_layers=model_cfg.scan_layers)  # noqa: E731
    if record.get("saved") == "trainable":  # adapters/LoRA checkpoints go over the base
        trainer.save_trained_only = True
        trainer.base_params = pretrained.load_params(base(), trainer.abstract_state.params)

    text_format = None
    spm_path = os.path.join(model_dir, cfglib.VOCAB_FILE)
    if "tokenizer" in cfgs:
        from jaxmt.inference.tokenizer import text_format as make_text_format
        text_format = make_text_format(model_dir, cfgs["tokenizer"], model_cfg.vocab_size)
    mixture = tasks.register_from_config(data_cfg, spm_path, report_dir=None,
                                         text_format=text_format)
    cache_dir = data_cfg.cache_dir or os.path.join(model_dir, cfglib.CACHE_DIR)
    cached = cache.is_usable(cache_dir, mixture, text_format or spm_path)
    local_shapes = ()
    if data_cfg.batching == "bucket":  # one process: its rows are the global rows
        multiple = partitioner.data_parallel_size * train_cfg.num_microbatches
        local_shapes = bucketing.bucket_shapes(data_cfg.bucket_lengths, train_cfg.batch_size,
                                               max(data_cfg.src_len, data_cfg.tgt_len), multiple)
    route = model_cfg.adapter.route_ids if model_cfg.adapter.size else None
    batches = pipeline.train_batches(
        mixture, data_cfg.src_len, data_cfg.tgt_len,
        partitioner.host_local_batch_size(train_cfg.batch_size), seed=train_cfg.seed,
        batching=data_cfg.batching, buckets=local_shapes,
        cache_dir=cache_dir if cached else None, route=route)

    found = None
    if os.path.isdir(checkpoint_dir(model_dir)):
        ckpt = Checkpointer(model_dir, read_only=True)  # profiling never saves
        try:
            found = ckpt.restore_latest(lambda step: trainer.restore_state(ckpt, step))
        finally:
            ckpt.close()
    if found:
        step, (state, _) = found
        note = f"state of checkpoint step {step} (in memory; nothing is saved)"
    else:
        state = trainer.init_state(train_cfg.seed)
        note = "no checkpoint: a fresh init of the run's configs (nothing is saved)"
        if record:  # as `jaxmt train` starts: the base's weights, new adapters/LoRA
            base_params = trainer.base_params
            if base_params is None:
                base_params = pretrained.load_params(base(), trainer.abstract_state.params)
            state = state.replace(params=param_tree.overlay(state.params, base_params))
            note = ("no checkpoint: a fresh init over the base's weights (nothing is "
                    "saved)")
    return _Run(trainer, batches, state, note, cached, tuple(local_shapes))


class _Steps:
    """The compiled step per batch shape (bucketing has several), with its flops."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.fn = trainer.step_fn()
        self.compiled: dict = {}
        self.flops: dict = {}  # shape -> (cost_analysis total, scan correction)
        self.sources: dict[str, str] = {}  # HLO instruction -> JAX op_name

    def compile(self, state, batch, rng) -> tuple:
        """Compiles for ``batch``'s shape (concrete or ShapeDtypeStructs) once."""
        shape = tuple(batch["encoder_input_tokens"].shape)
        if shape not in self.compiled:
            traced = self.fn.trace(state, batch, rng)
            compiled = traced.lower().compile()
            n = self.trainer.partitioner.mesh.devices.size
            from jaxmt.plan.memory import compiled_flops
            self.flops[shape] = ((compiled_flops(compiled) or 0.0) * n,
                                 scan_correction(traced.jaxpr))
            self.compiled[shape] = compiled
            self.sources.update(hlo_sources(compiled.as_text()))
        return shape

    def __call__(self, state, batch, rng):
        return self.compiled[self.compile(state, batch, rng)](state, batch, rng)


def profile(model_dir: str, steps: int = 10, warmup: int = 2, progress: bool = True) -> dict:
    """Profiles ``steps`` training steps of ``model_dir``'s run after ``warmup`` untimed
    ones; writes the trace under ``model_dir/profile`` and returns the report (the
    ``--json`` object): ``model_dir, steps, warmup, step_s, fractions {device, input,
    host}, parts_s, mfu, flops_per_step, scan_flops, peak_flops, peak_source, device,
    num_devices, mesh, precision, top_ops, bottleneck, trace_dir, device_source, state``.

    Raises:
      ValueError: ``steps`` or ``warmup`` < 1, or the directory is no replayable run.
      FileNotFoundError: no ``jaxmt_config.json`` in ``model_dir``.
    """
    if steps < 1 or warmup < 1:
        raise ValueError(f"steps={steps}, warmup={warmup}: both must be at least 1")
    from jaxmt import config as cfglib

    cfgs = cfglib.load(model_dir)
    import jax
    import numpy as np
    from tqdm import tqdm

    run = _setup(model_dir, cfgs)
    trainer = run.trainer
    part = trainer.partitioner
    step_fn = _Steps(trainer)
    rng = jax.random.PRNGKey(trainer.cfg.seed + 1)
    state = run.state
    _log(f"profile: {run.note}; {trainer.num_params() / 1e6:.2f}M parameters; {part} over "
         f"{part.mesh.devices.size} {jax.devices()[0].platform} device(s)")

    def one_step(state, annotate: bool):
        t0 = time.perf_counter()
        if annotate:
            with jax.profiler.TraceAnnotation(INPUT_SPAN):
                local = next(run.batches)
        else:
            local = next(run.batches)
        t1 = time.perf_counter()
        batch = part.shard_batch(local, local["encoder_input_tokens"].shape[0])
        state, metrics = step_fn(state, batch, rng)
        t2 = time.perf_counter()
        jax.block_until_ready((state, metrics))
        t3 = time.perf_counter()
        return state, batch, (t3 - t0, t1 - t0, t3 - t2)

    bar = tqdm(total=warmup + steps, desc="profile", unit="step", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    timings, shapes = [], []
    trace_root = os.path.join(model_dir, PROFILE_DIR)
    try:
        for _ in range(warmup):  # the compile, tf.data's start, the first transfers
            state, batch, _ = one_step(state, annotate=False)
            bar.update(1)
        for rows, length in run.bucket_shapes:  # no compile inside a profiled step
            step_fn.compile(state, {k: jax.ShapeDtypeStruct((rows, length), v.dtype,
                                                            sharding=part.batch_sharding)
                                    for k, v in batch.items()}, rng)
        options = jax.profiler.ProfileOptions()
        options.host_tracer_level = 3  # XLA's CPU thunks appear as op events from level 3
        options.python_tracer_level = 0  # Python calls would swamp the trace
        jax.profiler.start_trace(trace_root, create_perfetto_trace=True,
                                 profiler_options=options)
        try:
            for i in range(steps):
                with jax.profiler.StepTraceAnnotation(STEP_SPAN, step_num=warmup + i):
                    state, batch, t = one_step(state, annotate=True)
                timings.append(t)
                shapes.append(tuple(batch["encoder_input_tokens"].shape))
                bar.update(1)
        finally:
            jax.profiler.stop_trace()
    finally:
        bar.close()
    del state  # never saved

    perfetto = trace_files(trace_root)
    parts = breakdown(read_events(perfetto), steps, step_fn.sources)
    wall_clock = np.asarray(timings).sum(axis=0)  # [wall, input, blocked]
    if parts is None:  # no op events: the time blocked on the result stands in
        device = min(wall_clock[2], wall_clock[0] - wall_clock[1])
        parts = {"wall": wall_clock[0], "input": wall_clock[1], "device": device,
                 "host": wall_clock[0] - wall_clock[1] - device, "top_ops": [],
                 "collective_share": 0.0}
        source = "wall clock"
    else:
        source = "trace"
    fractions = {k: parts[k] / parts["wall"] for k in ("device", "input", "host")}
    step_s = float(wall_clock[0]) / steps
    cost = sum(step_fn.flops[s][0] for s in shapes) / steps
    scan = sum(step_fn.flops[s][1] for s in shapes) / steps
    flops = cost + scan
    device0 = part.mesh.devices.flat[0]
    dtype = cfglib.PRECISIONS[trainer.model.cfg.precision][0]
    peak = mfu = None
    try:
        from jaxmt.plan.targets import device_chip
        chip = device_chip(device0)
        peak = chip.peak(dtype) * part.mesh.devices.size
        peak_source = f"{chip.name}, {dtype}: {chip.source}"
        mfu = flops / step_s / peak if peak else None
    except ValueError as e:  # an unknown device kind: no MFU rather than a wrong one
        peak_source = str(e)
    report = {
        "model_dir": model_dir, "steps": steps, "warmup": warmup, "step_s": step_s,
        "fractions": fractions,
        "parts_s": {k: parts[k] / steps for k in ("device", "input", "host")},
        "mfu": mfu, "flops_per_step": flops, "scan_flops": scan, "peak_flops": peak,
        "peak_source": peak_source, "device": device0.device_kind,
        "num_devices": int(part.mesh.devices.size),
        "mesh": {k: int(v) for k, v in part.sizes.items()},
        "precision": trainer.model.cfg.precision, "top_ops": parts["top_ops"],
        "collective_share": parts["collective_share"],
        "device_source": source, "state": run.note, "cached": run.cached,
        "trace_dir": os.path.dirname(perfetto)}
    fake = device0.platform == "cpu" and part.mesh.devices.size > 1  # see rule 3
    report["bottleneck"] = bottleneck(fractions, mfu, run.cached, parts["top_ops"],
                                      0.0 if fake else parts["collective_share"],
                                      trainer.model.cfg.precision)
    return report
