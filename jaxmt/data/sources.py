"""User parallel corpora: file sources, language codes, and the bad-input checks.

A :class:`CorpusSource` names one file (or one pair of aligned text files) for one
language pair and split. :func:`read_pairs` reads it and yields the clean
``(source, target)`` pairs; every other line is a counted skip in a :class:`Report`,
with its reason and ``file:line``. Both ``jaxmt data validate`` and
:func:`jaxmt.data.tasks.register_corpus` read through :func:`read_pairs`, so a file
that validates is exactly what training sees.

Pure Python on purpose (no seqio, no TensorFlow): ``jaxmt data validate`` must start
in a fraction of a second.

Formats:

* ``tsv``: ``src<TAB>tgt`` per line; ``.tsv`` or ``.tsv.gz``.
* ``jsonl``: one ``{"src": ..., "tgt": ...}`` object per line, optionally with
  ``"src_lang"``/``"tgt_lang"`` that must equal the registered codes; ``.jsonl(.gz)``.
* ``text``: two aligned plain-text files, ``path`` (source) and ``tgt_path`` (target),
  one sentence per line.

Any file may be gzip'd (detected from its first bytes, whatever its name). Lines are
read as bytes, so invalid UTF-8 is caught per line. Not bad input, normalised
silently: a UTF-8 byte-order mark at the start of a file, a CR before the LF (CRLF
files) and whitespace around each side.

Skip reasons, one per line, checked in this order (the first that applies wins):

``invalid_utf8``
    The line is not UTF-8 (or a JSON string holds a lone surrogate).
``bad_json``
    A JSONL line that is not a JSON object with string ``src`` and ``tgt``.
``missing_column``
    A TSV line without a tab, or an aligned text file with no line here (the other
    file is longer; each extra line counts, at the longer file's ``file:line``).
``extra_column``
    A TSV line with more than one tab: a third column, or a tab inside a side.
``bad_lang_code``
    A JSONL ``src_lang``/``tgt_lang`` that is not a valid code or not the registered one.
``empty_side``
    A side that is empty or only whitespace.
``control_chars``
    A side with a C0/C1 control character or DEL (in JSONL, an escaped tab or newline
    counts too).
``too_long``
    A side over :attr:`CleanConfig.max_chars` characters.
``length_ratio``
    Both sides have at least :attr:`CleanConfig.ratio_min_chars` characters and the
    longer is more than :attr:`CleanConfig.max_length_ratio` times the shorter.
``duplicate``
    An exact repeat of an earlier kept pair (with :attr:`CleanConfig.dedup`).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import itertools
import json
import os
import re
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from jaxmt.fileio import write_atomic

REASONS: tuple[str, ...] = (
    "invalid_utf8", "bad_json", "missing_column", "extra_column", "bad_lang_code",
    "empty_side", "control_chars", "too_long", "length_ratio", "duplicate")
FORMATS: tuple[str, ...] = ("auto", "tsv", "jsonl", "text")
REPORT_STEM = "data_report"  # <model_dir>/data_report.json and .txt

# language (2-3 letters) [-Script (4, Titlecase)] [-REGION (2 upper letters or 3 digits)]
_LANG_RE = re.compile(r"[a-z]{2,3}(-[A-Z][a-z]{3})?(-(?:[A-Z]{2}|[0-9]{3}))?")
_SPLIT_RE = re.compile(r"[A-Za-z0-9_]+")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc
_SURROGATE_RE = re.compile(r"[\ud800-\udfff]")
_EXCERPT_CHARS = 80
_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


# ---------------------------------------------------------------- language codes

def lang_code_error(code: Any) -> str | None:
    """Why ``code`` is not a valid language code, or None when it is.

    Valid is the BCP-47 subset ``language[-Script][-REGION]`` in canonical case:
    ``en``, ``pt-BR``, ``zh-Hans``, ``zh-Hant-TW``, ``es-419``. The check is on form
    only; no registry of assigned codes is consulted.
    """
    if not isinstance(code, str) or not code:
        return f"language code must be a non-empty string, got {code!r}"
    if _LANG_RE.fullmatch(code):
        return None
    msg = (f"invalid language code {code!r}: expected language[-Script][-REGION], e.g. "
           "'en', 'pt-BR', 'zh-Hans', 'zh-Hant-TW', 'es-419'")
    guess = _canonical_case(code)
    if guess != code and _LANG_RE.fullmatch(guess):
        msg += f"; did you mean {guess!r}?"
    return msg


def check_lang_code(code: Any) -> str:
    """Returns ``code`` if valid (see :func:`lang_code_error`).

    Raises:
        ValueError: The code is malformed; the message says why and, when only case
            or ``_`` is off, suggests the canonical spelling.
    """
    err = lang_code_error(code)
    if err:
        raise ValueError(err)
    return code


def _canonical_case(code: str) -> str:
    parts = code.replace("_", "-").split("-")
    out = [parts[0].lower()]
    for p in parts[1:]:
        out.append(p.title() if len(p) == 4 else p.upper())
    return "-".join(out)


# ---------------------------------------------------------------- configuration

@dataclasses.dataclass(frozen=True)
class CorpusSource:
    """One parallel corpus file (or aligned pair of files) for one language pair and split.

    Attributes:
        path: The TSV/JSONL file, or the source-side text file when ``tgt_path`` is set.
        src_lang: Language of the first column / ``src`` field / ``path``.
        tgt_lang: Language of the second column / ``tgt`` field / ``tgt_path``.
        split: Split name the pairs belong to (``train``, ``validation``, ``test``...).
        format: ``auto`` (from the suffix: ``.tsv``, ``.jsonl``, optionally ``.gz``; or
            ``text`` when ``tgt_path`` is given), ``tsv``, ``jsonl`` or ``text``.
        tgt_path: Target-side text file, aligned line by line with ``path``.
        both_directions: Train ``tgt -> src`` from the same pairs as well.
    """

    path: str
    src_lang: str
    tgt_lang: str
    split: str = "train"
    format: str = "auto"
    tgt_path: str | None = None
    both_directions: bool = True

    def __post_init__(self):
        # Strings, not Paths, so the source serialises to JSON with the run config.
        for field in ("path", "tgt_path"):
            value = getattr(self, field)
            if value is None and field == "tgt_path":
                continue
            if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
                raise ValueError(f"CorpusSource.{field}: must be a non-empty path, got "
                                 f"{value!r}")
            object.__setattr__(self, field, os.fspath(value))
        if not isinstance(self.both_directions, bool):
            raise ValueError(f"CorpusSource.both_directions: must be True or False, got "
                             f"{self.both_directions!r}")
        for field in ("src_lang", "tgt_lang"):
            err = lang_code_error(getattr(self, field))
            if err:
                raise ValueError(f"CorpusSource.{field}: {err}")
        if self.src_lang == self.tgt_lang:
            raise ValueError(f"CorpusSource: source and target language are both "
                             f"{self.src_lang!r}")
        if not isinstance(self.split, str) or not _SPLIT_RE.fullmatch(self.split):
            raise ValueError(f"CorpusSource.split: {self.split!r} must be letters, digits "
                             "or '_', e.g. 'train'")
        if self.format not in FORMATS:
            raise ValueError(f"CorpusSource.format: unknown format {self.format!r}; "
                             f"choose one of {FORMATS}")
        if (self.format == "text") != (self.tgt_path is not None) and self.format != "auto":
            raise ValueError(f"CorpusSource: format {self.format!r} with tgt_path="
                             f"{self.tgt_path!r}; aligned text files need format 'text' "
                             "(or 'auto') and tgt_path, the other formats no tgt_path")
        self.resolved_format  # noqa: B018  (an unknown suffix fails here, not mid-run)

    @property
    def resolved_format(self) -> str:
        """``tsv``, ``jsonl`` or ``text``: ``format`` with ``auto`` resolved."""
        if self.format != "auto":
            return self.format
        if self.tgt_path is not None:
            return "text"
        name = self.path.lower().removesuffix(".gz")
        for fmt in ("tsv", "jsonl"):
            if name.endswith("." + fmt):
                return fmt
        raise ValueError(f"{self.path}: cannot tell the format from the name; use a .tsv, "
                         ".tsv.gz, .jsonl or .jsonl.gz suffix, pass format='tsv' or "
                         "'jsonl', or tgt_path for aligned text files")

    @property
    def name(self) -> str:
        """``"en-de/train"``: what the source's report is about."""
        return f"{self.src_lang}-{self.tgt_lang}/{self.split}"


