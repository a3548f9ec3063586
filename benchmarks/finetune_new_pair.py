"""Add a language pair to a trained model: full fine-tuning, adapters, LoRA, or a mix.

The experiment the seed implies: a base trained on English <-> {German, French} (a jaxmt
model directory) learns English <-> Spanish four ways, each for the same steps and batch,
all with ``jaxmt train --init_from BASE`` (``gin_configs/runs/finetune.gin``'s recipe):

* ``full``: every parameter trains on en<->es;
* ``adapters``: adapters (Bapna & Firat 2019) for the two new directions only, the base
  frozen;
* ``lora``: LoRA on every attention and MLP projection, the base frozen;
* ``mix``: every parameter trains on en<->{de, fr, es} (the old pairs kept in the data).

Columns: chrF on the new pair's held-out books (test split), the chrF change on the old
pairs against the base (forgetting), trainable parameters as a share of the model,
optimizer-state bytes, and training tokens/s (source + target tokens of one train step
of the run's shape, best of --timed_steps, all variants timed alike).

    python benchmarks/finetune_new_pair.py --base runs/base_en_de_fr --out runs/ft --json

The base: ``jaxmt train --gin_file=runs/demo.gin --gin.LANGS='("en","de","fr")'
--gin.TRAIN_MINUTES=0 --gin.TRAIN_STEPS=2000 --model_dir runs/base_en_de_fr``.
Variants already trained in ``--out`` are resumed (nothing is retrained); the base is
only read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

NEW, OLD = ("es",), ("de", "fr")


def variants(args) -> dict:
    from jaxmt.config import AdapterConfig, LoraConfig

    peft = dict(optimizer=args.peft_optimizer, lr=args.peft_lr)
    return {
        "full": dict(langs=("en",) + NEW, optimizer="adafactor", lr=args.full_lr),
        "adapters": dict(langs=("en",) + NEW, **peft,
                         adapter=AdapterConfig(
                             size=args.adapter_size, route=args.adapter_route,
                             langs=NEW if args.adapter_route == "language" else tuple(
                                 f"{a}-{b}" for n in NEW for a, b in (("en", n), (n, "en"))))),
        "lora": dict(langs=("en",) + NEW, optimizer=args.peft_optimizer,
                     lr=args.lora_lr or args.peft_lr,
                     lora=LoraConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank)),
        "mix": dict(langs=("en",) + OLD + NEW, optimizer="adafactor", lr=args.full_lr),
    }


def train_variant(base: str, model_dir: str, spec: dict, args):
    """Trains (or resumes) one variant; returns its Trainer-level figures and last metrics."""
    from jaxmt.config import DataConfig, MeshConfig, ModelConfig, TrainConfig
    from jaxmt.train.run import train

    model = ModelConfig(**{k: spec[k] for k in ("adapter", "lora") if k in spec})
    data = DataConfig(langs=spec["langs"], src_len=args.seq_len, tgt_len=args.seq_len,
                      max_eval_len=128)
    steps = TrainConfig(steps=args.steps, batch_size=args.batch, optimizer=spec["optimizer"],
                        learning_rate=spec["lr"], warmup_steps=50, label_smoothing=0.0,
                        log_every=50, checkpoint_every=args.steps, weight_decay=0.0)
    last = train(model_dir, model_cfg=model, mesh_cfg=MeshConfig(), data_cfg=data,
                 train_cfg=steps, progress=not args.json, init_from=base)
    if not last:  # already trained: the summary of that run
        with open(os.path.join(model_dir, "train_summary.json")) as f:
            last = json.load(f)
    return last


def figures(model_dir: str, timed_steps: int) -> dict:
    """Trainable share, optimizer-state bytes and train-step speed of a trained variant.

    The speed is measured here, on one fixed random batch of the run's shape (best of
    ``timed_steps`` steps after a warm-up), so every variant is timed alike; the runs'
    own logged speeds depend on what else the machine was doing.
    """
    import jax
    import numpy as np

    from jaxmt import config as cfglib
    from jaxmt.sharding.partitioning import Partitioner
    from jaxmt.train.trainer import Trainer

    cfgs = cfglib.load(model_dir)
    data = cfgs["data"]
    tr = Trainer(cfgs["model"], cfgs["train"], Partitioner(cfgs["mesh"], jax.devices()[:1]),
                 data.src_len, data.tgt_len)
    out = {"trainable_share": tr.num_params(True) / tr.num_params(),
           "trainable_params": tr.num_params(True), "params": tr.num_params(),
           "optimizer_bytes": tr.optimizer_bytes(),
           "optimizer_bytes_full_ft": tr.optimizer_bytes(frozen=False)}
    batch = tr.model.random_batch(tr.cfg.batch_size, data.src_len, data.tgt_len)
    state, step, times = tr.init_state(0), tr.step_fn(), []
    for i in range(timed_steps + 1):
        t = time.perf_counter()
        state, metrics = step(state, batch, jax.random.PRNGKey(i))
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t)
    tokens = int(np.sum(batch["decoder_loss_weights"]) + np.sum(batch["encoder_segment_ids"] > 0))
    out["tokens_per_s"] = round(tokens / min(times[1:]))
    return out


def evaluate_dir(model_dir: str, directions, max_examples: int, precision: str) -> dict:
    import dataclasses

    from jaxmt.inference.evaluation import evaluate
    from jaxmt.inference.translator import Translator

    tr = Translator.from_pretrained(model_dir, decode=_greedy())
    if precision != tr.model.cfg.precision:  # the same numerics for every model compared
        tr = Translator(dataclasses.replace(tr.model.cfg, precision=precision), tr.params,
                        tr.tokenizer, max_src_len=tr.max_src_len,
                        max_decode_len=tr.max_decode_len, decode=tr.decode)
    res = evaluate(tr, directions, split="test", max_examples=max_examples)
    return ({d: r["chrf"] for d, r in res["directions"].items()},
            {d: r["copy_chrf"] for d, r in res["directions"].items()})


def _greedy():
    from jaxmt.config import DecodeConfig

    return DecodeConfig(strategy="greedy")  # as runs/demo.gin decodes the base


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="jaxmt model directory trained on en<->{de,fr}")
    p.add_argument("--out", required=True, help="where the four variants' directories go")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--full_lr", type=float, default=5e-3, help="Adafactor, full and mix")
    p.add_argument("--peft_optimizer", default="adamw", choices=("adamw", "adafactor"),
                   help="adapters and LoRA (Adafactor scales updates by each parameter's "
                        "size, which starts their zero-initialised matrices slowly)")
    p.add_argument("--peft_lr", type=float, default=1e-2, help="adapters (and LoRA)")
    p.add_argument("--lora_lr", type=float, default=3e-3, help="LoRA (0: --peft_lr)")
    p.add_argument("--adapter_size", type=int, default=48)
    p.add_argument("--adapter_route", default="direction", choices=("language", "direction"),
                   help="language: the encoder's adapter by source language, the decoder's "
                        "by target language; direction: one adapter per new direction in both")
    p.add_argument("--lora_rank", type=int, default=8)
    p.add_argument("--max_examples", type=int, default=100, help="test verses per direction")
    p.add_argument("--eval_precision", default="fp32",
                   help="decode every model (the base too) with this policy, so a frozen base's "
                        "outputs are compared without bf16 fusion differences")
    p.add_argument("--only", default="", help="comma-separated variants (default all)")
    p.add_argument("--timed_steps", type=int, default=5, help="train steps timed per variant")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not os.path.isdir(args.base):
        raise SystemExit(f"error: --base={args.base}: no such directory")
    new_dirs = [d for lang in NEW for d in (("en", lang), (lang, "en"))]
    old_dirs = [d for lang in OLD for d in (("en", lang), (lang, "en"))]
    key = lambda d: f"{d[0]}-{d[1]}"  # noqa: E731
    t0 = time.time()
    base_scores, _ = evaluate_dir(args.base, old_dirs, args.max_examples, args.eval_precision)
    copy_new = None  # the copy-the-source baseline on the new pair (the base reads no es tag)
    rows = {}
    chosen = variants(args)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    for name, spec in chosen.items():
        d = os.path.join(args.out, name)
        last = train_variant(args.base, d, spec, args)
        scores, copy = evaluate_dir(d, new_dirs + old_dirs, args.max_examples,
                                    args.eval_precision)
        copy_new = sum(copy[key(x)] for x in new_dirs) / len(new_dirs)
        new = sum(scores[key(x)] for x in new_dirs) / len(new_dirs)
        old = sum(scores[key(x)] - base_scores[key(x)] for x in old_dirs) / len(old_dirs)
        rows[name] = dict(figures(d, args.timed_steps), new_pair_chrf=round(new, 2),
                          old_pairs_chrf_change=round(old, 2), scores=scores,
                          logged_tokens_per_s=round(float(last.get("tokens_per_s", 0.0))))
        print(f"{name}: new pair chrF {new:.2f}, old pairs {old:+.2f}", file=sys.stderr, flush=True)
    print("\n| variant | new pair chrF (en-es, es-en) | old pairs chrF change | trainable | "
          "optimizer state (share of full fine-tuning, same optimizer) | train tok/s |\n"
          "|---|---:|---:|---:|---:|---:|")
    if copy_new is not None:
        print(f"| copying the source | {copy_new:.1f} | | | | |")
    for name, r in rows.items():
        print(f"| {name} | {r['new_pair_chrf']:.1f} | {r['old_pairs_chrf_change']:+.2f} | "
              f"{100 * r['trainable_share']:.2f}% | {r['optimizer_bytes'] / 2**20:.2f} MiB "
              f"({100 * r['optimizer_bytes'] / r['optimizer_bytes_full_ft']:.1f}%) | "
              f"{r['tokens_per_s']:,} |")
    full = rows.get("full")
    summary = {"base": base_scores, "copy_new_pair_chrf": copy_new, "variants": rows,
               "seconds": round(time.time() - t0)}
    if full and "adapters" in rows:
        summary["adapters_vs_full"] = {
            "trainable_share": rows["adapters"]["trainable_share"],
            # Against the full run (Adafactor's factored moments) and against full
            # fine-tuning with the adapters' own optimizer (AdamW).
            "optimizer_bytes_vs_full_run": (rows["adapters"]["optimizer_bytes"]
                                            / full["optimizer_bytes"]),
            "optimizer_bytes_vs_full_same_optimizer": (
                rows["adapters"]["optimizer_bytes"] / rows["adapters"]["optimizer_bytes_full_ft"]),
            "new_pair_chrf_delta": rows["adapters"]["new_pair_chrf"] - full["new_pair_chrf"],
            "old_pairs_chrf_change": rows["adapters"]["old_pairs_chrf_change"]}
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
