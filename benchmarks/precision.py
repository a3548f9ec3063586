"""Precision policies: what each one costs in memory and buys in speed, in one run.

For every ``ModelConfig.precision`` (fp32, bf16 = bf16 compute over fp32 parameters
and optimizer state, bf16_params, fp16 = fp16 compute with dynamic loss scaling):

1. **Memory per chip**: the whole train step (AdamW, ``small`` model, batch 8 x (512
   + 512) tokens) compiled ahead of time for one chip of a TPU topology through
   libtpu (``pip install -e '.[tpu_aot]'``); ``state`` is the parameters plus
   optimizer state (the step's donated arguments), ``temp`` XLA's scratch for
   activations. No TPU is needed: nothing runs.
2. **Speed on this CPU**: train-step tokens/s (source + target positions) of the
   ``tiny`` model at batch 24 x (128 + 128), timed over ``--steps`` after warm-up.
   This CPU has native bf16 matmuls but no fast fp16 ones, so fp16 is only a
   correctness check here; on GPUs it is the fast path for pre-Ampere cards.

    python benchmarks/precision.py [--target v5p:2x2x1] [--steps 6] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # no TPU here: libtpu only compiles
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax

from jaxmt.gin_files import parse_gin
from jaxmt.config import PRECISIONS, MeshConfig, ModelConfig, TrainConfig
from jaxmt.sharding.partitioning import Partitioner, topology_devices
from jaxmt.train.trainer import Trainer


def gin_model(name: str) -> ModelConfig:
    import gin
    gin.clear_config()
    parse_gin([f"models/{name}.gin"], [])
    return ModelConfig()


def chip_memory(cfg: ModelConfig, target: str, batch: int, src: int, tgt: int) -> dict:
    try:
        chip = topology_devices(target)[0]
    except ValueError as e:
        raise SystemExit(f"error: --target {target}: {e}")
    trainer = Trainer(cfg, TrainConfig(batch_size=batch, optimizer="adamw"),
                      Partitioner(MeshConfig(data=1), devices=[chip]), src, tgt)
    mem = trainer.compile_step(src, tgt).memory_analysis()
    state = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(trainer.abstract_state))
    return {"state_bytes": int(state), "temp_bytes": int(mem.temp_size_in_bytes)}


def cpu_speed(cfg: ModelConfig, batch: int, length: int, steps: int) -> float:
    trainer = Trainer(cfg, TrainConfig(batch_size=batch, optimizer="adamw"),
                      Partitioner(MeshConfig(data=1), devices=jax.devices("cpu")[:1]),
                      length, length)
    state = trainer.init_state(0)
    host = trainer.model.random_batch(batch, length, length)
    step = trainer.step_fn()
    key = jax.random.PRNGKey(0)
    data = trainer.partitioner.shard_batch(host, batch)
    for _ in range(2):  # compile and warm up
        state, m = step(state, data, key)
    jax.block_until_ready(m["loss"])
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, data, key)
    jax.block_until_ready(m["loss"])
    return 2 * batch * length * steps / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="v5p:2x2x1")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    small, tiny = gin_model("small"), gin_model("tiny")
    res = {}
    for p in PRECISIONS:
        res[p] = chip_memory(dataclasses.replace(small, precision=p), a.target, 8, 512, 512)
        res[p]["cpu_tokens_per_s"] = round(cpu_speed(dataclasses.replace(tiny, precision=p),
                                                     24, 128, a.steps))
        print(p, res[p], flush=True)
    base = res["fp32"]
    print(f"\nper chip of {a.target}: small model, AdamW, batch 8 x (512 + 512); "
          f"CPU: tiny model, batch 24 x (128 + 128)")
    print(f"{'policy':<13}{'state MiB':>10}{'temp MiB':>10}{'CPU tok/s':>11}{'vs fp32':>9}")
    for p, r in res.items():
        print(f"{p:<13}{r['state_bytes'] / 2**20:>10.0f}{r['temp_bytes'] / 2**20:>10.0f}"
              f"{r['cpu_tokens_per_s']:>11,}{r['cpu_tokens_per_s'] / base['cpu_tokens_per_s']:>8.2f}x")
    if a.json:
        print(json.dumps({"target": a.target, "policies": res}))


if __name__ == "__main__":
    main()
