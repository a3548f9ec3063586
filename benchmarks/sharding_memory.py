"""Mesh presets: per-device parameter, optimizer and scratch memory, and collective traffic.

For each preset in ``gin_configs/mesh/`` (dp, zero1, fsdp, tp, fsdp_tp) this compiles
jaxmt's AdamW train step ahead of time (``Trainer.compile_step``: abstract state, no
data, nothing runs) on ``--devices`` fake CPU devices (default 8), for the ``base``
model (gin_configs/models/base.gin: d_model 768, d_ff 2048 gated, 12+12 layers, 32128
vocabulary, bf16 compute over fp32 parameters) with an unrolled layer stack, at batch
32 x (128 source + 128 target) tokens. The gin files themselves are parsed, one preset
at a time.

base has 12 heads, which do not split 8 ways, so every preset uses 16 heads x 48
(``--heads/--head_dim``): the same 768-wide attention and the same parameter count, so
the rows compare like with like. The output says so.

Per device, from the compiled step:

- ``param_bytes`` / ``opt_bytes``: the shards of the parameters and of the optimizer
  state (``sharding.shard_shape`` x itemsize, summed). They are checked against XLA's
  ``memory_analysis().argument_size_in_bytes``: parameters + optimizer state + step
  counter + batch + rng must add up to it exactly (``argument_accounted``), less the
  inputs jit dropped as unused (listed). On a TPU target XLA's figure is larger by the
  padding of its tiled layouts (``argument_gap_bytes``).
- ``temp_bytes``: ``memory_analysis().temp_size_in_bytes`` (activations and scratch;
  XLA's CPU backend upcasts bf16 work to f32, so this is more than a TPU's).
- ``total_*_bytes``: the unsharded sizes, so ``total / devices`` is the ideal split.
- Collectives: every all-reduce, all-gather, reduce-scatter, all-to-all and
  collective-permute in the optimised HLO (``compiled.as_text()``), with its count and
  result bytes (the sum over a tuple result's elements; an async ``-start``/``-done``
  pair counts once, by the ``-done``'s result), and an estimate of the bytes each device
  sends on a ring (all-reduce 2(g-1)/g, all-gather and all-to-all (g-1)/g of the
  result, reduce-scatter (g-1) x the result, g = group size). Collectives inside a while
  loop are multiplied by its known trip count; with an unrolled stack there are none.
  The figures are what XLA's CPU backend emits: it makes no reduce-scatters (ZeRO's
  gradient reduce-scatters are all-reduces of the whole gradient, then a slice), and
  it gathers weights and all-reduces activations in f32 where a TPU compile moves the
  bf16 cast before the collective. ``--target v5p:2x2x2`` shows what libtpu emits
  instead (about 100 s of compile per preset on 2 cores).
- Under tensor parallelism, the all-reduces of [batch, length, embed] activations,
  forward and backward, by module, against the number of attention and MLP blocks
  (Megatron: one per block forward) and three counts for the backward: every
  column-parallel projection's input gradient all-reduced on its own, one per projected
  input, or the minimum.

The acceptance checks (per-device parameter + optimizer bytes within 5% of total /
devices under fsdp; optimizer state so under zero1, with parameters replicated;
attention and MLP weights so under tp) are computed from the measured figures.

    python benchmarks/sharding_memory.py [--devices 8] [--presets dp,zero1,fsdp,tp,fsdp_tp]
        [--model base] [--heads 16] [--head_dim 48] [--batch 32] [--src_len 128]
        [--tgt_len 128] [--target cpu|v5p:2x2x2] [--dump_hlo DIR] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from collections import defaultdict

from jaxmt.gin_files import MESH_PRESETS as PRESETS  # imports no JAX: XLA_FLAGS come first


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=8, help="fake CPU devices (--target cpu)")
    ap.add_argument("--presets", default=",".join(PRESETS),
                    help="gin files under gin_configs/mesh, comma-separated")
    ap.add_argument("--model", default="base", help="a gin file under gin_configs/models")
    ap.add_argument("--heads", type=int, default=16,
                    help="ModelConfig.num_heads override (0 keeps the gin value)")
    ap.add_argument("--head_dim", type=int, default=48,
                    help="ModelConfig.head_dim override (0 keeps the gin value)")
    ap.add_argument("--batch", type=int, default=32, help="global batch, rows")
    ap.add_argument("--num_microbatches", type=int, default=1,
                    help="TrainConfig.num_microbatches (gradient accumulation)")
    ap.add_argument("--src_len", type=int, default=128)
    ap.add_argument("--tgt_len", type=int, default=128)
    ap.add_argument("--target", default="cpu",
                    help="cpu (fake devices), or a TPU topology such as v5p:2x2x2 compiled "
                         "ahead of time through libtpu (its chip count replaces --devices)")
    ap.add_argument("--dump_hlo", default="", help="write each preset's optimised HLO here")
    ap.add_argument("--json", action="store_true", help="also print one JSON object, last")
    return ap


# The fake device count must be set before jax is imported.
_pre, _ = build_parser().parse_known_args(sys.argv[1:] if __name__ == "__main__" else [])
_flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count={_pre.devices}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a TPU target is only compiled for, via libtpu
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import flax.linen as nn  # noqa: E402
import gin  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxmt.sharding import axes  # noqa: E402
from jaxmt.gin_files import parse_gin  # noqa: E402
from jaxmt.config import ModelConfig, TrainConfig  # noqa: E402
from jaxmt.modeling.model import EncoderDecoderModel  # noqa: E402
from jaxmt.gin_files import mesh_preset  # noqa: E402
from jaxmt.sharding.partitioning import Partitioner, topology_devices  # noqa: E402
from jaxmt.train.trainer import Trainer  # noqa: E402

MiB = 2 ** 20


# ---------------------------------------------------------------------------------------
# Collectives in the optimised HLO text.

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_INSTR = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.*?)\s"
    rf"(?P<op>{'|'.join(KINDS)})(?P<suffix>-start|-done)?\((?P<rest>.*)$")
_ARRAY = re.compile(r"\b(pred|bf16|f8e\w+|[sufc]\d+)\[([0-9,]*)\]")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)")
_ITEMSIZE = {"pred": 1, "bf16": 2, "f16": 2, "f32": 4, "f64": 8, "s8": 1, "u8": 1, "s16": 2,
             "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8, "c64": 8, "c128": 16,
             "s4": 0.5, "u4": 0.5}


def _arrays(shape_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """``(dtype, dims)`` of every array in a (possibly tuple) HLO shape."""
    return [(dt, tuple(int(d) for d in dims.split(",") if d))
            for dt, dims in _ARRAY.findall(shape_text)]


def _nbytes(dtype: str, dims: tuple[int, ...]) -> int:
    size = _ITEMSIZE.get(dtype, 1 if dtype.startswith("f8") else 4)
    return int(math.prod(dims) * size)


def _element_names(op_name: str, n: int) -> list[str]:
    """One op_name per tuple element. XLA's combiners join their parts' names as
    ``prefix/(name1:name2:...)``; when the parts match the elements in number they are
    taken in order, otherwise every element gets the whole name."""
    for i in [m.start() for m in re.finditer(r"/\(", op_name)]:
        depth, parts, cur = 0, [], ""
        for j, ch in enumerate(op_name[i + 1:], start=i + 1):
            depth += (ch == "(") - (ch == ")")
            if depth == 0:
                break
            if ch == ":" and depth == 1:
                parts.append(cur)
                cur = ""
            elif j > i + 1:
                cur += ch
        if depth == 0 and j == len(op_name) - 1 and parts:
            parts.append(cur)
            if len(parts) == n:
                return [op_name[:i + 1] + part for part in parts]
            break
    return [op_name] * n


def _group_size(rest: str, num_devices: int) -> int:
    """Devices per replica group, from any of the textual forms XLA prints."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", rest)
    if m:
        sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
        return math.prod(sizes.get(a, 1) for a in re.findall(r"'([^']+)'", m.group(2)))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", rest)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=\{\{([^}]*)\}", rest)
    if m:
        return len(m.group(1).split(","))
    return num_devices  # replica_groups={} (everyone) or unknown


