"""Small and fast: distillation, int8 and pruning, each measured on quality, size and speed.

Every row is measured here, in one process, on the same held-out books (the test split,
``--max_examples`` verses per direction, greedy) and the same decode-speed set:

* ``teacher``: ``--model_dir`` as it is;
* ``int8`` / ``w8a8``: ``jaxmt quantize --mode int8|w8a8`` of it (no retraining);
* ``unstructured50``: it fine-tuned ``--prune_steps`` steps with gradual magnitude pruning
  to 50% zeros in every projection matrix (``PruneConfig``);
* ``structured30``: ``jaxmt prune --structured 0.3`` of it (30% of the heads and MLP units
  removed, the model rebuilt smaller), then fine-tuned ``--prune_steps`` steps;
* with ``--teacher`` (usually the same directory) and a budget (``--student_steps``),
  three students of ``--student_gin`` trained for the same steps: ``student_scratch`` on
  the references, ``student_seq_kd`` on the teacher's beam outputs (``jaxmt distill
  translate``, Kim & Rush 2016) and ``student_tok_kd`` against the teacher's
  distributions in the step (``DistillConfig``).

Columns: parameters; bytes of the checkpoint's parameters on disk; decode speed on the
CPU (generated tokens/s, greedy and beam 4, best of ``--speed_repeats`` after a warm-up, on
the first ``--speed_sentences`` test verses of the first direction, every output held to
``--speed_length`` tokens so all rows decode the same steps); BLEU and chrF per direction.

    python benchmarks/compression.py --model_dir runs/teacher --teacher runs/teacher \\
        --out runs/compress --json

Variants already built in ``--out`` are reused (a rerun only measures); ``--model_dir``
and ``--teacher`` are only read. The last line (``--json``) holds the ratios the README
quotes: ``{"int8": {"bytes_ratio", "bleu_delta", "speedup"}, "w8a8": {...},
"seq_kd": {"bleu_gain_vs_scratch"}, "structured": {"speedup", "bleu_delta"}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def jaxmt(*args: str, quiet: bool = False) -> None:
    """Runs one ``jaxmt`` command in a fresh process (its own gin state and memory)."""
    cmd = [sys.executable, "-m", "jaxmt.cli", *args]
    print("$ jaxmt " + " ".join(args), file=sys.stderr, flush=True)
    out = subprocess.DEVNULL if quiet else sys.stderr
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=out, stderr=out)


def params_bytes_on_disk(model_dir: str) -> int:
    """Bytes of the newest checkpoint's parameters on disk (what shipping the model
    costs; a training checkpoint's optimizer state is not counted)."""
    ckpt = os.path.join(model_dir, "checkpoints")
    steps = sorted((int(s) for s in os.listdir(ckpt) if s.isdigit()), reverse=True)
    root = os.path.join(ckpt, str(steps[0]), "params")
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)


def langs_of(model_dir: str) -> tuple[tuple[str, ...], list[tuple[str, str]]]:
    from jaxmt import config as cfglib

    data = cfglib.load(model_dir)["data"]
    return data.langs, data.directions


