"""Rematerialisation: compiled temp memory and flops of one training gradient, per policy.

For each policy in ``ModelConfig.*_remat`` (applied to both stacks) this compiles
``value_and_grad`` of the training loss for the ``small`` model (gin_configs/models/
small.gin: d_model 512, 8+8 layers, 32k vocabulary) at batch 8 x (512 source + 512
target) tokens with an unrolled stack, so that ``cost_analysis()`` counts every layer
(a ``lax.scan`` body would be counted once). Nothing runs: the figures are XLA's
compiled ``temp_size_in_bytes`` (activations and other scratch, per device) and flops.
``none`` is the comparison, so the ratios are remat's cost and saving in one run.

The compile target is one chip of a TPU topology, compiled ahead of time on this
machine through libtpu (``pip install -e '.[tpu_aot]'``; default ``v5p:2x2x1``).
XLA's CPU backend is no use here: it strips the optimisation barriers that keep
rematerialised work from being merged back into the forward pass, so on CPU an
unrolled stack compiles to the same program under every policy (``--target cpu``
shows this; on CPU remat takes effect only with ``scan_layers``, which this script
reports with ``--target cpu --scan``, flops then counting one layer per stack).

    python benchmarks/remat_memory.py [--target v5p:2x2x1|cpu] [--scan] [--model small]
        [--batch 8] [--src_len 512] [--tgt_len 512] [--policies none,full,...] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # no TPU here: libtpu only compiles
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # don't fight other processes' lock

import jax

from jaxmt.gin_files import parse_gin
from jaxmt.config import REMAT_POLICIES, ModelConfig
from jaxmt.modeling.model import EncoderDecoderModel
from jaxmt.sharding.partitioning import topology_devices


def target_sharding(target: str) -> jax.sharding.Sharding:
    """One device of the target: a chip of a TPU topology, or this CPU."""
    if target == "cpu":
        return jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    try:
        return jax.sharding.SingleDeviceSharding(topology_devices(target)[0])
    except ValueError as e:
        raise SystemExit(f"error: --target {target}: {e}, or use --target cpu.")


def measure(cfg: ModelConfig, batch: int, src_len: int, tgt_len: int,
            sharding: jax.sharding.Sharding) -> dict:
    model = EncoderDecoderModel(cfg)
    put = lambda tree: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
    params = put(model.param_shapes())
    data = put(jax.eval_shape(lambda: model.dummy_batch(batch, src_len, tgt_len)))
    grad = jax.value_and_grad(lambda p, b: model.loss(p, b, dropout_rng=None)[0])
    t0 = time.perf_counter()
    compiled = jax.jit(grad).lower(params, data).compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"temp_bytes": int(mem.temp_size_in_bytes), "flops": float(cost["flops"]),
            "argument_bytes": int(mem.argument_size_in_bytes),
            "compile_s": round(time.perf_counter() - t0, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="v5p:2x2x1",
                    help="a TPU topology name (compiled for one of its chips) or cpu")
    ap.add_argument("--scan", action="store_true", help="scan_layers instead of unrolled")
    ap.add_argument("--model", default="small", help="a gin file under gin_configs/models")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--src_len", type=int, default=512)
    ap.add_argument("--tgt_len", type=int, default=512)
    ap.add_argument("--policies", default=",".join(REMAT_POLICIES))
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    parse_gin([f"models/{a.model}.gin"], [])
    base = dataclasses.replace(ModelConfig(), scan_layers=a.scan)
    sharding = target_sharding(a.target)
    device = next(iter(sharding.device_set))
    res = {}
    for policy in a.policies.split(","):
        cfg = dataclasses.replace(base, encoder_remat=policy, decoder_remat=policy)
        try:
            res[policy] = measure(cfg, a.batch, a.src_len, a.tgt_len, sharding)
        except Exception as e:  # e.g. offload on a target without host memory
            print(f"{policy}: does not compile for {a.target}: {str(e).splitlines()[0][:200]}")
    none = res.get("none")
    print(f"model {a.model}, batch {a.batch} x ({a.src_len} + {a.tgt_len}) tokens, "
          f"precision {base.precision}, {'scanned' if a.scan else 'unrolled'}, target "
          f"{a.target} ({getattr(device, 'device_kind', device.platform)})")
    print(f"{'policy':<20}{'temp MiB':>10}{'flops (T)':>11}{'temp vs none':>14}"
          f"{'flops vs none':>15}")
    for p, r in res.items():
        rel = (f"{none['temp_bytes'] / r['temp_bytes']:>13.2f}x{r['flops'] / none['flops']:>14.3f}x"
               if none else "")
        print(f"{p:<20}{r['temp_bytes'] / 2**20:>10.0f}{r['flops'] / 1e12:>11.3f}{rel}")
    if a.json:
        out = {"target": a.target, "scan_layers": a.scan, "model": a.model, "batch": a.batch, "src_len": a.src_len, "tgt_len": a.tgt_len,
               "precision": base.precision, "policies": res}
        if none:
            out["temp_reduction_vs_none"] = {p: round(none["temp_bytes"] / r["temp_bytes"], 3)
                                             for p, r in res.items()}
            out["flops_vs_none"] = {p: round(r["flops"] / none["flops"], 3) for p, r in res.items()}
        print(json.dumps(out))


if __name__ == "__main__":
    main()