def as_sources(items: Iterable[CorpusSource | Mapping[str, Any]]) -> tuple[CorpusSource, ...]:
    """CorpusSources from sources or dicts of their fields (as gin or JSON give them).

    Raises:
        ValueError: A dict with an unknown or missing field, or an invalid source.
    """
    fields = {f.name for f in dataclasses.fields(CorpusSource)}
    out = []
    for i, item in enumerate(items):
        if isinstance(item, CorpusSource):
            out.append(item)
            continue
        if not isinstance(item, Mapping):
            raise ValueError(f"corpus {i}: expected a CorpusSource or a dict, got {item!r}")
        unknown = sorted(set(item) - fields)
        if unknown:
            raise ValueError(f"corpus {i}: unknown field(s) {unknown}; fields are "
                             f"{sorted(fields)}")
        try:
            out.append(CorpusSource(**item))
        except TypeError as e:  # a missing required field
            raise ValueError(f"corpus {i}: {e}") from None
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class CleanConfig:
    """Limits of the bad-input checks, and what to do on a bad record.

    Attributes:
        max_chars: Longest side kept, in characters (after trimming whitespace).
        max_length_ratio: Longest allowed ratio of the longer side's length to the
            shorter's, in characters; None disables the check. 3.0 flags 27 of the
            29,232 en-ru pairs of the embedded Bible and 4 of the en-de pairs.
        ratio_min_chars: The ratio is checked only when both sides are at least this
            long, so short pairs (``"Yes."`` / ``"Ja, gewiss."``) are not flagged.
        dedup: Skip exact repeats of a kept pair (in either orientation).
        strict: Raise :class:`BadRecordError` at the first bad record instead of
            skipping it.
        max_examples: Skipped lines per reason quoted in the report.
    """

    max_chars: int = 1000
    max_length_ratio: float | None = 3.0
    ratio_min_chars: int = 10
    dedup: bool = True
    strict: bool = False
    max_examples: int = 5

    def __post_init__(self):
        def is_int(v):  # bool is an int to Python, not here
            return isinstance(v, int) and not isinstance(v, bool)

        if not (is_int(self.max_chars) and self.max_chars > 0):
            raise ValueError(f"CleanConfig.max_chars: must be a positive integer, got "
                             f"{self.max_chars!r}")
        ratio = self.max_length_ratio
        if ratio is not None and not (isinstance(ratio, (int, float)) and not isinstance(
                ratio, bool) and 1.0 <= ratio < float("inf")):
            raise ValueError(f"CleanConfig.max_length_ratio: must be a number >= 1 or None, "
                             f"got {ratio!r}")
        if not (is_int(self.ratio_min_chars) and self.ratio_min_chars >= 1):
            raise ValueError(f"CleanConfig.ratio_min_chars: must be a positive integer, "
                             f"got {self.ratio_min_chars!r}")
        if not (is_int(self.max_examples) and self.max_examples >= 0):
            raise ValueError(f"CleanConfig.max_examples: must be >= 0, got "
                             f"{self.max_examples!r}")
        for field in ("dedup", "strict"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"CleanConfig.{field}: must be True or False, got "
                                 f"{getattr(self, field)!r}")


