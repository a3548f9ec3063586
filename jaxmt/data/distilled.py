"""Sequence-level distillation data (Kim & Rush 2016): the training sources a teacher
translates, and the distilled corpus ``jaxmt distill translate`` writes from them.

Pure Python (no seqio, no TensorFlow), so the distillation command reads the sources
without loading the data pipeline.

:func:`read_corpus` is the one read path of the user's corpora: training
(:func:`jaxmt.data.tasks.register_corpus`) and distillation (:func:`train_pairs`) both
read through it, so the teacher translates exactly the source sentences training reads,
in the same order.

A distilled corpus directory (what ``DataConfig.distilled`` names)::

    OUT/manifest.json            what the run is made from: teacher, decoding, sources
    OUT/parts/en-de/000000.tsv   one finished chunk: source<TAB>teacher output per line
    OUT/en-de.train.tsv          a direction's chunks joined, in source order
    OUT/distilled.json           written last: directions, counts, teacher, decoding

Training registers each ``OUT/<src>-<tgt>.train.tsv`` (:func:`corpus_sources`) as a
``tsv`` :class:`~jaxmt.data.sources.CorpusSource` with the run's cleaning, so an empty
or runaway teacher output is a counted skip there, like any bad pair.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

from jaxmt.data import embedded, sources
from jaxmt.data.mixture import direction_key, directions

Direction = tuple[str, str]
PREFIX = "jaxmt_distilled"  # seqio Task and Mixture names of the distilled corpus
MANIFEST = "distilled.json"  # written last: a directory without it is unfinished
RUN_MANIFEST = "manifest.json"  # written first: what the chunks are made from
PARTS_DIR = "parts"
REPORT_STEM = "distilled_data_report"  # beside data_report.json in a model directory


# ---------------------------------------------------------------- the training sources

def read_corpus(corpus: Sequence[sources.CorpusSource], limits: sources.CleanConfig, *,
                label: str = "", by_direction: bool = False
                ) -> tuple[dict[tuple[str, str, str], sources.Report],
                           dict[Direction, dict[str, list[tuple[list, bool]]]]]:
    """Reads every file once, with the training checks (:func:`sources.read_pairs`).

    Files of one language pair and split share one skip report and one dedup set
    (``by_direction``: of one direction and split, for files that each give only their
    own direction, such as distilled ones).

    Args:
        corpus: The sources, in order.
        limits: The cleaning limits (``DataConfig.clean``).
        label: Put before each report's name (``"en-de/train"``).
        by_direction: Group reports and dedup by direction instead of language pair.

    Returns:
        ``(reports, parts)``: ``reports[(src, tgt, split)]`` is the report covering that
        direction and split (one object may cover several keys); ``parts[(src,
        tgt)][split]`` lists ``(pairs, swapped)`` per file, in corpus order: the clean
        pairs as read, and whether this direction reads them target-to-source.

    Raises:
        sources.BadRecordError: ``limits.strict`` and a bad record.
        FileNotFoundError, ValueError: A missing or unreadable file.
    """
    groups: dict[tuple[str, str, str], tuple[sources.Report, set]] = {}
    reports: dict[tuple[str, str, str], sources.Report] = {}
    parts: dict[Direction, dict[str, list[tuple[list, bool]]]] = {}
    for s in corpus:
        a, b = (s.src_lang, s.tgt_lang) if by_direction else sorted((s.src_lang, s.tgt_lang))
        report, seen = groups.setdefault(
            (a, b, s.split),
            (sources.Report(f"{label}{a}-{b}/{s.split}", max_examples=limits.max_examples),
             set()))
        pairs = list(sources.read_pairs(s, limits, report, seen))
        for src, tgt, swapped in directions_of(s):
            parts.setdefault((src, tgt), {}).setdefault(s.split, []).append((pairs, swapped))
            reports[(src, tgt, s.split)] = report
    return reports, parts


def directions_of(source: sources.CorpusSource) -> list[tuple[str, str, bool]]:
    """The directions a corpus source trains, as ``(src, tgt, swapped)``: its own, and with
    ``both_directions`` the reverse (its columns swapped)."""
    return [(source.src_lang, source.tgt_lang, False)] + (
        [(source.tgt_lang, source.src_lang, True)] if source.both_directions else [])


def joined(parts: Iterable[tuple[list, bool]]) -> list[tuple[str, str]]:
    """One direction's pairs of one split from :func:`read_corpus`'s parts, in order."""
    return [(b, a) if swapped else (a, b) for pairs, swapped in parts for a, b in pairs]


def train_pairs(data_cfg) -> dict[Direction, list[tuple[str, str]]]:
    """The ``(source, reference)`` train pairs of every direction a DataConfig trains on.

    Exactly what training's Tasks read, in their order: the user's ``corpora`` read by
    :func:`read_corpus` with ``data_cfg.clean`` (directions without train pairs left
    out, as the mixture leaves them out), else the embedded corpus's
    ``pivot <-> xx`` directions (:func:`embedded.parallel_pairs`).

    Args:
        data_cfg: A :class:`jaxmt.config.DataConfig`.

    Returns:
        Direction -> pairs, in the mixture's direction order.

    Raises:
        ValueError: A language the embedded corpus lacks, no train pairs at all, or (strict)
            a bad record.
        FileNotFoundError: A missing corpus file.
    """
    if data_cfg.corpora:
        train = [s for s in data_cfg.corpora if s.split == "train"]
        _, parts = read_corpus(train, data_cfg.clean)
        out = {d: joined(by_split.get("train", ())) for d, by_split in parts.items()}
        out = {d: pairs for d, pairs in out.items() if pairs}
        if not out:
            raise ValueError(f"no train pairs in {[s.name for s in data_cfg.corpora]}: every "
                             "corpus is another split, or every line was skipped")
        return out
    embedded.check_langs(data_cfg.langs)
    return {d: embedded.parallel_pairs(*d, "train")[0]
            for d in directions(data_cfg.langs, data_cfg.pivot)}


# ---------------------------------------------------------------- the distilled corpus

def train_file(out_dir: str, src: str, tgt: str) -> str:
    """``OUT/<src>-<tgt>.train.tsv``: source<TAB>teacher output, in source order."""
    return os.path.join(out_dir, f"{direction_key(src, tgt)}.train.tsv")


def read_manifest(out_dir: str) -> dict:
    """``OUT/distilled.json``.

    Raises:
        ValueError: ``out_dir`` holds no finished distilled corpus, or the file is
            unreadable; the message names it and the command that writes it.
    """
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.isfile(path):
        what = "no such directory" if not os.path.isdir(out_dir) else f"no {MANIFEST} there"
        raise ValueError(f"DataConfig.distilled={out_dir}: {what}; write the distilled corpus "
                         f"first with `jaxmt distill translate --out={out_dir}` (an unfinished "
                         "one resumes)")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        manifest["directions"]  # noqa: B018
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: unreadable ({e!r}); run `jaxmt distill translate` again") \
            from None
    return manifest


def corpus_sources(out_dir: str, wanted: Sequence[Direction]
                   ) -> tuple[sources.CorpusSource, ...]:
    """The distilled train files of ``wanted``, one source each (no reverse direction).

    Raises:
        ValueError: No finished corpus in ``out_dir``, or it lacks some of ``wanted``
            (all of them are named).
        FileNotFoundError: A listed file is missing.
    """
    have = read_manifest(out_dir)["directions"]
    missing = [direction_key(*d) for d in wanted if direction_key(*d) not in have]
    if missing:
        raise ValueError(f"DataConfig.distilled={out_dir}: no distilled data for "
                         f"{', '.join(missing)} (it has {', '.join(have) or 'none'}); distil "
                         "with this run's --gin_file/--gin flags")
    out = []
    for src, tgt in wanted:
        path = train_file(out_dir, src, tgt)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: missing, though {MANIFEST} lists it; rerun "
                                    "`jaxmt distill translate` to assemble it")
        out.append(sources.CorpusSource(path, src, tgt, split="train", format="tsv",
                                        both_directions=False))
    return tuple(out)