def _link_bytes(kind: str, nbytes: int, g: int) -> float:
    """Bytes one device sends for one collective on a ring of ``g`` devices."""
    if g <= 1:
        return 0.0
    return {"all-reduce": 2 * (g - 1) / g * nbytes, "all-gather": (g - 1) / g * nbytes,
            "all-to-all": (g - 1) / g * nbytes, "reduce-scatter": (g - 1) * nbytes,
            "collective-permute": float(nbytes)}[kind]


def parse_collectives(hlo: str, num_devices: int) -> list[dict]:
    """One record per collective instruction: kind, arrays, group size, op_name (one per
    tuple element), and how many times it runs per step: a computation reached through a
    while loop's body runs its known trip count times (None if XLA does not know it)."""
    comp_of_line, edges, entry = [], defaultdict(list), None
    comp = None
    for line in hlo.splitlines():
        if line and not line[0].isspace():
            m = _COMP.match(line)
            if m:
                comp = m.group("name")
                entry = comp if line.startswith("ENTRY") else entry
        comp_of_line.append(comp)
        if comp is None:
            continue
        body = re.search(r"\bbody=%?([\w.\-]+)", line) if " while(" in line else None
        trip = re.search(r"known_trip_count[^0-9]*(\d+)", line) if body else None
        for callee in _CALLS.findall(line):
            is_body = body is not None and callee == body.group(1)
            edges[callee].append((comp, (int(trip.group(1)) if trip else None) if is_body
                                  else 1, is_body))

    memo: dict[str, tuple] = {}
    def runs(c: str, depth: int = 0) -> tuple[float | None, bool]:
        """(executions per step, inside a loop) of computation ``c``."""
        if c == entry or c not in edges or depth > 64:
            return 1, False
        if c not in memo:
            total, loop = 0, False
            for caller, factor, is_body in edges[c]:
                n, in_loop = runs(caller, depth + 1)
                total = None if total is None or n is None or factor is None else total + n * factor
                loop = loop or in_loop or is_body
            memo[c] = (total, loop)
        return memo[c]

    starts, out = {}, []
    for line, comp in zip(hlo.splitlines(), comp_of_line):
        m = _INSTR.match(line)
        if not m:
            continue
        rest, suffix = m.group("rest"), m.group("suffix")
        g = _group_size(rest, num_devices)
        if suffix == "-start":  # counted at its -done, whose result is the output
            starts[m.group("name")] = g
            continue
        if suffix == "-done":
            src = re.match(r"\s*%?([\w.\-]+)", rest)
            g = starts.get(src.group(1), g) if src else g
        op_name = re.search(r'op_name="([^"]*)"', rest)
        op_name = op_name.group(1) if op_name else ""
        arrays = _arrays(m.group("shape"))
        out.append({"kind": m.group("op"), "arrays": arrays, "group": g, "op_name": op_name,
                    "names": _element_names(op_name, len(arrays)),
                    "in_loop": runs(comp)[1], "times": runs(comp)[0]})
    return out


