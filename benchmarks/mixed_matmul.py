"""Train-step speed: jaxmt's mixed-precision einsum (hand-written backward) against the
same model with JAX's automatic backward, measured in one run.

jaxmt's `mixed_einsum` feeds every matmul, forward and backward, operands in the compute
dtype with float32 accumulation. With automatic differentiation the backward dots mix
float32 cotangents with bf16 operands, which XLA's CPU backend runs on its slow fp32 path.

    python benchmarks/mixed_matmul.py [--batch 24] [--length 128] [--dtype bfloat16] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxmt.modeling.layers as layers
from jaxmt.config import MeshConfig, ModelConfig, TrainConfig
from jaxmt.sharding.partitioning import Partitioner
from jaxmt.train.trainer import Trainer


def autodiff_einsum(eq, x, w):
    return jnp.einsum(eq, x, w, preferred_element_type=jnp.float32)


def measure(cfg: ModelConfig, batch: int, length: int, steps: int) -> float:
    """Seconds per train step (best of `steps` after one compile step)."""
    p = Partitioner(MeshConfig(), devices=jax.devices()[:1])
    tr = Trainer(cfg, TrainConfig(batch_size=batch, steps=1000), p, length, length)
    state = tr.init_state(0)
    rng = np.random.default_rng(0)
    toks = rng.integers(3, cfg.vocab_size, (batch, length)).astype(np.int32)
    ones = np.ones_like(toks)
    pos = np.tile(np.arange(length, dtype=np.int32), (batch, 1))
    b = p.shard_batch(dict(encoder_input_tokens=toks, encoder_segment_ids=ones,
                           encoder_positions=pos, decoder_input_tokens=toks,
                           decoder_target_tokens=toks, decoder_loss_weights=ones,
                           decoder_segment_ids=ones, decoder_positions=pos), batch)
    step = tr.step_fn()
    state, m = step(state, b, jax.random.PRNGKey(0))
    jax.block_until_ready(m)
    best = float("inf")
    for _ in range(steps):
        t = time.perf_counter()
        state, m = step(state, b, jax.random.PRNGKey(0))
        jax.block_until_ready(m)
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    cfg = ModelConfig(precision="bf16" if a.dtype == "bfloat16" else "fp32")  # tiny demo model
    ours = measure(cfg, a.batch, a.length, a.steps)
    custom = layers._einsum_f32acc
    layers._einsum_f32acc = autodiff_einsum  # same model, JAX's own backward
    try:
        auto = measure(cfg, a.batch, a.length, a.steps)
    finally:
        layers._einsum_f32acc = custom
    tokens = 2 * a.batch * a.length  # source + target positions per step
    res = {"dtype": a.dtype, "batch": a.batch, "length": a.length,
           "jaxmt_tokens_per_s": round(tokens / ours), "autodiff_tokens_per_s": round(tokens / auto),
           "ratio_vs_autodiff": round(auto / ours, 2)}
    print(f"tiny model, {a.dtype}, batch {a.batch} x ({a.length} + {a.length}) tokens, "
          f"{jax.devices()[0].platform}")
    print(f"  jaxmt mixed_einsum : {ours * 1e3:7.0f} ms/step  {res['jaxmt_tokens_per_s']:>7} tokens/s")
    print(f"  autodiff backward  : {auto * 1e3:7.0f} ms/step  {res['autodiff_tokens_per_s']:>7} tokens/s")
    print(f"  speed-up           : {res['ratio_vs_autodiff']:.2f}x")
    if a.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
