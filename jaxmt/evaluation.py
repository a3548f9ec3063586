"""sacreBLEU BLEU and chrF per translation direction, with the copy-the-source baseline.

The baseline (hypothesis = source sentence) is what a model that learned nothing but
copying would score; every direction of a useful model must beat it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import sacrebleu

from jaxmt.data.corpora import parallel_pairs
from jaxmt.data.sources import CleanConfig, CorpusSource, direction_pairs
from jaxmt.translator import Translator


def pick(n_total: int, max_examples: int | None) -> list[int]:
    """Evenly spaced indices, so a capped evaluation still spans every test book."""
    if not max_examples or max_examples >= n_total:
        return list(range(n_total))
    return sorted(set(np.linspace(0, n_total - 1, max_examples).round().astype(int).tolist()))


def score(hyps: Sequence[str], refs: Sequence[str]) -> dict:
    bleu, chrf = sacrebleu.metrics.BLEU(), sacrebleu.metrics.CHRF()
    return {"bleu": round(bleu.corpus_score(list(hyps), [list(refs)]).score, 2),
            "chrf": round(chrf.corpus_score(list(hyps), [list(refs)]).score, 2)}


def signature() -> str:
    bleu, chrf = sacrebleu.metrics.BLEU(), sacrebleu.metrics.CHRF()
    # Signatures are only complete after a corpus_score call.
    bleu.corpus_score(["a"], [["a"]])
    chrf.corpus_score(["a"], [["a"]])
    return f"BLEU: {bleu.get_signature()} | chrF: {chrf.get_signature()}"


def evaluate(translator: Translator, directions: Sequence[tuple[str, str]], split: str = "test",
             max_examples: int | None = None, progress=None,
             corpus: Sequence[CorpusSource] = (), limits: CleanConfig | None = None) -> dict:
    """Scores every direction; returns the ``jaxmt eval --json`` object.

    Args:
      corpus: the run's own corpora (``DataConfig.corpora``), read with the training
        checks (``limits``); empty means the embedded corpus.
    """
    result = {}
    for src, tgt in directions:
        if corpus:
            pairs, report = direction_pairs(corpus, src, tgt, split, limits)
        else:
            pairs, report = parallel_pairs(src, tgt, split)
        pairs = [pairs[i] for i in pick(len(pairs), max_examples)]
        sources, refs = [p[0] for p in pairs], [p[1] for p in pairs]
        hyps = translator.translate(sources, src_lang=src, tgt_lang=tgt)
        copy = score(sources, refs)
        result[f"{src}-{tgt}"] = dict(score(hyps, refs), n=len(pairs),
                                      copy_bleu=copy["bleu"], copy_chrf=copy["chrf"],
                                      skipped=sum(report.skipped.values()))
        if progress:
            progress(f"{src}-{tgt}", result[f"{src}-{tgt}"])
    return {"directions": result, "signature": signature()}


def format_table(result: dict) -> str:
    """Plain-text table: model vs copy-the-source baseline per direction."""
    rows = ["| direction | n | BLEU | chrF | copy BLEU | copy chrF |",
            "|---|---:|---:|---:|---:|---:|"]
    for d, r in result["directions"].items():
        rows.append(f"| {d} | {r['n']} | {r['bleu']:.1f} | {r['chrf']:.1f} | "
                    f"{r['copy_bleu']:.1f} | {r['copy_chrf']:.1f} |")
    return "\n".join(rows) + f"\n\nsacreBLEU {result['signature']}"
