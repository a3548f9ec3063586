"""Compile time of the training gradient: scanned layer stack against unrolled layers.

An unrolled stack hands XLA one copy of the layer per layer, so compile time grows
with depth; ``ModelConfig.scan_layers`` compiles one layer body inside a loop, so it
stays nearly flat. Both are compiled here, in one run, at each depth (layers per
stack), for the ``small`` width (gin_configs/models/small.gin) at batch 8 x (128 +
128) tokens on this machine's CPU, and the ratio is printed.

    python benchmarks/compile_time.py [--depths 12,24] [--model small] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

from jaxmt.gin_files import parse_gin
from jaxmt.config import ModelConfig
from jaxmt.modeling.model import EncoderDecoderModel


def compile_seconds(cfg: ModelConfig, batch: int, length: int) -> float:
    model = EncoderDecoderModel(cfg)
    params = model.param_shapes()
    data = jax.eval_shape(lambda: model.dummy_batch(batch, length, length))
    grad = jax.value_and_grad(lambda p, b: model.loss(p, b, dropout_rng=None)[0])
    t0 = time.perf_counter()
    jax.jit(grad).lower(params, data).compile()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", default="12,24", help="layers per stack")
    ap.add_argument("--model", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    parse_gin([f"models/{a.model}.gin"], [])
    base = ModelConfig()
    rows = {}
    print(f"{'layers/stack':>12}{'unrolled s':>12}{'scanned s':>11}{'unrolled/scanned':>18}")
    for depth in (int(d) for d in a.depths.split(",")):
        cfg = dataclasses.replace(base, num_encoder_layers=depth, num_decoder_layers=depth)
        unrolled = compile_seconds(cfg, a.batch, a.length)
        scanned = compile_seconds(dataclasses.replace(cfg, scan_layers=True), a.batch, a.length)
        rows[str(depth)] = {"unrolled_s": round(unrolled, 2), "scanned_s": round(scanned, 2),
                            "ratio": round(unrolled / scanned, 2)}
        print(f"{depth:>12}{unrolled:>12.1f}{scanned:>11.1f}{unrolled / scanned:>17.1f}x")
    if a.json:
        print(json.dumps({"model": a.model, "batch": a.batch, "length": a.length,
                          "compile_seconds": rows}))


if __name__ == "__main__":
    main()
