"""How beam search's self-attention caches shard as they follow the beams: shared caches
(nothing moves), the gather and the one-hot einsum.

    python benchmarks/beam_sharding.py [--json]

Compiles one beam-4 decode (a random model: 2+2 layers, d64, 4 heads, batch 16, 16-token
sources, 32-token cache) on 8 fake CPU devices under several meshes, once per
``DecodeConfig.cache_reorder``, and counts the all-gathers XLA put into the compiled
program and the bytes they move per device (one step of the loop body is counted once,
as the HLO holds it once). All three must give the same ids. The last line with
``--json`` is one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1}
MESHES = {"data=8": dict(data=8), "data=4,tensor=2": dict(data=4, tensor=2),
          "data=2,fsdp=2,tensor=2": dict(data=2, fsdp=2, tensor=2)}


def all_gathers(hlo: str) -> tuple[int, int]:
    """(count, bytes per device) of the all-gather results in compiled HLO text."""
    n, size = 0, 0
    for line in hlo.splitlines():
        m = re.search(r"= (\(.*?\)|\w+\[[\d,]*\]\S*) all-gather(?:-start)?\(", line)
        if not m:
            continue
        n += 1
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
            count = 1
            for d in filter(None, dims.split(",")):
                count *= int(d)
            size += BYTES.get(dtype, 4) * count
    return n, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    import jax
    import numpy as np

    from jaxmt.config import DecodeConfig, MeshConfig, ModelConfig
    from jaxmt.inference.translator import make_partitioner, param_placement
    from jaxmt.modeling.model import EncoderDecoderModel

    cfg = ModelConfig(vocab_size=256, emb_dim=64, num_heads=4, head_dim=16, mlp_dim=128,
                      num_encoder_layers=2, num_decoder_layers=2, precision="fp32")
    model = EncoderDecoderModel(cfg)
    rng = np.random.default_rng(0)
    host_params = jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(s.dtype),
                               model.param_shapes())
    batch, src_len, cache_len = 16, 16, 32
    src = rng.integers(3, 250, (batch, src_len)).astype(np.int32)
    src[:, -1] = 1
    src[::3, 9:], src[::3, 8] = 0, 1  # some shorter rows

    def decode(params, tokens, options):
        return model.predict_batch_with_aux(params, {"encoder_input_tokens": tokens},
                                            decode=options, max_decode_len=cache_len,
                                            num_ids=250)

    res = {}
    for name, axes in MESHES.items():
        p = make_partitioner(MeshConfig(**axes))
        params = jax.device_put(host_params, jax.tree.map(lambda s: s.sharding,
                                                          param_placement(cfg, p)))
        tokens = jax.device_put(src, p.batch_sharding)
        fn = p.jit(decode, static_argnums=(2,))
        row, ids = {}, {}
        for how in ("shared", "gather", "one_hot"):
            options = DecodeConfig(beam_size=4, n_best=2, cache_reorder=how)
            compiled = fn.lower(params, tokens, options).compile()
            n, size = all_gathers(compiled.as_text())
            ids[how] = np.asarray(compiled(params, tokens)[0])
            row[how] = {"all_gathers": n, "kib": round(size / 1024)}
        row["same_ids"] = all(np.array_equal(ids["shared"], ids[h]) for h in ids)
        row["bytes_ratio_gather_vs_one_hot"] = round(
            row["gather"]["kib"] / max(row["one_hot"]["kib"], 1), 1)
        res[name] = row
        print(f"{name:24s} shared {row['shared']['all_gathers']:3d} all-gathers "
              f"{row['shared']['kib']:6,d} KiB | gather {row['gather']['all_gathers']:3d} "
              f"{row['gather']['kib']:6,d} KiB | one-hot {row['one_hot']['all_gathers']:3d} "
              f"{row['one_hot']['kib']:6,d} KiB | gather/one-hot bytes "
              f"{row['bytes_ratio_gather_vs_one_hot']}x | same ids: {row['same_ids']}",
              flush=True)
    if a.json:
        print(json.dumps(collections.OrderedDict(meshes=res)))


if __name__ == "__main__":
    main()