def build(args) -> dict[str, str]:
    """Builds (or finds) every variant's directory; returns {row: directory}."""
    out, teacher = args.out, args.model_dir
    langs, _ = langs_of(teacher)
    lang_gin = "--gin.LANGS=(" + ",".join(f'"{x}"' for x in langs) + ",)"
    rows = {"teacher": teacher}
    for mode in ("int8", "w8a8"):
        rows[mode] = os.path.join(out, mode)
        if not os.path.isdir(rows[mode]):
            jaxmt("quantize", "--model_dir", teacher, "--out", rows[mode], "--mode", mode)
    fine_tune = ["--gin_file=runs/demo.gin", lang_gin, "--gin.TRAIN_MINUTES=0",
                 f"--gin.TRAIN_STEPS={args.prune_steps}", "--gin.TrainConfig.warmup_steps=0",
                 f"--gin.TrainConfig.learning_rate={args.prune_lr}",
                 f"--gin.TrainConfig.checkpoint_every={args.prune_steps}"]
    rows["unstructured50"] = os.path.join(out, "unstructured50")
    jaxmt("train", "--model_dir", rows["unstructured50"], "--init_from", teacher, *fine_tune,
          "--gin.PruneConfig.sparsity=0.5",
          f"--gin.PruneConfig.end_step={max(args.prune_steps * 2 // 3, 1)}",
          f"--gin.PruneConfig.every={max(args.prune_steps // 20, 1)}", quiet=args.json)
    one_shot = os.path.join(out, "structured30_one_shot")
    if not os.path.isdir(one_shot):
        jaxmt("prune", "--model_dir", teacher, "--out", one_shot, "--structured", "0.3")
    rows["structured30_one_shot"] = one_shot
    rows["structured30"] = os.path.join(out, "structured30")
    jaxmt("train", "--model_dir", rows["structured30"], "--init_from", one_shot, *fine_tune,
          quiet=args.json)
    if not args.teacher:
        return rows
    student = ["--gin_file=" + args.student_gin, lang_gin, "--gin.TRAIN_MINUTES=0",
               f"--gin.TRAIN_STEPS={args.student_steps}"]
    distilled = os.path.join(out, "distilled")
    if not os.path.exists(os.path.join(distilled, "distilled.json")):
        jaxmt("distill", "translate", "--teacher", args.teacher, "--out", distilled,
              "--beam", str(args.distill_beam), *student[:2],
              *(["--max_per_direction", str(args.distill_max)] if args.distill_max else []))
    extra = {"student_scratch": [],
             "student_seq_kd": [f'--gin.DataConfig.distilled="{distilled}"',
                                f"--gin.DataConfig.distilled_rate={args.distilled_rate}"],
             "student_tok_kd": [f'--gin.DistillConfig.teacher="{args.teacher}"',
                                f"--gin.DistillConfig.alpha={args.kd_alpha}",
                                f"--gin.DistillConfig.temperature={args.kd_temperature}"]}
    for name, flags in extra.items():
        d = rows[name] = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        vocab = os.path.join(d, "spm.model")  # the teacher's pieces, for token-level KD
        if not os.path.exists(vocab):
            from jaxmt.fileio import write_atomic

            with open(os.path.join(args.teacher, "spm.model"), "rb") as f:
                write_atomic(vocab, f.read())
        jaxmt("train", "--model_dir", d, *student, *flags, quiet=args.json)
    return rows


def speed(tr, texts: list[str], src: str, tgt: str, repeats: int, length: int) -> dict:
    """Generated tokens per second, greedy and beam 4 (best of ``repeats``, after a warm-up
    that compiles every shape).

    Every output is exactly ``length`` tokens (``min_len`` = the length limit), so each
    model does the same number of decode steps on the same sources: the figure is the
    cost of a step, not of the lengths a model happens to produce.
    """
    fixed = dict(min_len=length, max_len_a=0.0, max_len_b=length)
    out = {}
    for name, kw in (("greedy", dict(strategy="greedy")),
                     ("beam4", dict(strategy="beam", beam_size=4))):
        tr.translate(texts, src_lang=src, tgt_lang=tgt, **kw, **fixed)  # warm-up, compiles
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            tr.translate(texts, src_lang=src, tgt_lang=tgt, **kw, **fixed)
            best = min(best, time.perf_counter() - t)
        out[name] = round(len(texts) * length / best, 1)
    return out


def with_precision(tr, precision: str):
    """``tr`` decoding under ``precision`` ("" or its own: unchanged), e.g. fp32 on AVX2."""
    import dataclasses

    from jaxmt.inference.translator import Translator

    if not precision or precision == tr.model.cfg.precision:
        return tr
    return Translator(dataclasses.replace(tr.model.cfg, precision=precision), tr.params,
                      tr.tokenizer, max_src_len=tr.max_src_len,
                      max_decode_len=tr.max_decode_len, decode=tr.decode)


