"""Greedy against beam search, and how often each loops, on a trained model directory.

    python benchmarks/decode_quality.py --model_dir=runs/demo [--max_examples=200] [--json]

For every direction the model was trained on, three decodings of the same inputs:

* ``greedy``: plain greedy decoding, no n-gram blocking, outputs up to 2 x source + 10
  tokens (what ``jaxmt translate`` did before DecodeConfig);
* ``greedy+guards``: greedy with the default guards (no 4-gram twice);
* ``default``: the model directory's DecodeConfig (beam 4, GNMT 0.6, the guards).

Two input sets: the test split (BLEU, chrF, the share of looping outputs) and long
inputs of 60 words or more (test verses of one book joined; chrF and looping share), the
output length (``len_ratio``: words over the references' words, test split),
plus, for directions out of English, technical prose written for this benchmark
(no reference: looping share only). "Loops" = an output repeating some word 4-gram
more than 3 times (:func:`jaxmt.inference.evaluation.loops`). The last line with
``--json`` is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# English technical prose, 60+ words per text, written for this benchmark (not from
# any corpus): the kind of input a new user tries first.
PROSE = [
    "When the compiler sees a loop whose trip count is known, it may unroll the body, "
    "schedule independent instructions side by side and keep the accumulators in "
    "registers, which is why a kernel that looks slower on paper can run faster in "
    "practice, and why measuring the generated code on the target machine, rather than "
    "counting operations in the source, is the only reliable way to compare two versions "
    "of the same routine.",
    "A distributed database replicates every write to several nodes before it "
    "acknowledges the client, so that the loss of one machine does not lose data, but the "
    "price is latency: each write waits for the slowest replica in its quorum, and under "
    "heavy load the tail of that distribution, not its average, decides how long users "
    "wait for the page to load and whether the service meets its agreed objectives.",
    "To install the package, create a fresh virtual environment, upgrade the installer, "
    "and then install the library together with its optional extras for testing and "
    "documentation; if the build fails because a compiler or a system header is missing, "
    "read the error message from the top rather than from the bottom, since the first "
    "error usually names the real cause while the later ones only follow from it.",
    "The battery management system measures the voltage and temperature of each cell many "
    "times per second, estimates the state of charge from those readings with a filter "
    "that models the chemistry of the cell, and disconnects the pack when any value "
    "leaves its safe range, because a single overheated cell can start a chain reaction "
    "that spreads through the whole module within minutes.",
]
SETTINGS = {
    "greedy": dict(strategy="greedy", no_repeat_ngram_size=0, max_len_a=2.0, max_len_b=10),
    "greedy+guards": dict(strategy="greedy"),
    "default": {},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_dir", required=True)
    ap.add_argument("--max_examples", type=int, default=200,
                    help="test verses per direction (evenly spaced)")
    ap.add_argument("--long_examples", type=int, default=40,
                    help="long inputs (60+ words) per direction")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    from jaxmt import config as cfglib
    from jaxmt.data.embedded import parallel_pairs
    from jaxmt.inference.evaluation import long_passages, loop_share, pick, score
    from jaxmt.inference.translator import Translator

    data_cfg = cfglib.load(a.model_dir)["data"]
    # Long inputs need room: sources up to 256 tokens, outputs up to 512.
    tr = Translator.from_pretrained(a.model_dir, max_src_len=256, max_decode_len=512)
    stored = tr.decode
    words = lambda s: len(s.split())
    res = {"decode": {k: {**dataclasses.asdict(stored), **v} for k, v in SETTINGS.items()},
           "directions": {}}
    for src, tgt in data_cfg.directions:
        test = parallel_pairs(src, tgt, "test")[0]
        test = [test[i] for i in pick(len(test), a.max_examples)]
        long, _ = long_passages(src, tgt, "test", words, min_tokens=60, max_tokens=120)
        long = [long[i] for i in pick(len(long), a.long_examples)]
        row = {}
        for name, over in SETTINGS.items():
            t0 = time.time()
            hyp = tr.translate([p[0] for p in test], src, tgt, **over)
            hyp_long = tr.translate([p[0] for p in long], src, tgt, **over)
            ref_words = sum(len(p[1].split()) for p in test)
            r = dict(score(hyp, [p[1] for p in test]), loop_pct=loop_share(hyp),
                     len_ratio=round(sum(len(h.split()) for h in hyp) / max(ref_words, 1), 2),
                     long_chrf=score(hyp_long, [p[1] for p in long])["chrf"],
                     long_loop_pct=loop_share(hyp_long), seconds=round(time.time() - t0, 1))
            if src == "en":
                r["prose_loop_pct"] = loop_share(tr.translate(PROSE, src, tgt, **over))
            row[name] = r
        row["n"], row["n_long"] = len(test), len(long)
        res["directions"][f"{src}-{tgt}"] = row
        print(f"{src}-{tgt}: " + "; ".join(
            f"{k} BLEU {v['bleu']:.1f} chrF {v['chrf']:.1f} loops {v['loop_pct']:.0f}%/"
            f"{v['long_loop_pct']:.0f}% (long)" for k, v in row.items() if isinstance(v, dict)),
            file=sys.stderr, flush=True)

    print(f"\n{a.model_dir}: {a.max_examples} test verses and {a.long_examples} long inputs "
          f"(60-120 words) per direction; loops = outputs repeating a 4-gram more than 3 "
          "times\n")
    head = "| direction | " + " | ".join(
        f"{k} BLEU | {k} chrF | {k} loops % | {k} long chrF | {k} long loops %"
        for k in SETTINGS) + " |"
    print(head)
    print("|---|" + "---:|" * (5 * len(SETTINGS)))
    for d, row in res["directions"].items():
        print(f"| {d} | " + " | ".join(
            f"{row[k]['bleu']:.1f} | {row[k]['chrf']:.1f} | {row[k]['loop_pct']:.1f} | "
            f"{row[k]['long_chrf']:.1f} | {row[k]['long_loop_pct']:.1f}" for k in SETTINGS)
            + " |")
    prose = {d: {k: row[k]["prose_loop_pct"] for k in SETTINGS}
             for d, row in res["directions"].items() if "prose_loop_pct" in row["default"]}
    print(f"\ntechnical prose ({len(PROSE)} texts, 60+ words), loops %: {json.dumps(prose)}")
    if a.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