def summarize_collectives(colls: list[dict], vocab_size: int, top: int = 6) -> dict:
    by_kind = {}
    by_dtype = defaultdict(int)
    shapes = defaultdict(lambda: [0, 0])
    vocab = defaultdict(int)
    unknown_trips = 0
    for c in colls:
        times = c["times"] if c["times"] is not None else 1
        unknown_trips += c["times"] is None
        k = by_kind.setdefault(c["kind"], {"count": 0, "tensors": 0, "bytes": 0,
                                           "link_bytes": 0.0})
        nbytes = sum(_nbytes(dt, dims) for dt, dims in c["arrays"])
        k["count"] += times
        k["tensors"] += times * len(c["arrays"])
        k["bytes"] += times * nbytes
        k["link_bytes"] += times * _link_bytes(c["kind"], nbytes, c["group"])
        for (dt, dims), name in zip(c["arrays"], c["names"]):
            b = _nbytes(dt, dims)
            by_dtype[dt] += times * b
            key = f"{c['kind']} {dt}[{','.join(map(str, dims))}] g={c['group']}"
            shapes[key][0] += times
            shapes[key][1] += times * b
            if vocab_size in dims:
                vocab[f"{key} ({_short(name)})" if name else key] += times
    for k in by_kind.values():
        k["link_bytes"] = int(k["link_bytes"])
    largest = sorted(shapes.items(), key=lambda kv: -kv[1][1])[:top]
    return {
        "by_kind": by_kind,
        "count": sum(k["count"] for k in by_kind.values()),
        "bytes": sum(k["bytes"] for k in by_kind.values()),
        "link_bytes": sum(k["link_bytes"] for k in by_kind.values()),
        "bytes_by_dtype": dict(by_dtype),
        "in_while_loops": sum(1 for c in colls if c["in_loop"]),
        "unknown_trip_counts": unknown_trips,
        "largest": [{"what": k, "count": n, "bytes": b} for k, (n, b) in largest],
        "vocab_sized": [{"what": k, "count": n} for k, n in sorted(vocab.items())],
    }


