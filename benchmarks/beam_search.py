"""Beam search speed: the three ways its self-attention caches follow the beams, and beam
against greedy.

``shared`` (the default) moves nothing: a source's beams share one cache of a slot each
per position and read their ancestors' slots through a mask. The other two move the
cache rows after the surviving beams each step: ``gather`` with ``jnp.take`` on the
cache's batch axis, ``one_hot`` by a one-hot [rows, beams, beams] einsum, as T5X does (a
matmul is what a TPU does best). All run the same randomly
initialised model on the same batch in one run (set-up shared with
``benchmarks/decode_cache.py``). The search is held to the full length (``min_len`` = the
length), so every variant does the same number of steps.

    python benchmarks/beam_search.py [--model tiny|small] [--precision auto|fp32|bf16]
        [--batch 16] [--src_len 64] [--decode_len 64] [--beam 4] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json

import jax

from decode_cache import MODELS, random_setup, timed  # benchmarks/ is the script's folder
from jaxmt.config import DecodeConfig
from jaxmt.modeling.beam_search import beam_search


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", choices=sorted(MODELS))
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--src_len", type=int, default=64)
    ap.add_argument("--decode_len", type=int, default=64)
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    model, params, batch = random_setup(a.model, a.batch, a.src_len, a.precision)
    L = a.decode_len
    seconds = {}
    for how in ("shared", "gather", "one_hot"):
        opts = DecodeConfig(beam_size=a.beam, min_len=L, max_len_a=0.0, max_len_b=L,
                            no_repeat_ngram_size=0, suppressed_ids=(), cache_reorder=how)
        seconds[how] = timed(lambda o=opts: model.predict_batch(
            params, batch, decode_fn=beam_search, max_decode_len=L, options=o),
            repeats=a.repeats)
    seconds["greedy"] = timed(lambda: model.predict_batch(params, batch, max_decode_len=L),
                              repeats=a.repeats)
    tokens = a.batch * L  # output tokens (the best hypothesis) per call
    res = {f"{k}_tokens_per_s": round(tokens / v, 1) for k, v in seconds.items()}
    res.update({f"{k}_s": round(v, 4) for k, v in seconds.items()})
    res["shared_vs_gather"] = round(seconds["gather"] / seconds["shared"], 3)
    res["gather_vs_one_hot"] = round(seconds["one_hot"] / seconds["gather"], 3)
    res["beam_vs_greedy_time"] = round(seconds["shared"] / seconds["greedy"], 2)
    res.update(model=a.model, precision=model.cfg.resolved_precision, batch=a.batch, src_len=a.src_len, decode_len=L, beam=a.beam,
               platform=jax.devices()[0].platform, jax=jax.__version__)
    print(f"{a.model} model ({res['precision']}), batch {a.batch}, source {a.src_len}, {L} output tokens, "
          f"beam {a.beam}, {res['platform']}")
    for k in ("shared", "gather", "one_hot", "greedy"):
        print(f"  {k:<8}: {seconds[k] * 1e3:8.1f} ms  {res[f'{k}_tokens_per_s']:>9.1f} tokens/s")
    print(f"  shared is {res['shared_vs_gather']:.2f}x as fast as gather, gather "
          f"{res['gather_vs_one_hot']:.2f}x as fast as one_hot; beam {a.beam} (shared) takes "
          f"{res['beam_vs_greedy_time']:.2f}x greedy's time")
    if a.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
