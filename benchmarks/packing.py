"""The packer on its own: jaxmt's best-fit packer against seqio's packing, in one run.

Both pack the same random examples (lengths uniform in 1..--max_len on each side)
into rows of --seq_len + --seq_len tokens, batched --batch rows at a time:

* jaxmt: ``jaxmt.data.packing.packed_batches`` (numpy, best fit over open rows);
* seqio: ``seqio.EncDecFeatureConverter(pack=True)`` over a ``tf.data`` dataset of the
  same examples, fed from a Python generator (greedy packing), batched the same way.

Each is timed on a second pass over the examples, after a warm-up (tf.data builds and
traces its functions on the first). Printed: examples/s and the share of non-padding
tokens (fill) for each, and the ratios.

    python benchmarks/packing.py [--examples 3000] [--seq_len 128] [--max_len 60] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from jaxmt.data import packing  # noqa: E402


def random_examples(n: int, max_len: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Ids in 2..499 ending in EOS (1), lengths uniform in 1..max_len per side."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        src = rng.integers(2, 500, rng.integers(1, max_len + 1)).astype(np.int32)
        tgt = rng.integers(2, 500, rng.integers(1, max_len + 1)).astype(np.int32)
        src[-1] = tgt[-1] = 1
        out.append((src, tgt))
    return out


def fill_of(batches: list[dict]) -> float:
    """Non-padding share over source and target slots together."""
    used = sum(int(np.count_nonzero(b[k])) for b in batches
               for k in ("encoder_segment_ids", "decoder_segment_ids"))
    slots = sum(b[k].size for b in batches for k in ("encoder_segment_ids", "decoder_segment_ids"))
    return used / max(slots, 1)


def run_jaxmt(exs, seq_len: int, batch: int) -> tuple[float, float]:
    t = time.perf_counter()
    batches = list(packing.packed_batches(exs, seq_len, seq_len, batch))
    return len(exs) / (time.perf_counter() - t), fill_of(batches)


def run_seqio(exs, seq_len: int, batch: int) -> tuple[float, float]:
    import seqio
    import tensorflow as tf

    ds = tf.data.Dataset.from_generator(
        lambda: ({"inputs": a, "targets": b} for a, b in exs),
        output_signature={"inputs": tf.TensorSpec([None], tf.int32),
                          "targets": tf.TensorSpec([None], tf.int32)})
    conv = seqio.EncDecFeatureConverter(pack=True)(ds, {"inputs": seq_len, "targets": seq_len})
    conv = conv.batch(batch, drop_remainder=True)
    list(conv.as_numpy_iterator())  # warm-up: tf.data builds and traces its functions once
    t = time.perf_counter()
    batches = list(conv.as_numpy_iterator())  # the second pass: steady state
    return len(exs) / (time.perf_counter() - t), fill_of(batches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=3000)
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--max_len", type=int, default=60)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--json", action="store_true", help="last line is one JSON object")
    a = ap.parse_args()
    exs = random_examples(a.examples, a.max_len, seed=1)
    run_jaxmt(exs[:200], a.seq_len, a.batch)  # warm-up
    ours, ours_fill = run_jaxmt(exs, a.seq_len, a.batch)
    theirs, theirs_fill = run_seqio(exs, a.seq_len, a.batch)
    res = {"examples": a.examples, "seq_len": a.seq_len, "max_len": a.max_len,
           "jaxmt_examples_per_s": round(ours), "seqio_examples_per_s": round(theirs),
           "speed_ratio": round(ours / theirs, 2), "jaxmt_fill": round(ours_fill, 3),
           "seqio_fill": round(theirs_fill, 3)}
    print(f"{a.examples} examples, rows of {a.seq_len} + {a.seq_len}, lengths 1..{a.max_len}")
    print(f"  jaxmt best-fit: {ours:>10,.0f} examples/s, fill {ours_fill:.3f}")
    print(f"  seqio packing : {theirs:>10,.0f} examples/s, fill {theirs_fill:.3f}")
    print(f"  jaxmt / seqio : {ours / theirs:.2f}x the speed, {ours_fill / theirs_fill:.2f}x the fill")
    if a.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
