"""Translation quality per attention implementation: short verses against long passages.

The tiny demo model (``gin_configs/runs/demo.gin``, trained once with exact attention;
``--model_dir`` is reused if it holds a checkpoint, as ``make demo`` leaves it) is
evaluated with each implementation in its encoder self-attention, the attention that
sees the whole source. Decoding is greedy; the decoder stays ``xla``, so decode steps
attend exactly over the KV cache and the rows differ only in how the encoder reads the
source.

Two test sets per direction (en->de, de->en), from books never seen in training:
  short: ``--short`` test verses, evenly spaced (the model's training lengths);
  long:  passages of 256-1024 source tokens made by joining consecutive test verses
         of one book (``jaxmt.inference.evaluation.long_passages``), ``--passages`` of them.

``--finetune performer --finetune_steps 200`` also continues training a copy of the
model for that many steps with each listed implementation in the encoder (and a copy with
xla, the control that had the same extra steps) and evaluates those copies: an
approximation the model was not trained with can need adaptation, not just a swap.

Implementations: xla (the reference), blockwise (flash's maths; on CPU flash runs it),
local (window 128 = the relative bias's max distance), bigbird (64-token blocks:
3-block window, 1 global, 2 random), performer (256 features, T5 bias kept) and auto
(xla up to 512 source tokens, local above). Each row prints chrF/BLEU and the change
against xla, and the teacher-forced per-token NLL of the references (a finer measure
than BLEU on long passages, where a tiny model trained on verses drifts when it
generates 1000 tokens itself).

    python benchmarks/attention_quality.py [--model_dir runs/demo] [--short 300]
        [--passages 24] [--impls ...] [--finetune IMPL ...] [--finetune_steps 200] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

IMPLS = ("xla", "blockwise", "local", "bigbird", "performer", "auto")
DIRECTIONS = (("en", "de"), ("de", "en"))
MAX_SRC, MAX_OUT = 1024, 1280


def ensure_trained(model_dir: str) -> None:
    """Trains the demo model into ``model_dir`` unless it already holds a checkpoint."""
    from jaxmt.checkpoint import Checkpointer
    if os.path.exists(os.path.join(model_dir, "jaxmt_config.json")):
        ckpt = Checkpointer(model_dir, async_save=False)
        done = ckpt.latest_step() is not None
        ckpt.close()
        if done:
            return
    from jaxmt.gin_files import parse_gin
    from jaxmt.train.run import train
    parse_gin(["runs/demo.gin"], [])
    train(model_dir=model_dir)


def finetune(model_dir: str, impl: str, steps: int) -> str:
    """A copy of ``model_dir`` trained ``steps`` more steps with ``impl`` in the encoder
    (``jaxmt train`` resumes the copy's checkpoint and data position)."""
    from jaxmt.checkpoint import Checkpointer
    out = f"{model_dir.rstrip('/')}_ft{steps}_{impl}"
    ckpt = Checkpointer(model_dir, async_save=False)
    start = ckpt.latest_step()
    ckpt.close()
    if not os.path.exists(out):
        shutil.copytree(model_dir, out)
    subprocess.run([sys.executable, "-m", "jaxmt.cli", "train", "--gin_file=runs/demo.gin",
                    f"--gin.TRAIN_STEPS={start + steps}",
                    f"--gin.AttentionConfig.encoder='{impl}'", f"--model_dir={out}"], check=True)
    return out


def teacher_forced_nll(model, params, tr, pairs, src, tgt, batch=8):
    """Mean per-token negative log-likelihood of the references, teacher forced.

    Unlike BLEU of greedy output (which a tiny model's drift on 1000-token outputs
    swamps), this shows how much each attention changes what the model predicts.
    """
    import jax
    import numpy as np
    from jaxmt.modeling.decoding import EOS_ID

    loss = jax.jit(lambda p, b: model.loss(p, b, dropout_rng=None)[1])
    total = tokens = 0.0
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        srcs = [tr.encode(s, tgt, src) for s, _ in chunk]
        tgts = [tr.tokenizer.sp.encode(t)[:MAX_OUT - 1] + [EOS_ID] for _, t in chunk]
        S = -(-max(map(len, srcs)) // 128) * 128  # few shapes: compile once per 128
        T = -(-max(map(len, tgts)) // 128) * 128
        enc, dec = np.zeros((batch, S), np.int32), np.zeros((batch, T), np.int32)
        for r, (a, b) in enumerate(zip(srcs, tgts)):
            enc[r, :len(a)], dec[r, :len(b)] = a, b
        dec_in = np.concatenate([np.zeros((batch, 1), np.int32), dec[:, :-1]], 1)
        b = dict(encoder_input_tokens=enc, encoder_segment_ids=(enc > 0).astype(np.int32),
                 decoder_input_tokens=dec_in, decoder_target_tokens=dec,
                 decoder_loss_weights=(dec > 0).astype(np.int32),
                 decoder_segment_ids=(dec > 0).astype(np.int32))
        m = loss(params, b)
        total, tokens = total + float(m["nll_sum"]), tokens + float(m["tokens"])
    return total / tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_dir", default="runs/demo")
    ap.add_argument("--short", type=int, default=300)
    ap.add_argument("--passages", type=int, default=24)
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--finetune", nargs="*", default=[], choices=IMPLS)
    ap.add_argument("--finetune_steps", type=int, default=200)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    from jaxmt.config import AttentionConfig
    from jaxmt.data.embedded import parallel_pairs
    from jaxmt.inference.evaluation import long_passages, pick, score
    from jaxmt.inference.translator import Translator

    ensure_trained(a.model_dir)
    base = Translator.from_pretrained(a.model_dir, max_src_len=MAX_SRC, max_decode_len=MAX_OUT,
                                      batch_size=8)
    sets = {}
    for src, tgt in DIRECTIONS:
        count = lambda text: len(base.encode(text, tgt, src))  # noqa: E731  ids + EOS
        short, _ = parallel_pairs(src, tgt, "test")
        long, report = long_passages(src, tgt, "test", count, 256, MAX_SRC)
        sets[(src, tgt)] = {"short": [short[i] for i in pick(len(short), a.short)],
                            "long": [long[i] for i in pick(len(long), a.passages)]}
        lens = [count(p[0]) for p in sets[(src, tgt)]["long"]]
        print(f"{src}->{tgt}: {len(sets[(src, tgt)]['short'])} verses; "
              f"{len(lens)} passages of {min(lens)}-{max(lens)} source tokens "
              f"(mean {sum(lens) / len(lens):.0f}); {report}", flush=True)

    runs = [(impl, impl, base.params) for impl in a.impls]
    for impl in (["xla"] + a.finetune) if a.finetune else []:
        tuned = Translator.from_pretrained(finetune(a.model_dir, impl, a.finetune_steps))
        runs.append((f"{impl}+ft{a.finetune_steps}", impl, tuned.params))
    results = []
    for label, impl, params in runs:
        attn = AttentionConfig(encoder=impl)
        # fp32, so exact implementations agree to rounding and greedy output matches.
        cfg = dataclasses.replace(base.model.cfg, attention=attn, precision="fp32")
        tr = Translator(cfg, params, base.tokenizer, max_src_len=MAX_SRC,
                        max_decode_len=MAX_OUT, batch_size=base.batch_size)
        for (src, tgt), split in sets.items():
            for name, pairs in split.items():
                t0 = time.time()
                hyps = tr.translate([p[0] for p in pairs], src_lang=src, tgt_lang=tgt)
                nll = teacher_forced_nll(tr.model, tr.params, tr, pairs, src, tgt)
                row = dict(impl=label, direction=f"{src}-{tgt}", set=name, n=len(pairs),
                           **score(hyps, [p[1] for p in pairs]), nll=round(nll, 4),
                           seconds=round(time.time() - t0, 1))
                results.append(row)
                print(f"  {label:<10} {src}-{tgt} {name:<5} BLEU {row['bleu']:5.2f} "
                      f"chrF {row['chrf']:5.2f} NLL {row['nll']:.4f} ({row['seconds']} s)",
                      flush=True)

    def ref(label, r):  # fine-tuned rows compare with the xla copy tuned as long
        control = "xla" + label[label.index("+"):] if "+" in label else "xla"
        return next(x for x in results if x["impl"] == control and x["direction"] == r[
            "direction"] and x["set"] == r["set"])

    print("\n| impl | set | en-de BLEU / chrF / NLL | de-en BLEU / chrF / NLL "
          "| mean change vs xla (BLEU / chrF / NLL) |")
    print("|---|---|---|---|---|")
    for label, _, _ in runs:
        for name in ("short", "long"):
            rows = [r for r in results if r["impl"] == label and r["set"] == name]
            cells = [f"{r['bleu']:.1f} / {r['chrf']:.1f} / {r['nll']:.3f}" for r in rows]
            try:
                d = {k: sum(r[k] - ref(label, r)[k] for r in rows) / len(rows)
                     for k in ("bleu", "chrf", "nll")}
                delta = f"{d['bleu']:+.2f} / {d['chrf']:+.2f} / {d['nll']:+.3f}"
            except StopIteration:  # xla not among --impls
                delta = "n/a"
            print(f"| {label} | {name} | {' | '.join(cells)} | {delta} |")
    if a.json:
        print(json.dumps({"results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
