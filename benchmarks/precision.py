"""Precision policies: what each costs in memory, and that "auto" picks the faster one.

1. **Memory per chip**, for every concrete ``ModelConfig.precision`` (fp32, bf16 = bf16
   compute over fp32 parameters and optimizer state, bf16_params, fp16 = fp16 compute
   with dynamic loss scaling): the whole train step (AdamW, ``small`` model, batch 8 x
   (512 + 512) tokens) compiled ahead of time for one chip of a TPU topology through
   libtpu (``pip install -e '.[tpu_aot]'``); ``state`` is the parameters plus optimizer
   state, ``temp`` XLA's scratch for activations. No TPU is needed: nothing runs. The
   line above the table says what "auto" picks for that chip.
2. **"auto" on this CPU, per instruction set**: train-step tokens/s (source + target
   positions) of the ``tiny`` model at batch 24 x (128 + 128) under fp32, bf16 and
   auto, each measured in its own subprocess per ``--isa``: ``native`` (XLA uses
   everything the CPU has) and ``avx2`` (``jaxmt.hardware.AVX2_XLA_FLAGS``: XLA's code
   capped at AVX2 and its YNNPACK matmuls off, as on an AVX2-only CPU; "auto" picks
   fp32). The policies take turns for ``--rounds`` rounds of ``--steps``
   steps after warm-up; each keeps its best round, so another process's burst costs a
   round, not the result. ``auto / best`` is auto's tokens/s over the faster of fp32 and
   bf16: about 1.00 when auto picked the faster one (it then compiles the very same
   program); the line says so when it did not.

   Why both flags, measured with jaxlib 0.10.2 on an AVX-512 bf16 EPYC: the cap alone
   holds XLA's generated code to AVX2, but its matmuls go through YNNPACK, which reads
   the CPU itself, so bf16 stays native (about 1.7x fp32) and "auto" rightly keeps bf16
   there. With YNNPACK off too, bf16 is emulated and slower than fp32, as on a CPU
   without AVX512_BF16.

    python benchmarks/precision.py [--isa native|avx2|both] [--target v5p:2x2x1]
                                   [--steps 2] [--rounds 3] [--skip_memory] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # no TPU here: libtpu only compiles
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax

from jaxmt import hardware
from jaxmt.config import PRECISIONS, MeshConfig, ModelConfig, TrainConfig
from jaxmt.gin_files import parse_gin
from jaxmt.sharding.partitioning import Partitioner, topology_devices
from jaxmt.train.trainer import Trainer

BATCH, LENGTH = 24, 128  # the CPU measurement's batch: 24 x (128 + 128) tokens
SPEED_POLICIES = ("fp32", "bf16", "auto")
# --isa -> the --xla_cpu_max_isa it sets (None: none, the CPU's own).
ISAS = {"native": None, "avx2": hardware.AVX2_XLA_FLAGS}


def gin_model(name: str) -> ModelConfig:
    import gin
    gin.clear_config()
    parse_gin([f"models/{name}.gin"], [])
    return ModelConfig()


def chip_memory(cfg: ModelConfig, chip, batch: int, src: int, tgt: int) -> dict:
    trainer = Trainer(cfg, TrainConfig(batch_size=batch, optimizer="adamw"),
                      Partitioner(MeshConfig(data=1), devices=[chip]), src, tgt)
    mem = trainer.compile_step(src, tgt).memory_analysis()
    state = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(trainer.abstract_state))
    return {"state_bytes": int(state), "temp_bytes": int(mem.temp_size_in_bytes)}


def speed_worker(steps: int, rounds: int) -> dict:
    """In this process (its XLA_FLAGS set by the parent): tokens/s of each policy."""
    tiny = gin_model("tiny")
    device = jax.devices("cpu")[:1]
    runs = {}
    for p in SPEED_POLICIES:  # compile and warm up all first, then take turns
        trainer = Trainer(dataclasses.replace(tiny, precision=p),
                          TrainConfig(batch_size=BATCH, optimizer="adamw"),
                          Partitioner(MeshConfig(data=1), devices=device), LENGTH, LENGTH)
        state = trainer.init_state(0)
        data = trainer.partitioner.shard_batch(
            trainer.model.random_batch(BATCH, LENGTH, LENGTH), BATCH)
        step = trainer.step_fn()
        for _ in range(2):
            state, m = step(state, data, jax.random.PRNGKey(0))
        jax.block_until_ready(m["loss"])
        runs[p] = [step, state, data]
    best = dict.fromkeys(SPEED_POLICIES, 0.0)
    for _ in range(rounds):
        for p, run in runs.items():
            step, state, data = run
            t0 = time.perf_counter()
            for _ in range(steps):
                state, m = step(state, data, jax.random.PRNGKey(0))
            jax.block_until_ready(m["loss"])
            run[1] = state
            best[p] = max(best[p], 2 * BATCH * LENGTH * steps / (time.perf_counter() - t0))
    auto = hardware.auto_precision()
    faster = max(("fp32", "bf16"), key=best.get)
    return {"auto": auto.policy, "reason": auto.reason, "faster": faster,
            "tokens_per_s": {p: round(v) for p, v in best.items()},
            "auto_vs_best": round(best["auto"] / best[faster], 3)}


def run_isa(isa: str, steps: int, rounds: int) -> dict:
    """:func:`speed_worker` in a fresh interpreter whose XLA is capped per ``ISAS``."""
    flags = re.sub(r"(?:^|\s)--?xla_cpu_(max_isa|experimental_ynn_fusion_type)=\S*", "",
                   os.environ.get("XLA_FLAGS", ""))
    if ISAS[isa]:
        flags += " " + ISAS[isa]
    env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--speed_worker",
                           "--steps", str(steps), "--rounds", str(rounds)],
                          env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"error: --isa {isa}: the speed run failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]), xla_flags=flags.strip())


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--isa", choices=("native", "avx2", "both"), default="both")
    ap.add_argument("--target", default="v5p:2x2x1")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip_memory", action="store_true", help="no TPU memory table")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--speed_worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.steps < 1 or a.rounds < 1:
        raise SystemExit("error: --steps and --rounds must be >= 1")
    if a.speed_worker:
        print(json.dumps(speed_worker(a.steps, a.rounds)))
        return

    out = {"target": a.target, "cpu_batch": [BATCH, LENGTH, LENGTH], "steps": a.steps,
           "rounds": a.rounds}
    if not a.skip_memory:
        try:
            chip = topology_devices(a.target)[0]
        except ValueError as e:
            raise SystemExit(f"error: --target {a.target}: {e} (or pass --skip_memory)")
        small = gin_model("small")
        mem = {p: chip_memory(dataclasses.replace(small, precision=p), chip, 8, 512, 512)
               for p in PRECISIONS}
        on_chip = hardware.device_precision(chip)
        out.update(auto_on_target=on_chip.policy, auto_on_target_reason=on_chip.reason,
                   policies=mem)
        print(f"per chip of {a.target}: small model, AdamW, batch 8 x (512 + 512); "
              f"auto picks {on_chip}")
        print(f"{'policy':<13}{'state MiB':>10}{'temp MiB':>10}")
        for p, r in mem.items():
            print(f"{p:<13}{r['state_bytes'] / 2**20:>10.0f}{r['temp_bytes'] / 2**20:>10.0f}")
        print(flush=True)

    isas = list(ISAS) if a.isa == "both" else [a.isa]
    out["cpu"] = {isa: run_isa(isa, a.steps, a.rounds) for isa in isas}
    print(f"this CPU: tiny model, AdamW, batch {BATCH} x ({LENGTH} + {LENGTH}); tokens/s, "
          f"best of {a.rounds} rounds x {a.steps} steps, each ISA in its own process")
    print(f"{'ISA':<8}{'fp32':>8}{'bf16':>8}{'auto':>8}{'auto / best':>13}  auto picks")
    for isa, r in out["cpu"].items():
        t = r["tokens_per_s"]
        note = "" if r["auto"] == r["faster"] else f"; {r['faster']} is faster here"
        print(f"{isa:<8}{t['fp32']:>8,}{t['bf16']:>8,}{t['auto']:>8,}{r['auto_vs_best']:>12.2f}x"
              f"  {r['auto']} ({r['reason']}){note}")
    if a.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
