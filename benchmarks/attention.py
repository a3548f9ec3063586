"""Attention memory and speed: every implementation on encoder self-attention, fwd+bwd.

For each implementation and source length (batch 1, 8 heads, head_dim 64 by default),
with and without the T5 relative position bias, this compiles ``value_and_grad`` of the
attention core (gradients for q, k, v and the bias table) through ``jaxmt.modeling.attention.attend``,
the function the model calls, and reports XLA's compiled temp bytes
(``memory_analysis()``, per device) and the best wall time of a few runs. ``xla`` is
the reference; the summary prints each implementation's temp memory as a fraction of
it, and how each grows from the shortest to the longest length (2x length: linear
memory doubles, quadratic memory quadruples).

``flash`` is the Pallas kernel on GPU/TPU; on CPU it is the blockwise kernel, so the
CPU run lists ``blockwise`` only (Pallas runs on CPU only in interpret mode, which
measures nothing). On a GPU, ``flash`` and ``dot_product`` also get TFLOP/s from the
standard attention flop count (forward 4*b*h*L^2*d, backward 2.5x that). ``dot_product``
asks for cuDNN only on CUDA GPUs and only for float16/bfloat16 (and head dims cuDNN
takes): pass ``--dtype bfloat16`` to measure cuDNN; each ``dot_product`` row records the
``implementation`` it asked for. ``flash`` uses the kernel's default tiles (64x64 on
GPU, 512x512 on TPU).

``--model small`` adds what the switch buys a whole model: the compiled temp memory of the
gradient of the ``gin_configs/models/small.gin`` model (T5.1.1-small shape, bf16, scanned
layers) for one example of each source length and 128 target tokens, with the encoder's
attention set to each of ``--model_impls`` (compile only; the decoder and cross-attention
stay ``xla``).

    python benchmarks/attention.py [--lengths 1024 2048 4096 8192] [--impls ...]
        [--heads 8] [--head_dim 64] [--repeats 2] [--dtype float32]
        [--model small] [--model_impls xla blockwise local] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxmt.modeling.attention import Masking, attend
from jaxmt.config import AttentionConfig
from jaxmt.kernels.common import RelPos
from jaxmt.kernels.dot_product import dot_product_implementation, platform

CPU_IMPLS = ("xla", "dot_product", "blockwise", "local", "bigbird", "performer")
ACCEL_IMPLS = ("xla", "dot_product", "flash", "blockwise", "local", "bigbird", "performer")
BUCKETS, MAX_DISTANCE = 32, 128  # the tiny model's relative position settings


def step_fn(impl: str, relative_bias: bool, options: AttentionConfig):
    """value_and_grad of sum(attention * cotangent) w.r.t. q, k, v and the bias table."""
    relpos = RelPos(BUCKETS, MAX_DISTANCE, bidirectional=True) if relative_bias else None

    def loss(q, k, v, table, seg, cot):
        m = Masking(seg, seg, table if relative_bias else None, impl=impl, relpos=relpos,
                    options=options)
        out = attend(q, k, v, m)  # [b, l, h, d]
        return jnp.sum(out.astype(jnp.float32) * cot)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))


def measure(impl, length, relative_bias, heads, head_dim, dtype, repeats, options):
    rng = np.random.default_rng(0)
    shape = (1, length, heads, head_dim)
    q, k, v, cot = (jnp.asarray(rng.normal(size=shape) * 0.5, dtype) for _ in range(4))
    table = jnp.asarray(rng.normal(size=(BUCKETS, heads)), jnp.float32)
    seg = jnp.ones((1, length), jnp.int32)
    args = (q, k, v, table, seg, cot)
    fn = step_fn(impl, relative_bias, options)
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    temp = compiled.memory_analysis().temp_size_in_bytes
    row = {"impl": impl, "length": length, "relative_bias": relative_bias,
           "temp_bytes": int(temp), "compile_seconds": round(compile_s, 2)}
    jax.block_until_ready(compiled(*args))  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - t)
    row["seconds"] = round(best, 4)
    if impl == "dot_product":  # what attend asked jax.nn.dot_product_attention for
        row["implementation"] = dot_product_implementation(
            platform()[0], dtype, head_dim, length, length, True, platform()[1])[0]
    if jax.default_backend() == "gpu" and impl in ("flash", "dot_product", "xla"):
        flops = 4 * heads * length * length * head_dim * 3.5  # fwd + 2.5x fwd for bwd
        row["tflops"] = round(flops / best / 1e12, 2)
    return row


def model_rows(model: str, lengths, impls) -> list[dict]:
    """Compiled temp bytes of the whole model's loss gradient, per encoder implementation."""
    import dataclasses


    from jaxmt.gin_files import parse_gin
    from jaxmt.config import ModelConfig
    from jaxmt.modeling.model import EncoderDecoderModel

    parse_gin([f"models/{model}.gin"], [])
    base = dataclasses.replace(ModelConfig(), scan_layers=True)
    rows = []
    for length in lengths:
        for impl in impls:
            m = EncoderDecoderModel(dataclasses.replace(base, attention=AttentionConfig(
                encoder=impl)))
            params = m.param_shapes()
            batch = jax.eval_shape(lambda: m.dummy_batch(1, length, 128))
            grad = jax.jit(jax.grad(lambda p, b: m.loss(p, b, dropout_rng=None)[0]))
            temp = grad.lower(params, batch).compile().memory_analysis().temp_size_in_bytes
            rows.append({"model": model, "encoder": impl, "src_len": length, "tgt_len": 128,
                         "temp_bytes": int(temp)})
            print(f"  {model} model gradient, source {length:>5}, encoder {impl:<10} "
                  f"{temp / 2**20:>9.1f} MiB temp", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--impls", nargs="+", default=None,
                    help=f"default: {CPU_IMPLS} on CPU, {ACCEL_IMPLS} on GPU/TPU")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head_dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--model", default=None, choices=["tiny", "small", "base"])
    ap.add_argument("--model_impls", nargs="+", default=["xla", "blockwise", "local"])
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    impls = a.impls or (CPU_IMPLS if jax.default_backend() == "cpu" else ACCEL_IMPLS)
    options = AttentionConfig()  # defaults: per-backend tiles, window 128, 64-token BigBird blocks
    dtype = jnp.dtype(a.dtype)
    print(f"encoder self-attention fwd+bwd, batch 1, {a.heads} heads, head_dim {a.head_dim}, "
          f"{a.dtype}, on {jax.devices()[0].device_kind}")
    print(f"{'impl':<12}{'length':>7}{'relpos':>7}{'temp MiB':>11}{'seconds':>9}")
    results = []
    for relative_bias in (True, False):
        for impl in impls:
            for length in a.lengths:
                row = measure(impl, length, relative_bias, a.heads, a.head_dim, dtype,
                              a.repeats, options)
                results.append(row)
                extra = f"{row['tflops']:>8} TFLOP/s" if "tflops" in row else ""
                print(f"{impl:<12}{length:>7}{str(relative_bias):>7}"
                      f"{row['temp_bytes'] / 2**20:>11.1f}{row['seconds']:>9.3f}{extra}",
                      flush=True)
    print("\ntemp memory vs xla (same length and bias), and growth from the shortest to the "
          "longest length:")
    by = {(r["impl"], r["length"], r["relative_bias"]): r for r in results}
    lo, hi = min(a.lengths), max(a.lengths)
    for relative_bias in (True, False):
        for impl in impls:
            ratios = []
            for length in a.lengths:
                ref, row = by.get(("xla", length, relative_bias)), by[(impl, length, relative_bias)]
                if ref:
                    ratios.append(f"{length}: {ref['temp_bytes'] / max(row['temp_bytes'], 1):.1f}x less")
            growth = by[(impl, hi, relative_bias)]["temp_bytes"] / max(
                by[(impl, lo, relative_bias)]["temp_bytes"], 1)
            print(f"  {impl:<12} relpos={str(relative_bias):<5} {', '.join(ratios)}; "
                  f"{lo}->{hi} ({hi // lo}x length): {growth:.1f}x memory")
    out = {"results": results}
    if a.model:
        print("\nwhole-model gradient, batch 1 x (source + 128 target tokens):")
        out["model_results"] = model_rows(a.model, a.lengths, a.model_impls)
        by = {(r["encoder"], r["src_len"]): r["temp_bytes"] for r in out["model_results"]}
        for length in a.lengths:
            ref = by.get(("xla", length))
            if ref:
                print(f"  source {length}: " + ", ".join(
                    f"{i} {ref / by[(i, length)]:.1f}x less" for i in a.model_impls if i != "xla"))
    if a.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