def _short(op_name: str, width: int = 110) -> str:
    s = re.sub(r"layers_\d+", "layers_N", op_name.replace("jit(_train_step)/", ""))
    return s if len(s) <= width else s[:width] + "..."


def activation_allreduces(colls: list[dict], cfg: ModelConfig, rows: int, src_len: int,
                          tgt_len: int, vocab_sharded: bool) -> dict:
    """All-reduced [rows, length, embed] activations, forward vs backward, against the
    attention/MLP block count and two models of what the backward should need."""
    fwd, bwd, instr = defaultdict(int), defaultdict(int), 0
    for c in colls:
        if c["kind"] != "all-reduce":
            continue
        times, hit = c["times"] or 1, False
        for (_, d), name in zip(c["arrays"], c["names"]):
            if not (len(d) == 3 and d[0] == rows and d[1] in (src_len, tgt_len)
                    and d[2] == cfg.emb_dim):
                continue
            hit = True
            where = re.search(r"(cross_attention|self_attention|attention|mlp|token_embed)",
                              name)
            where = where.group(1) if where else "other"
            # Autodiff's backward ops carry "transpose(" in their op_name.
            (bwd if "transpose(" in name else fwd)[where] += times
        instr += times * hit
    enc, dec = cfg.num_encoder_layers, cfg.num_decoder_layers
    n_wi = len(cfg.mlp_activations)
    blocks = 2 * enc + 3 * dec
    logits = 1 if vocab_sharded else 0
    return {
        "instructions": instr, "forward_tensors": sum(fwd.values()),
        "backward_tensors": sum(bwd.values()), "forward_by_module": dict(fwd),
        "backward_by_module": dict(bwd),
        "attention_mlp_blocks": blocks,
        "forward_expected_one_per_block": blocks,
        # What the backward needs, under three ways of computing the input gradients of the
        # column-parallel projections (plus, in each, the logits' input gradient):
        "backward_expected": {
            # each projection's all-reduced on its own: q, k, v and every MLP input matrix
            # (cross-attention's k/v go to the encoder output);
            "per_projection": enc * (3 + n_wi) + dec * (3 + 3 + n_wi) + logits,
            # projections of one input summed before one all-reduce: one per block, and one
            # per decoder layer for its cross-attention k/v into the encoder output;
            "per_input": blocks + dec + logits,
            # and those k/v gradients also summed over the decoder layers first.
            "minimum": blocks + 1 + logits,
        },
    }


