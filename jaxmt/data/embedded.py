"""The embedded 8-language Bible corpus: splits, parallel pairs and the target-language tag.

Pure Python on purpose: the inference path (translator, evaluation) imports this
module and must not pull in TensorFlow or seqio.

The corpus (``embedded/bible8.tsv.gz``, built by :mod:`jaxmt.data.build_embedded`)
has one row per verse, aligned across languages by (book, chapter, verse).

The split is by whole book, so no verse, chapter or narrative of a held-out book is
seen in training. The held-out books mix Old and New Testament and several genres:

* test (1,238 verses): Ruth and Esther (narrative), Ecclesiastes (wisdom), Joel,
  Jonah and Micah (prophets), Romans and 1 Peter (epistles);
* validation (632 verses): Song of Songs (poetry), Lamentations (lament), Nahum and
  Habakkuk (prophets), Philippians, Titus and James (epistles).

The Gospels stay in training: each shares many near-identical verses with the
others, which would leak into a held-out Gospel. Quotations across books (Romans
quotes Psalms and Isaiah) are the one overlap a book split cannot remove.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
from pathlib import Path
from typing import Sequence

from jaxmt.data import signals, sources  # pure Python too: templates, language codes

EMBEDDED_LANGS: tuple[str, ...] = ("en", "de", "fr", "es", "pt", "it", "ru", "ar")
EMBEDDED_PATH = Path(__file__).resolve().parent / "embedded" / "bible8.tsv.gz"
NUM_BOOKS = 66
SPLIT_BOOKS: dict[str, tuple[int, ...]] = {
    # Ruth, Esther, Ecclesiastes, Joel, Jonah, Micah, Romans, 1 Peter.
    "test": (8, 17, 21, 29, 32, 33, 45, 60),
    # Song of Songs, Lamentations, Nahum, Habakkuk, Philippians, Titus, James.
    "validation": (22, 25, 34, 35, 50, 56, 59),
}
SPLITS: tuple[str, ...] = ("train", "validation", "test")

Ref = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class SkipReport:
    """What :func:`parallel_pairs` kept and why it dropped the rest.

    Attributes:
        total: Aligned verses considered.
        kept: Pairs returned.
        skipped: Reason -> count; ``kept + sum(skipped.values()) == total``.
        name: What the report is about, e.g. ``"en-de/train"``.
    """

    total: int
    kept: int
    skipped: dict[str, int]
    name: str = ""

    def summary(self) -> str:
        """One line, e.g. ``en-de/train: kept 27000/27100 (empty_target=100)``."""
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()) if v) or "none"
        prefix = f"{self.name}: " if self.name else ""
        return f"{prefix}kept {self.kept}/{self.total} (skipped: {reasons})"


def lang_tag(lang: str) -> str:
    """The target-language tag, e.g. ``"<2de>"`` or ``"<2pt-BR>"``.

    Any code valid for :func:`jaxmt.data.sources.check_lang_code` has a tag (not only
    the embedded languages): the user's corpora may name any language. Whether a
    vocabulary holds the tag as one piece is :func:`jaxmt.data.vocab.tag_id`'s check.

    Raises:
        ValueError: A malformed code (e.g. ``"english"`` or ``"pt_br"``).
    """
    sources.check_lang_code(lang)
    return f"<2{lang}>"


def tag_source(text: str, tgt_lang: str) -> str:
    """Prefixes a source sentence with its target-language tag: ``"<2de> text"``.

    The template :data:`jaxmt.data.signals.TAG_TEMPLATE` through
    :func:`jaxmt.data.signals.format_source`, the one definition of every source
    signal; the seqio tasks and the translator both call it, so training and
    inference inputs cannot drift apart.
    """
    lang_tag(tgt_lang)  # checks the code
    return signals.format_source(signals.TAG_TEMPLATE, text, None, tgt_lang)


def check_langs(langs: Sequence[str]) -> None:
    """Only for functions that read the embedded corpus: it has these 8 languages."""
    for lang in langs:
        if lang not in EMBEDDED_LANGS:
            raise ValueError(f"unknown language {lang!r}; the embedded corpus has "
                             f"{', '.join(EMBEDDED_LANGS)}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits are {', '.join(SPLITS)}")


def split_of_book(book: int) -> str:
    """Which split a book number (1..66) belongs to."""
    for split, books in SPLIT_BOOKS.items():
        if book in books:
            return split
    return "train"


@functools.lru_cache(maxsize=1)
def _table() -> tuple[tuple[Ref, ...], dict[str, tuple[str, ...]]]:
    """Parses the whole shipped file once per process (about 0.5 s)."""
    with gzip.open(EMBEDDED_PATH, "rt", encoding="utf-8", newline="\n") as f:
        lines = f.read().split("\n")
    header = lines[0].split("\t")
    if header != ["book", "chapter", "verse", *EMBEDDED_LANGS]:
        raise ValueError(f"{EMBEDDED_PATH}: unexpected header {header}")
    rows = [line.split("\t") for line in lines[1:] if line]
    refs = tuple((int(r[0]), int(r[1]), int(r[2])) for r in rows)
    columns = {lang: tuple(r[3 + i] for r in rows) for i, lang in enumerate(EMBEDDED_LANGS)}
    return refs, columns


@functools.lru_cache(maxsize=None)
def _split_indices(split: str) -> tuple[int, ...]:
    refs, _ = _table()
    return tuple(i for i, (book, _, _) in enumerate(refs) if split_of_book(book) == split)


def load_split(split: str, langs: Sequence[str]) -> tuple[list[Ref], dict[str, list[str]]]:
    """Verse references and aligned texts of one split.

    Args:
        split: ``"train"``, ``"validation"`` or ``"test"``.
        langs: Languages to return, any of :data:`EMBEDDED_LANGS`.

    Returns:
        ``(refs, texts)``: refs as (book, chapter, verse), sorted; ``texts[lang][i]`` is
        the verse ``refs[i]`` in ``lang``, or ``""`` where that translation has none.

    Raises:
        ValueError: An unknown split or language; the message lists the valid ones.
    """
    _check_split(split)
    check_langs(langs)
    refs, columns = _table()
    idx = _split_indices(split)
    return [refs[i] for i in idx], {lang: [columns[lang][i] for i in idx] for lang in langs}


def parallel_pairs(src_lang: str, tgt_lang: str,
                   split: str) -> tuple[list[tuple[str, str]], SkipReport]:
    """Aligned (source, target) sentence pairs of one direction and split.

    A verse whose source or target text is empty is skipped and counted under
    ``"empty_source"`` or ``"empty_target"`` (source is checked first).

    Raises:
        ValueError: An unknown split or language, or ``src_lang == tgt_lang``.
    """
    if src_lang == tgt_lang:
        raise ValueError(f"source and target language are both {src_lang!r}")
    _, texts = load_split(split, [src_lang, tgt_lang])
    pairs = []
    skipped = {"empty_source": 0, "empty_target": 0}
    for src, tgt in zip(texts[src_lang], texts[tgt_lang]):
        if not src:
            skipped["empty_source"] += 1
        elif not tgt:
            skipped["empty_target"] += 1
        else:
            pairs.append((src, tgt))
    report = SkipReport(total=len(texts[src_lang]), kept=len(pairs), skipped=skipped,
                        name=f"{src_lang}-{tgt_lang}/{split}")
    return pairs, report