def interleaved_speed(dirs: list[str], args) -> dict:
    """Decode speed of ``dirs`` measured in turns (the whole list, ``--speed_rounds`` times),
    so a slow spell of the machine falls on every row alike; ratios against the first."""
    from jaxmt.data.embedded import parallel_pairs
    from jaxmt.inference.translator import Translator

    pairs, _ = parallel_pairs("en", "de", "test")
    texts = [s for s, _ in pairs[:args.speed_sentences]]
    runs: dict[str, list] = {d: [] for d in dirs}
    for _ in range(args.speed_rounds):
        for d in dirs:
            tr = with_precision(Translator.from_pretrained(d, progress=False), args.precision)
            runs[d].append(speed(tr, texts, "en", "de", args.speed_repeats, args.speed_length))
            print(f"{d}: {runs[d][-1]}", file=sys.stderr, flush=True)
    first = runs[dirs[0]]
    return {d: {k: [round(r[k] / f[k], 3) for r, f in zip(rs, first)] for k in rs[0]}
            for d, rs in runs.items()} | {"tok_s": runs}


def measure(model_dir: str, directions, args) -> dict:
    import jax

    from jaxmt.config import DecodeConfig
    from jaxmt.data.embedded import parallel_pairs
    from jaxmt.inference.evaluation import evaluate
    from jaxmt.inference.translator import Translator

    tr = with_precision(Translator.from_pretrained(model_dir, decode=DecodeConfig(
        strategy="greedy")), args.precision)
    res = {"directions": {f"{a}-{b}": {"bleu": float("nan"), "chrf": float("nan")}
                          for a, b in directions}} if args.speed_only else evaluate(
        tr, directions, split="test", max_examples=args.max_examples)
    src, tgt = directions[0]
    pairs, _ = parallel_pairs(src, tgt, "test")
    texts = [s for s, _ in pairs[:args.speed_sentences]]
    row = {"params": sum(int(x.size) for x in jax.tree.leaves(tr.params)),
           "bytes_on_disk": params_bytes_on_disk(model_dir),
           "tok_s": speed(tr, texts, src, tgt, args.speed_repeats, args.speed_length),
           "bleu": {d: r["bleu"] for d, r in res["directions"].items()},
           "chrf": {d: r["chrf"] for d, r in res["directions"].items()}}
    row["mean_bleu"] = round(sum(row["bleu"].values()) / len(row["bleu"]), 2)
    row["mean_chrf"] = round(sum(row["chrf"].values()) / len(row["chrf"]), 2)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_dir", required=True, help="the trained model to quantize and prune")
    p.add_argument("--out", required=True, help="where the variants' directories go")
    p.add_argument("--teacher", default="", help="distillation's teacher (rows need it)")
    p.add_argument("--student_gin", default="runs/student.gin")
    p.add_argument("--student_steps", type=int, default=2000, help="every student's budget")
    p.add_argument("--distill_beam", type=int, default=4)
    p.add_argument("--distill_max", type=int, default=0,
                   help="distil only the first N training sources per direction (0: all)")
    p.add_argument("--distilled_rate", type=float, default=1.0,
                   help="share of the seq-KD student's examples from the distilled corpus")
    p.add_argument("--kd_alpha", type=float, default=0.5)
    p.add_argument("--kd_temperature", type=float, default=1.0)
    p.add_argument("--prune_steps", type=int, default=300, help="fine-tuning of the pruned rows")
    p.add_argument("--prune_lr", type=float, default=5e-3)
    p.add_argument("--max_examples", type=int, default=100, help="test verses per direction")
    p.add_argument("--speed_sentences", type=int, default=64)
    p.add_argument("--speed_repeats", type=int, default=2)
    p.add_argument("--speed_length", type=int, default=48,
                   help="tokens every timed output is held to (min and max length)")
    p.add_argument("--only", default="", help="comma-separated rows to measure (default all)")
    p.add_argument("--precision", default="",
                   help="decode every row with this policy (default: each model's own); fp32 "
                        "is what an AVX2-only CPU runs (XLA_FLAGS=--xla_cpu_max_isa=AVX2)")
    p.add_argument("--speed_only", action="store_true",
                   help="measure size and decode speed only, no BLEU/chrF")
    p.add_argument("--speed_dirs", default="",
                   help="comma-separated model directories: only their decode speed, measured "
                        "in turns, as ratios to the first (no build, no BLEU)")
    p.add_argument("--speed_rounds", type=int, default=2)
    p.add_argument("--build_only", action="store_true",
                   help="build (or finish) the variants and stop: measure later, on a quiet "
                        "machine")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    for flag in ("model_dir", "teacher"):
        if getattr(args, flag) and not os.path.isdir(getattr(args, flag)):
            raise SystemExit(f"error: --{flag}={getattr(args, flag)}: no such directory")
    if args.speed_dirs:
        result = interleaved_speed(args.speed_dirs.split(","), args)
        print(json.dumps(result) if args.json else result)
        return 0
    t0 = time.time()
    dirs = build(args)
    if args.build_only:
        print("built: " + ", ".join(f"{k} {v}" for k, v in dirs.items()), file=sys.stderr)
        return 0
    _, directions = langs_of(args.model_dir)
    if args.only:
        dirs = {k: v for k, v in dirs.items() if k in args.only.split(",") or k == "teacher"}
    rows = {}
    for name, d in dirs.items():
        rows[name] = measure(d, directions, args)
        r = rows[name]
        print(f"{name}: BLEU {r['mean_bleu']:.2f} chrF {r['mean_chrf']:.2f} "
              f"{r['params'] / 1e6:.2f}M params {r['bytes_on_disk'] / 2**20:.2f} MiB "
              f"{r['tok_s']}", file=sys.stderr, flush=True)
    keys = [f"{a}-{b}" for a, b in directions]
    print("\n| row | params | MiB on disk | greedy tok/s | beam-4 tok/s | "
          + " | ".join(f"{k} BLEU / chrF" for k in keys) + " | mean BLEU / chrF |\n|---|"
          + "---:|" * (5 + len(keys)))
    for name, r in rows.items():
        print(f"| {name} | {r['params'] / 1e6:.2f}M | {r['bytes_on_disk'] / 2**20:.2f} | "
              f"{r['tok_s']['greedy']:,.0f} | {r['tok_s']['beam4']:,.0f} | "
              + " | ".join(f"{r['bleu'][k]:.2f} / {r['chrf'][k]:.1f}" for k in keys)
              + f" | {r['mean_bleu']:.2f} / {r['mean_chrf']:.1f} |")
    t = rows["teacher"]

    def versus(name: str) -> dict:
        r = rows[name]
        return {"bytes_ratio": round(r["bytes_on_disk"] / t["bytes_on_disk"], 4),
                "bleu_delta": round(r["mean_bleu"] - t["mean_bleu"], 2),
                "chrf_delta": round(r["mean_chrf"] - t["mean_chrf"], 2),
                "speedup": round(r["tok_s"]["greedy"] / t["tok_s"]["greedy"], 3),
                "speedup_beam4": round(r["tok_s"]["beam4"] / t["tok_s"]["beam4"], 3)}

    summary = {name: versus(name) for name in ("int8", "w8a8", "unstructured50")
               if name in rows}
    if "structured30" in rows:
        summary["structured"] = versus("structured30")
    if "student_seq_kd" in rows and "student_scratch" in rows:
        s, k = rows["student_scratch"], rows["student_seq_kd"]
        summary["seq_kd"] = {"bleu_gain_vs_scratch": round(k["mean_bleu"] - s["mean_bleu"], 2),
                             "chrf_gain_vs_scratch": round(k["mean_chrf"] - s["mean_chrf"], 2)}
    if "student_tok_kd" in rows and "student_scratch" in rows:
        s, k = rows["student_scratch"], rows["student_tok_kd"]
        summary["tok_kd"] = {"bleu_gain_vs_scratch": round(k["mean_bleu"] - s["mean_bleu"], 2),
                             "chrf_gain_vs_scratch": round(k["mean_chrf"] - s["mean_chrf"], 2)}
    summary.update(rows=rows, seconds=round(time.time() - t0))
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
