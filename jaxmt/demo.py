"""``make demo``: train demo.gin on the embedded corpus, evaluate, translate a few lines.

    python -m jaxmt.demo --model_dir=runs/demo [--max_examples=N] [--gin.TRAIN_STEPS=...]

Rerunning on the same directory resumes (or skips) training, then evaluates again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SAMPLES_PER_DIRECTION = 2


def sample_pairs(src: str, tgt: str, n: int = SAMPLES_PER_DIRECTION) -> list[tuple[str, str]]:
    """The first ``n`` short verses (5-12 words) of the test split: books never trained on."""
    from jaxmt.data.embedded import parallel_pairs
    pairs, _ = parallel_pairs(src, tgt, "test")
    return [p for p in pairs if 5 <= len(p[0].split()) <= 12][:n]


def main(argv=None) -> int:
    from jaxmt.hostmem import keep_freed_memory
    keep_freed_memory()  # as the jaxmt command does; see jaxmt/hostmem.py
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", default="runs/demo")
    p.add_argument("--gin_file", action="append", default=None)
    p.add_argument("--max_examples", type=int, default=200,
                   help="test verses per direction (evenly spaced); 0 = all")
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if a.startswith("--gin.")]
    args = p.parse_args([a for a in argv if not a.startswith("--gin.")])

    from jaxmt.gin_files import parse_gin

    parse_gin(args.gin_file or ["runs/demo.gin"], overrides)
    from jaxmt import config as cfglib
    from jaxmt.fileio import write_atomic
    from jaxmt.inference.evaluation import evaluate, format_table
    from jaxmt.inference.translator import Translator
    from jaxmt.train.run import train

    t0 = time.time()
    train(model_dir=args.model_dir)
    t_train = time.time() - t0
    print(f"\ntraining took {t_train / 60:.1f} min", flush=True)

    t1 = time.time()
    tr = Translator.from_pretrained(args.model_dir)
    data_cfg = cfglib.load(args.model_dir)["data"]
    result = evaluate(tr, data_cfg.directions, "test", args.max_examples or None,
                      progress=lambda d, r: print(f"  evaluated {d}", flush=True))
    print(f"\nTest split (books never seen in training), {args.max_examples or 'all'} verses "
          "per direction:\n")
    print(format_table(result))
    print(f"\nevaluation took {(time.time() - t1) / 60:.1f} min")
    margins = {d: r["chrf"] - r["copy_chrf"] for d, r in result["directions"].items()}
    worst = min(margins, key=margins.get)
    print(f"\nchrF over copying the source: {margins[worst]:+.1f} on the hardest direction "
          f"({worst}); every direction {'beats' if margins[worst] > 0 else 'does NOT beat'} "
          f"copying the source")

    print("\nSample translations (test verses; the reference in brackets):")
    for src, tgt in data_cfg.directions:
        pairs = sample_pairs(src, tgt)
        outs = tr.translate([p[0] for p in pairs], src_lang=src, tgt_lang=tgt)
        for (source, ref), out in zip(pairs, outs):
            print(f"  [{src}->{tgt}] {source}\n           => {out}\n           [{ref}]")
    write_atomic(os.path.join(args.model_dir, "demo_eval.json"), json.dumps(
        dict(result, train_seconds=round(t_train)), indent=2, ensure_ascii=False))
    tgt = data_cfg.langs[1] if data_cfg.langs[0] == "en" else data_cfg.langs[0]
    print(f"\ndone in {(time.time() - t0) / 60:.1f} min.\n"
          f"TensorBoard events (loss, learning rate, tokens/s): "
          f"{os.path.join(args.model_dir, 'train')}\n"
          f"  tensorboard --logdir {args.model_dir}   (pip install tensorboard)\n"
          f"Translate:\n"
          f"  echo 'Blessed are the meek.' | .venv/bin/jaxmt translate --model_dir={args.model_dir}"
          f" --src_lang=en --tgt_lang={tgt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