# ---------------------------------------------------------------------------------------
# Memory.

def _shard_bytes(tree) -> int:
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def _full_bytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _attn_mlp_bytes(trainer: Trainer) -> tuple[int, int]:
    """(per-device, total) bytes of the parameters whose logical names include
    ``heads`` or ``mlp``: attention projections, MLP matrices (and the relative
    position tables, [buckets, heads], a few KiB)."""
    boxed = trainer.partitioner.eval_shape(lambda: trainer.model.init(
        jax.random.PRNGKey(0), trainer.model.dummy_batch(1, 8, 8)))
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
    names = dict(jax.tree_util.tree_flatten_with_path(nn.get_partition_spec(boxed),
                                                      is_leaf=is_spec)[0])
    shard = full = 0
    for path, x in jax.tree_util.tree_flatten_with_path(trainer.abstract_state.params)[0]:
        spec = names[path]
        if any(n in (axes.HEADS, axes.MLP) for n in tuple(spec)):
            shard += _shard_bytes([x])
            full += _full_bytes([x])
    return shard, full


def num_params(cfg: ModelConfig) -> int:
    model = EncoderDecoderModel(cfg)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(model.param_shapes()))


def measure(preset: str, model_cfg: ModelConfig, args, devices) -> dict:
    part = Partitioner(mesh_preset(preset), devices=devices)
    train_cfg = TrainConfig(batch_size=args.batch, optimizer="adamw",
                            num_microbatches=args.num_microbatches)
    trainer = Trainer(model_cfg, train_cfg, part, args.src_len, args.tgt_len)
    t0 = time.perf_counter()
    compiled = trainer.compile_step(args.src_len, args.tgt_len)
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    hlo = compiled.as_text()
    if args.dump_hlo:
        os.makedirs(args.dump_hlo, exist_ok=True)
        with open(os.path.join(args.dump_hlo, f"{preset}.hlo"), "w") as f:
            f.write(hlo)

    st = trainer.abstract_state
    param_bytes, opt_bytes = _shard_bytes(st.params), _shard_bytes(st.opt_state)
    # The arguments as compile_step passes them, flattened: which of them jit kept (it
    # drops inputs the step never reads) decides what argument_size_in_bytes counts.
    batch = {k: jax.ShapeDtypeStruct((args.batch, args.src_len if k.startswith("encoder")
                                      else args.tgt_len), jnp.int32,
                                     sharding=part.batch_sharding)
             for k in trainer.model.dummy_batch(1, 1, 1)}
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=part.replicated)
    flat = jax.tree_util.tree_flatten_with_path((st, batch, rng))[0]
    # jax keeps the kept-input indices privately; without them every input counts.
    kept = getattr(getattr(compiled, "_executable", None), "_kept_var_idx", None)
    kept = set(range(len(flat))) if kept is None else set(kept)
    split = defaultdict(int)
    pruned = []
    for i, (path, x) in enumerate(flat):
        where = ("rng" if path[0].idx == 2 else "batch" if path[0].idx == 1
                 else getattr(path[1], "name", "state"))
        if i in kept:
            split[where] += _shard_bytes([x])
        else:
            pruned.append("rng" if where == "rng" else ("batch" if where == "batch" else "state")
                          + jax.tree_util.keystr(path[1:]))
    other = sum(v for k, v in split.items() if k not in ("params", "opt_state", "batch"))
    accounted = split["params"] + split["opt_state"] + split["batch"] + other
    attn_mlp, total_attn_mlp = _attn_mlp_bytes(trainer)

    del compiled
    colls = parse_collectives(hlo, len(devices))
    row = {
        "mesh": dict(part.sizes), "shard_params": part.cfg.shard_params,
        "param_bytes": param_bytes, "opt_bytes": opt_bytes,
        "temp_bytes": int(mem.temp_size_in_bytes),
        "total_param_bytes": _full_bytes(st.params), "total_opt_bytes": _full_bytes(st.opt_state),
        "attn_mlp_param_bytes": attn_mlp, "total_attn_mlp_param_bytes": total_attn_mlp,
        "argument_bytes": int(mem.argument_size_in_bytes),
        "batch_bytes": split["batch"], "other_arg_bytes": other,
        "unused_inputs_dropped": pruned,
        "argument_accounted": accounted == int(mem.argument_size_in_bytes),
        # Non-zero on TPU, whose tiled layouts pad small minor dimensions.
        "argument_gap_bytes": int(mem.argument_size_in_bytes) - accounted,
        "output_bytes": int(mem.output_size_in_bytes), "alias_bytes": int(mem.alias_size_in_bytes),
        # On CPU peak_memory_in_bytes counts arguments only (stack notes).
        "peak_bytes": int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                          - mem.alias_size_in_bytes + mem.temp_size_in_bytes),
        "compile_s": round(compile_s, 1),
        "collectives": summarize_collectives(colls, model_cfg.vocab_size),
    }
    if part.sizes["tensor"] > 1:
        row["tp_allreduce"] = activation_allreduces(
            colls, model_cfg, math.prod(part.batch_sharding.shard_shape((args.batch, 1))),
            args.src_len, args.tgt_len, vocab_sharded=True)
    return row