# ---------------------------------------------------------------- report

@dataclasses.dataclass(frozen=True)
class Skip:
    """One skipped line: why, where, and what it looked like."""

    reason: str
    path: str
    line: int
    detail: str
    excerpt: str

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}: {self.detail}: \"{self.excerpt}\""


class BadRecordError(ValueError):
    """A bad record in strict mode; the message has ``file:line``, reason and excerpt."""

    def __init__(self, skip: Skip):
        super().__init__(f"{skip} (strict mode; without it this line would be skipped "
                         "and counted)")
        self.skip = skip


@dataclasses.dataclass
class Report:
    """What :func:`read_pairs` kept and skipped, by reason, with the first examples.

    ``kept + sum(skipped.values()) == total`` always holds: nothing is dropped
    uncounted. One report may gather several files (every example has its file).
    Its ``summary()`` has the shape of :meth:`jaxmt.data.embedded.SkipReport.summary`.
    """

    name: str = ""
    max_examples: int = 5
    total: int = 0
    kept: int = 0
    skipped: dict[str, int] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(REASONS, 0))
    examples: dict[str, list[Skip]] = dataclasses.field(default_factory=dict)
    files: list[str] = dataclasses.field(default_factory=list)

    def add_kept(self) -> None:
        self.total += 1
        self.kept += 1

    def add_skip(self, skip: Skip) -> None:
        self.total += 1
        self.skipped[skip.reason] += 1
        shown = self.examples.setdefault(skip.reason, [])
        if len(shown) < self.max_examples:
            shown.append(skip)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One line, e.g. ``en-de/train: kept 990/1000 (skipped: duplicate=10)``."""
        reasons = ", ".join(f"{k}={v}" for k, v in self.skipped.items() if v) or "none"
        prefix = f"{self.name}: " if self.name else ""
        return f"{prefix}kept {self.kept}/{self.total} (skipped: {reasons})"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "files": list(self.files), "total": self.total,
                "kept": self.kept, "skipped": dict(self.skipped),
                "examples": {r: [{"where": s.where, "detail": s.detail, "excerpt": s.excerpt}
                                 for s in shown] for r, shown in self.examples.items()}}

    def format_text(self) -> str:
        """A table of counts by reason, then the first skipped lines per reason."""
        lines = [self.summary(), *(f"  file {f}" for f in self.files),
                 f"  {'reason':<16}{'lines':>9}", f"  {'kept':<16}{self.kept:>9}"]
        lines += [f"  {r:<16}{n:>9}" for r, n in self.skipped.items()]
        lines.append(f"  {'total':<16}{self.total:>9}")
        if self.examples:
            lines.append("  first skipped lines:")
        for reason in REASONS:
            for s in self.examples.get(reason, ()):
                lines.append(f"    {reason:<15} {s.where}  {s.detail}: \"{s.excerpt}\"")
        return "\n".join(lines)


def write_reports(directory: str | Path, reports: Iterable[Report],
                  stem: str = REPORT_STEM) -> Path:
    """Writes ``<stem>.json`` (totals plus every report) and a readable ``<stem>.txt``.

    Both files are replaced atomically, so a crash never leaves a half-written report.

    Returns:
        The JSON file's path.
    """
    reports = list(reports)
    totals = {"total": sum(r.total for r in reports), "kept": sum(r.kept for r in reports),
              "skipped": {k: sum(r.skipped[k] for r in reports) for k in REASONS}}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = "\n\n".join(r.format_text() for r in reports) + "\n"
    write_atomic(directory / f"{stem}.txt", text)
    out = directory / f"{stem}.json"
    write_atomic(out, json.dumps({**totals, "reports": [r.to_dict() for r in reports]},
                                  indent=2, ensure_ascii=False) + "\n")
    return out


# ---------------------------------------------------------------- reading

class _Bad(Exception):
    """Internal: one line's skip reason; ``side`` (0, 1, or None for both) picks the
    file and the excerpt of an aligned pair."""

    def __init__(self, reason: str, detail: str, side: int | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.side = reason, detail, side


def read_pairs(source: CorpusSource, limits: CleanConfig | None = None,
               report: Report | None = None,
               seen: set[bytes] | None = None) -> Iterator[tuple[str, str]]:
    """Yields the clean ``(src, tgt)`` pairs of ``source``, in file order.

    Every line is either yielded or counted in ``report`` under one reason of
    :data:`REASONS` (see the module docstring for the checks).

    Args:
        source: The corpus to read.
        limits: Check limits and strictness (default :class:`CleanConfig()`).
        report: Gathers the counts and examples; pass one to see them.
        seen: Dedup keys of pairs already kept, shared across calls to also drop
            repeats across files (e.g. all files of one language pair and split).
            A fresh set per call when None.

    Raises:
        BadRecordError: ``limits.strict`` and a bad line (after counting it).
        FileNotFoundError: A file is missing.
        ValueError: A file is unreadable as a whole (e.g. a truncated gzip).
    """
    limits = limits or CleanConfig()
    if report is None:
        report = Report(name=source.name, max_examples=limits.max_examples)
    if seen is None:
        seen = set()
    fmt = source.resolved_format
    paths = (source.path, source.tgt_path) if fmt == "text" else (source.path, source.path)
    for p in dict.fromkeys(paths):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: no such corpus file ({source.name})")
        if p not in report.files:
            report.files.append(p)
    records = {"tsv": _tsv_records, "jsonl": _jsonl_records, "text": _text_records}[fmt]
    # The dedup key orders the pair by language, so en-de and de-en files share keys.
    flip = source.src_lang > source.tgt_lang
    for line_no, raw, record in records(source):
        try:
            if isinstance(record, _Bad):
                raise record
            src, tgt = _check_pair(*record, limits)
            if limits.dedup:
                a, b = (tgt, src) if flip else (src, tgt)
                key = hashlib.blake2b(f"{a}\0{b}".encode(), digest_size=16).digest()
                if key in seen:
                    raise _Bad("duplicate", "repeats an earlier pair")
                seen.add(key)
        except _Bad as bad:
            if isinstance(raw, tuple):  # aligned text files: the bad side, or both
                raw = raw[bad.side] if bad.side is not None else b" ||| ".join(raw)
            skip = Skip(bad.reason, paths[bad.side or 0], line_no, bad.detail, _excerpt(raw))
            report.add_skip(skip)
            if limits.strict:
                raise BadRecordError(skip) from None
            continue
        report.add_kept()
        yield src, tgt


def direction_pairs(corpus: Iterable[CorpusSource], src_lang: str, tgt_lang: str,
                    split: str, limits: CleanConfig | None = None
                    ) -> tuple[list[tuple[str, str]], Report]:
    """Every clean ``(src_lang, tgt_lang)`` pair of ``split`` in ``corpus``, read with the
    training checks: files of the pair in either orientation (a ``tgt -> src`` source
    is flipped), deduplicated together. For evaluation and reports.

    Raises:
        ValueError: No source of ``split`` has this language pair.
    """
    limits = limits or CleanConfig()
    report = Report(name=f"{src_lang}-{tgt_lang}/{split}", max_examples=limits.max_examples)
    seen: set[bytes] = set()
    pairs, found = [], False
    for s in corpus:
        if s.split != split or {s.src_lang, s.tgt_lang} != {src_lang, tgt_lang}:
            continue
        found = True
        flip = s.src_lang != src_lang
        pairs += [(b, a) if flip else (a, b) for a, b in read_pairs(s, limits, report, seen)]
    if not found:
        raise ValueError(f"no {split!r} corpus for {src_lang}-{tgt_lang}; add a CorpusSource "
                         f"with split={split!r} for this language pair")
    return pairs, report


def _check_pair(src: str, tgt: str, limits: CleanConfig) -> tuple[str, str]:
    """The checks shared by every format, on the two decoded sides."""
    sides = [src.strip(), tgt.strip()]
    for i, s in enumerate(sides):
        if not s:
            raise _Bad("empty_side", f"{('source', 'target')[i]} side is empty", i)
    for i, s in enumerate((src, tgt)):
        m = _CONTROL_RE.search(s)
        if m:
            raise _Bad("control_chars", f"{('source', 'target')[i]} side has control "
                       f"character U+{ord(m.group()):04X} at column {m.start() + 1}", i)
    for i, s in enumerate(sides):
        if len(s) > limits.max_chars:
            raise _Bad("too_long", f"{('source', 'target')[i]} side has {len(s)} characters "
                       f"> max_chars {limits.max_chars}", i)
    short, long_ = sorted(len(s) for s in sides)
    if (limits.max_length_ratio is not None and short >= limits.ratio_min_chars
            and long_ > limits.max_length_ratio * short):
        raise _Bad("length_ratio", f"lengths {len(sides[0])} and {len(sides[1])} characters, "
                   f"ratio {long_ / short:.2f} > {limits.max_length_ratio}")
    return sides[0], sides[1]


# (line number, raw line (both lines for aligned files), the two sides or why not)
Record = tuple[int, "bytes | tuple[bytes, bytes]", "tuple[str, str] | _Bad"]


def _tsv_records(source: CorpusSource) -> Iterator[Record]:
    for line_no, raw in _lines(source.path):
        text = _decode(raw)
        if isinstance(text, _Bad):
            yield line_no, raw, text
            continue
        cols = text.split("\t")
        if len(cols) < 2:
            yield line_no, raw, _Bad("missing_column", "no tab: expected src<TAB>tgt")
        elif len(cols) > 2:
            yield line_no, raw, _Bad("extra_column", f"{len(cols)} tab-separated columns, "
                                     "expected 2 (a tab inside a side?)")
        else:
            yield line_no, raw, (cols[0], cols[1])


def _jsonl_records(source: CorpusSource) -> Iterator[Record]:
    for line_no, raw in _lines(source.path):
        text = _decode(raw)
        if not isinstance(text, _Bad):
            text = _json_pair(text, source)
        yield line_no, raw, text


def _json_pair(text: str, source: CorpusSource) -> tuple[str, str] | _Bad:
    try:
        obj = json.loads(text)
    except ValueError as e:
        return _Bad("bad_json", f"not JSON ({e.msg} at column {getattr(e, 'colno', '?')})")
    if not isinstance(obj, dict):
        return _Bad("bad_json", f"a JSON {type(obj).__name__}, expected an object with "
                    "'src' and 'tgt'")
    for i, key in enumerate(("src", "tgt")):
        if not isinstance(obj.get(key), str):
            what = "missing" if key not in obj else f"a {type(obj[key]).__name__}"
            return _Bad("bad_json", f"{key!r} is {what}, expected a string", i)
        m = _SURROGATE_RE.search(obj[key])
        if m:
            return _Bad("invalid_utf8", f"{key!r} has a lone surrogate "
                        f"U+{ord(m.group()):04X}", i)
    for i, (key, want) in enumerate((("src_lang", source.src_lang),
                                     ("tgt_lang", source.tgt_lang))):
        if key in obj and obj[key] != want:
            err = lang_code_error(obj[key])
            return _Bad("bad_lang_code", f"{key}: {err}" if err else
                        f"{key} {obj[key]!r} is not the registered {want!r}", i)
    return obj["src"], obj["tgt"]


def _text_records(source: CorpusSource) -> Iterator[Record]:
    names = ("source", "target")
    for (n, a), (_, b) in _zip_lines(_lines(source.path), _lines(source.tgt_path)):
        if a is None or b is None:
            have = 0 if b is None else 1
            yield n, (a, b), _Bad(
                "missing_column", f"the {names[1 - have]} file has no line {n} "
                f"(the {names[have]} file is longer)", have)
            continue
        texts = [_decode(a), _decode(b)]
        for i, t in enumerate(texts):
            if isinstance(t, _Bad):
                t.side = i
                yield n, (a, b), t
                break
        else:
            yield n, (a, b), (texts[0], texts[1])


def _zip_lines(a: Iterator[tuple[int, bytes]], b: Iterator[tuple[int, bytes]]):
    """Pairs two numbered line streams; the shorter one is padded with ``(n, None)``."""
    for x, y in itertools.zip_longest(a, b):
        n = (x or y)[0]
        yield (n, x[1] if x else None), (n, y[1] if y else None)


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
    """``(line_number, raw_line)`` from 1, without the LF (or CRLF); gzip transparently."""
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    _check_text(path, gz)
    n = 0
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            for n, line in enumerate(f, start=1):
                if n == 1 and line.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
                    line = line[3:]
                if line.endswith(b"\n"):
                    line = line[:-1]
                if line.endswith(b"\r"):  # CRLF line ends are not bad input
                    line = line[:-1]
                yield n, line
    except (OSError, EOFError, zlib.error) as e:
        # The whole file, not one line: a truncated or corrupt gzip stops the read.
        raise ValueError(f"{path}: unreadable after line {n} ({e}); is the gzip file "
                         "complete?") from e


def _check_text(path: str, gz: bool, sniff: int = 8192) -> None:
    """Raises ValueError when the file's first ``sniff`` bytes (after gunzip) are mostly
    not text: binary data (an executable, a model file) or another encoding than UTF-8
    (UTF-16, a legacy code page). A few bad lines in a text file are counted, not this."""
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            head = f.read(sniff)
    except (OSError, EOFError, zlib.error):
        return  # the read itself reports it
    text = head.decode("utf-8", "replace")
    bad = sum(1 for c in text if c == "\ufffd" or (c < " " and c not in "\t\n\r\f\v\x1b"))
    if bad >= 16 and bad > 0.3 * len(text):
        raise ValueError(f"{path}: not a UTF-8 text corpus ({bad} of its first {len(text)} "
                         "characters are NUL, control or non-UTF-8 bytes: binary data or "
                         "another encoding); pass a UTF-8 TSV, JSONL or text file")


def _decode(raw: bytes) -> str | _Bad:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return _Bad("invalid_utf8", f"byte 0x{raw[e.start]:02x} at byte offset {e.start} "
                    "is not UTF-8")


def _excerpt(raw: bytes | str) -> str:
    """The start of a line, readable: bad bytes and control characters escaped."""
    text = raw.decode("utf-8", "backslashreplace") if isinstance(raw, bytes) else raw
    cut = text[:_EXCERPT_CHARS] + ("..." if len(text) > _EXCERPT_CHARS else "")
    return _CONTROL_RE.sub(
        lambda m: _ESCAPES.get(m.group(), f"\\x{ord(m.group()):02x}"), cut)
