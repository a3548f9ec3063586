"""sacreBLEU BLEU and chrF per translation direction, with the copy-the-source baseline.

The baseline (hypothesis = source sentence) is what a model that learned nothing but
copying would score; every direction of a useful model must beat it.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Sequence

import numpy as np
import sacrebleu

from jaxmt.data.embedded import load_split, parallel_pairs
from jaxmt.data.sources import CleanConfig, CorpusSource, direction_pairs
from jaxmt.inference.translator import Translator


def pick(n_total: int, max_examples: int | None) -> list[int]:
    """Evenly spaced indices, so a capped evaluation still spans every test book."""
    if max_examples is not None and max_examples < 0:
        raise ValueError(f"max_examples={max_examples}: must be positive (None or 0: all)")
    if not max_examples or max_examples >= n_total:
        return list(range(n_total))
    return sorted(set(np.linspace(0, n_total - 1, max_examples).round().astype(int).tolist()))


def score(hyps: Sequence[str], refs: Sequence[str]) -> dict:
    bleu, chrf = sacrebleu.metrics.BLEU(), sacrebleu.metrics.CHRF()
    return {"bleu": round(bleu.corpus_score(list(hyps), [list(refs)]).score, 2),
            "chrf": round(chrf.corpus_score(list(hyps), [list(refs)]).score, 2)}


def loops(text: str, n: int = 4, times: int = 3) -> bool:
    """True when some word ``n``-gram occurs more than ``times`` times in ``text``: the
    mark of a decoder stuck in a loop (``sähren, sähren, sähren, ...``)."""
    words = text.split()
    counts = collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return any(c > times for c in counts.values())


def loop_share(hyps: Sequence[str]) -> float:
    """The share of ``hyps`` that :func:`loops`, in percent."""
    return round(100.0 * sum(map(loops, hyps)) / max(len(hyps), 1), 2)


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
        cut_before = translator.stats.out_truncated
        hyps = translator.translate(sources, src_lang=src, tgt_lang=tgt)
        copy = score(sources, refs)
        result[f"{src}-{tgt}"] = dict(score(hyps, refs), n=len(pairs),
                                      copy_bleu=copy["bleu"], copy_chrf=copy["chrf"],
                                      skipped=sum(report.skipped.values()),
                                      loop_pct=loop_share(hyps),
                                      cut_at_limit=translator.stats.out_truncated - cut_before)
        if progress:
            progress(f"{src}-{tgt}", result[f"{src}-{tgt}"])
    return {"directions": result, "signature": signature(),
            "decode": dataclasses.asdict(translator.decode)}


def format_table(result: dict) -> str:
    """Plain-text table: model vs copy-the-source baseline per direction."""
    rows = ["| direction | n | BLEU | chrF | copy BLEU | copy chrF | chrF over copy | loops % |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for d, r in result["directions"].items():
        rows.append(f"| {d} | {r['n']} | {r['bleu']:.1f} | {r['chrf']:.1f} | "
                    f"{r['copy_bleu']:.1f} | {r['copy_chrf']:.1f} | "
                    f"{r['chrf'] - r['copy_chrf']:+.1f} | {r['loop_pct']:.1f} |")
    d = result.get("decode")
    how = "" if d is None else (
        f"\ndecoding: {d['strategy']}" + (f" {d['beam_size']}, {d['length_penalty']} penalty "
                                          f"{d['alpha']:g}" if d["strategy"] == "beam" else "")
        + f", no_repeat_ngram_size {d['no_repeat_ngram_size']}, outputs <= "
          f"{d['max_len_a']:g} x source + {d['max_len_b']}; loops %: outputs repeating a "
          "4-gram more than 3 times")
    return "\n".join(rows) + how + f"\n\nsacreBLEU {result['signature']}"


def long_passages(src_lang: str, tgt_lang: str, split: str, count: Callable[[str], int],
                  min_tokens: int = 256, max_tokens: int = 1024,
                  seed: int = 0) -> tuple[list[tuple[str, str]], dict]:
    """Long-input pairs: consecutive verses of one book joined into passages.

    Each passage aims at a length drawn uniformly from [min_tokens, max_tokens] source
    tokens (as ``count`` measures them, e.g. the translator's ids with EOS) and never
    exceeds ``max_tokens``. Verses are joined with a space on both sides, so source and
    target stay aligned. A passage never spans two books.

    Returns:
        ``(pairs, report)``: the report counts verses used, verses skipped because one
        side is empty, and verses left over at the end of a book (too few for a passage).
    """
    if not 0 < min_tokens <= max_tokens:
        raise ValueError(f"long_passages: need 0 < min_tokens <= max_tokens, got "
                         f"{min_tokens}, {max_tokens}")
    refs, texts = load_split(split, [src_lang, tgt_lang])
    rng = np.random.default_rng(seed)
    pairs, report = [], {"verses_used": 0, "empty_side": 0, "left_over": 0, "too_long": 0}
    cur_src, cur_tgt, cur_len, book = [], [], 0, None
    target = int(rng.integers(min_tokens, max_tokens + 1))
    for ref, src, tgt in zip(refs, texts[src_lang], texts[tgt_lang]):
        if ref[0] != book:  # a new book: the unfinished passage is left over
            report["left_over"] += len(cur_src)
            cur_src, cur_tgt, cur_len, book = [], [], 0, ref[0]
        if not src or not tgt:
            report["empty_side"] += 1
            continue
        n = count(" ".join(cur_src + [src]))
        if n > max_tokens:
            if cur_len >= min_tokens:  # close what we have; this verse starts the next one
                pairs.append((" ".join(cur_src), " ".join(cur_tgt)))
                report["verses_used"] += len(cur_src)
                target = int(rng.integers(min_tokens, max_tokens + 1))
            else:
                report["left_over"] += len(cur_src)
            cur_src, cur_tgt = [], []
            n = count(src)
            if n > max_tokens:
                report["too_long"] += 1
                cur_len = 0
                continue
        cur_src.append(src)
        cur_tgt.append(tgt)
        cur_len = n
        if cur_len >= target:
            pairs.append((" ".join(cur_src), " ".join(cur_tgt)))
            report["verses_used"] += len(cur_src)
            cur_src, cur_tgt, cur_len = [], [], 0
            target = int(rng.integers(min_tokens, max_tokens + 1))
    report["left_over"] += len(cur_src)
    return pairs, report