def _modules(counts: dict) -> str:
    return " ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def _within(ratio: float, tol: float = 0.05) -> bool:
    return abs(ratio - 1.0) <= tol


def checks(res: dict, n: int) -> tuple[dict, dict]:
    out, values = {}, {}
    if "fsdp" in res:
        r = res["fsdp"]
        ratio = (r["param_bytes"] + r["opt_bytes"]) / ((r["total_param_bytes"]
                                                         + r["total_opt_bytes"]) / n)
        values["fsdp_param_opt_vs_ideal"] = round(ratio, 6)
        out["fsdp_param_opt_within_5pct"] = _within(ratio)
    if "zero1" in res:
        r = res["zero1"]
        ratio = r["opt_bytes"] / (r["total_opt_bytes"] / n)
        values["zero1_opt_vs_ideal"] = round(ratio, 6)
        values["zero1_param_vs_total"] = round(r["param_bytes"] / r["total_param_bytes"], 6)
        out["zero1_opt_within_5pct"] = _within(ratio)
        out["zero1_params_replicated"] = r["param_bytes"] == r["total_param_bytes"]
    if "tp" in res:
        r = res["tp"]
        ratio = r["attn_mlp_param_bytes"] / (r["total_attn_mlp_param_bytes"] / n)
        values["tp_attn_mlp_vs_ideal"] = round(ratio, 6)
        out["tp_attn_mlp_within_5pct"] = _within(ratio)
    out["argument_split_accounted"] = all(r["argument_accounted"] for r in res.values())
    return out, values


def main():
    args = build_parser().parse_args()
    wall0 = time.perf_counter()
    if args.target == "cpu":
        devices = jax.devices("cpu")[:args.devices]
        if len(devices) != args.devices:
            raise SystemExit(f"error: asked for {args.devices} devices, jax sees {len(devices)}")
    else:
        try:
            devices = topology_devices(args.target)
        except ValueError as e:
            raise SystemExit(f"error: --target {args.target}: {e}")
    n = len(devices)

    gin.clear_config()
    parse_gin([f"models/{args.model}.gin"], [])
    gin_cfg = ModelConfig()
    gin.clear_config()
    over = {k: v for k, v in (("num_heads", args.heads), ("head_dim", args.head_dim)) if v}
    model_cfg = dataclasses.replace(gin_cfg, **over)
    n_params, n_params_gin = num_params(model_cfg), num_params(gin_cfg)
    model_info = {
        "gin": args.model, "num_heads": model_cfg.num_heads, "head_dim": model_cfg.head_dim,
        "gin_num_heads": gin_cfg.num_heads, "gin_head_dim": gin_cfg.head_dim,
        "emb_dim": model_cfg.emb_dim, "mlp_dim": model_cfg.mlp_dim,
        "vocab_size": model_cfg.vocab_size,
        "layers": [model_cfg.num_encoder_layers, model_cfg.num_decoder_layers],
        "num_params": n_params, "gin_num_params": n_params_gin,
        "precision": model_cfg.precision, "scan_layers": model_cfg.scan_layers}

    presets = [p for p in args.presets.split(",") if p]
    res, failed = {}, {}
    for p in presets:
        try:
            res[p] = measure(p, model_cfg, args, devices)
        except (ValueError, jax.errors.JaxRuntimeError) as e:  # a split the mesh cannot make; OOM
            failed[p] = str(e).splitlines()[0][:300]
            print(f"{p}: does not compile: {failed[p]}", flush=True)
        else:
            print(f"{p}: compiled in {res[p]['compile_s']} s", file=sys.stderr, flush=True)

    dev = devices[0]
    print(f"\n{n} {getattr(dev, 'device_kind', dev.platform)} devices ({args.target}); model "
          f"{args.model} (gin_configs/models/{args.model}.gin) with num_heads="
          f"{model_cfg.num_heads}, head_dim={model_cfg.head_dim} (gin: {gin_cfg.num_heads}x"
          f"{gin_cfg.head_dim}) for every preset: {n_params / 1e6:.2f}M parameters (gin "
          f"model: {n_params_gin / 1e6:.2f}M), precision {model_cfg.precision}, "
          f"{'scanned' if model_cfg.scan_layers else 'unrolled'} layers, AdamW, batch "
          f"{args.batch} x ({args.src_len} + {args.tgt_len}) tokens. MiB per device.")
    hdr = (f"{'preset':<9}{'mesh r,d,f,t':>13}{'params':>9}{'opt':>9}{'temp':>9}{'peak':>9}"
           f"{'(p+o)/ideal':>12}{'coll MiB':>10}{'link MiB':>10}"
           f"{'p+o vs dp':>10}{'temp vs dp':>11}{'link vs dp':>11}")
    print(hdr)
    dp = res.get("dp")
    for p, r in res.items():
        po = r["param_bytes"] + r["opt_bytes"]
        ideal = (r["total_param_bytes"] + r["total_opt_bytes"]) / n
        c = r["collectives"]
        rel = ""
        if dp:
            dpo = dp["param_bytes"] + dp["opt_bytes"]
            link = (f"{c['link_bytes'] / dp['collectives']['link_bytes']:>10.2f}x"
                    if dp["collectives"]["link_bytes"] else f"{'-':>11}")
            rel = f"{po / dpo:>9.3f}x{r['temp_bytes'] / dp['temp_bytes']:>10.2f}x{link}"
        mesh = ",".join(str(s) for s in r["mesh"].values())
        print(f"{p:<9}{mesh:>13}{r['param_bytes'] / MiB:>9.1f}{r['opt_bytes'] / MiB:>9.1f}"
              f"{r['temp_bytes'] / MiB:>9.0f}{r['peak_bytes'] / MiB:>9.0f}{po / ideal:>12.3f}"
              f"{c['bytes'] / MiB:>10.0f}{c['link_bytes'] / MiB:>10.0f}{rel}")
    if res:
        r0 = next(iter(res.values()))
        print(f"unsharded totals: params {r0['total_param_bytes'] / MiB:.1f} MiB, optimizer "
              f"{r0['total_opt_bytes'] / MiB:.1f} MiB; ideal (p+o)/device = "
              f"{(r0['total_param_bytes'] + r0['total_opt_bytes']) / n / MiB:.1f} MiB")

    print("\nmemory_analysis() argument bytes = params + opt + step/rng + batch:")
    for p, r in res.items():
        print(f"  {p:<8} {r['argument_bytes']:>11} = {r['param_bytes']} + {r['opt_bytes']} + "
              f"{r['other_arg_bytes']} + {r['batch_bytes']}: "
              + ("exact" if r["argument_accounted"] else
                 f"XLA counts {r['argument_gap_bytes']} more (layout padding?)")
              + (f" (jit dropped unused {', '.join(r['unused_inputs_dropped'])})"
                 if r["unused_inputs_dropped"] else "") + "; attention+MLP weights "
              f"{r['attn_mlp_param_bytes'] / MiB:.1f} of {r['total_attn_mlp_param_bytes'] / MiB:.1f}"
              f" MiB ({r['attn_mlp_param_bytes'] / r['total_attn_mlp_param_bytes'] * n:.3f} x "
              f"total/{n})")

    print("\ncollectives per step (count / result MiB / ring link MiB per device):")
    for p, r in res.items():
        c = r["collectives"]
        kinds = "  ".join(f"{k} {v['count']}/{v['bytes'] / MiB:.0f}/{v['link_bytes'] / MiB:.0f}"
                          for k, v in sorted(c["by_kind"].items())) or "none"
        dts = ", ".join(f"{k} {v / MiB:.0f}" for k, v in sorted(c["bytes_by_dtype"].items()))
        print(f"  {p:<8} {kinds}  [by dtype MiB: {dts or '-'}]"
              + (f"  ({c['in_while_loops']} inside while loops)" if c["in_while_loops"] else ""))
        for big in c["largest"][:4]:
            print(f"           {big['count']:>4} x {big['what']}  ({big['bytes'] / MiB:.0f} MiB)")
        for v in c["vocab_sized"]:
            print(f"           vocab-sized: {v['count']} x {v['what']}")
        if "tp_allreduce" in r:
            t = r["tp_allreduce"]
            exp = t["backward_expected"]
            match = [k for k, v in exp.items() if v == t["backward_tensors"]]
            print(f"           activation all-reduces [rows, len, {model_cfg.emb_dim}]: "
                  f"{t['forward_tensors']} forward ({_modules(t['forward_by_module'])}; "
                  f"{t['attention_mlp_blocks']} attention/MLP blocks), "
                  f"{t['backward_tensors']} backward ({_modules(t['backward_by_module'])}; "
                  f"expected " + ", ".join(f"{k} {v}" for k, v in exp.items())
                  + f": matches {match[0] if match else 'none'}), in {t['instructions']} "
                  f"all-reduce instructions")

    chk, values = checks(res, n)
    print("\nchecks: " + ", ".join(f"{k}={v}" for k, v in chk.items()) + "  "
          + ", ".join(f"{k}={v}" for k, v in values.items()))
    wall = time.perf_counter() - wall0
    print(f"wall time {wall:.0f} s")
    if args.json:
        out = {"devices": n, "target": args.target, "model": model_info, "optimizer": "adamw",
               "batch": args.batch, "src_len": args.src_len, "tgt_len": args.tgt_len,
               "presets": res, "checks": chk, "check_values": values,
               "wall_s": round(wall, 1)}
        if dp:
            out["vs_dp"] = {p: {
                "param_opt": round((r["param_bytes"] + r["opt_bytes"])
                                   / (dp["param_bytes"] + dp["opt_bytes"]), 4),
                "temp": round(r["temp_bytes"] / dp["temp_bytes"], 4),
                "collective_bytes": round(r["collectives"]["bytes"]
                                          / max(dp["collectives"]["bytes"], 1), 4),
                "link_bytes": round(r["collectives"]["link_bytes"]
                                    / max(dp["collectives"]["link_bytes"], 1), 4)}
                for p, r in res.items()}
        if failed:
            out["failed"] = failed
        print(json.dumps(out))


if __name__ == "__main__":
    main()
