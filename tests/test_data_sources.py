"""User corpora: formats, language codes, every bad-input reason, strict mode, the
`jaxmt data validate` command, and seqio Tasks registered from files."""

import gzip
import json
import re
import subprocess
import sys

import pytest

from jaxmt import cli
from jaxmt.data import embedded, sources

LONG = "x" * 1001  # over the default max_chars
RATIO = "A reasonably long sentence that keeps on going and going."  # 57 chars vs 10

# Each file: (raw line, expected reason or None for kept). One line per reason the
# format can produce, plus good lines, a CRLF line and a duplicate.
TSV = [
    (b"Hello world.\tHallo Welt.", None),
    (b"Bad \xff byte\tSchlecht", "invalid_utf8"),
    (b"no tab at all", "missing_column"),
    (b"one\ttwo\tthree", "extra_column"),
    (b"   \tnur Ziel", "empty_side"),
    (b"bell\x07 here\tKlingel", "control_chars"),
    (LONG.encode() + b"\ty", "too_long"),
    (RATIO.encode() + b"\tKurz hier.", "length_ratio"),
    (b"Hello world.\tHallo Welt.", "duplicate"),
    (b"Good morning.\tGuten Morgen.\r", None),  # CRLF is not bad input
    (b"  Thanks.  \tDanke.", None),  # whitespace around a side is trimmed
    (b"", "missing_column"),  # a blank line
    ("Grüße aus Köln.\tGreetings from Cologne.".encode(), None),
]


def _j(**obj) -> bytes:
    return json.dumps(obj).encode()


JSONL = [
    (_j(src="Hello world.", tgt="Hallo Welt."), None),
    (b'{"src": "Bad \xff", "tgt": "x"}', "invalid_utf8"),
    (b"not json", "bad_json"),
    (b'["Hello", "Hallo"]', "bad_json"),
    (_j(src="only a source"), "bad_json"),
    (_j(src="Hello", tgt=7), "bad_json"),
    (_j(src="Hello.", tgt="Bonjour.", tgt_lang="fr"), "bad_lang_code"),
    (_j(src="Hello.", tgt="Hallo.", src_lang="EN"), "bad_lang_code"),
    (_j(src="", tgt="leer"), "empty_side"),
    (_j(src="tab\there", tgt="Tab hier"), "control_chars"),  # an escaped tab in JSON
    (_j(src="lone \ud800", tgt="x"), "invalid_utf8"),
    (_j(src="y", tgt=LONG), "too_long"),
    (_j(src=RATIO, tgt="Kurz hier."), "length_ratio"),
    (_j(src="Hello world.", tgt="Hallo Welt."), "duplicate"),
    (_j(src="With codes.", tgt="Mit Codes.", src_lang="en", tgt_lang="de"), None),
]

# Aligned text files: (source line, target line, reason, which file the skip names).
TEXT = [
    (b"Hello world.", b"Hallo Welt.", None, None),
    (b"Bad \xff", b"Schlecht", "invalid_utf8", "src"),
    (b"Good", b"\xfe bad", "invalid_utf8", "tgt"),
    (b"", b"leer", "empty_side", "src"),
    (b"Tab\tinside", b"Tab drin", "control_chars", "src"),  # a tab is a control char here
    (b"Hello world.", b"Hallo Welt.", "duplicate", "src"),
    (b"Last pair.", b"Letztes Paar.", None, None),
    (None, b"extra target line", "missing_column", "tgt"),
    (None, b"another extra", "missing_column", "tgt"),
]


def _write(path, lines, gz=False):
    data = b"".join(line + b"\n" for line in lines)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _expected(reasons):
    counts = dict.fromkeys(sources.REASONS, 0)
    first = {}
    for n, r in enumerate(reasons, start=1):
        if r:
            counts[r] += 1
            first.setdefault(r, n)
    return counts, first


def _read(source, **limits):
    report = sources.Report(source.name)
    pairs = list(sources.read_pairs(source, sources.CleanConfig(**limits), report))
    assert report.kept == len(pairs)
    assert report.kept + sum(report.skipped.values()) == report.total  # nothing unreported
    return pairs, report


@pytest.mark.parametrize("name,gz", [("c.tsv", False), ("c.tsv.gz", True),
                                     ("gz_content_plain_name.tsv", True)])
def test_tsv_counts_every_reason_at_its_line(tmp_path, name, gz):
    path = _write(tmp_path / name, [line for line, _ in TSV], gz=gz)
    pairs, report = _read(sources.CorpusSource(path, "en", "de"))
    counts, first = _expected([r for _, r in TSV])
    assert report.total == len(TSV) and report.kept == 4
    assert report.skipped == counts
    for reason, line in first.items():
        assert report.examples[reason][0].where == f"{path}:{line}", reason
    assert pairs == [("Hello world.", "Hallo Welt."), ("Good morning.", "Guten Morgen."),
                     ("Thanks.", "Danke."), ("Grüße aus Köln.", "Greetings from Cologne.")]
    assert "duplicate=1" in report.summary() and "kept 4/13" in report.summary()


def test_jsonl_counts_every_reason_at_its_line(tmp_path):
    path = _write(tmp_path / "c.jsonl.gz", [line for line, _ in JSONL], gz=True)
    pairs, report = _read(sources.CorpusSource(path, "en", "de"))
    counts, first = _expected([r for _, r in JSONL])
    assert report.skipped == counts and report.total == len(JSONL)
    assert pairs == [("Hello world.", "Hallo Welt."), ("With codes.", "Mit Codes.")]
    for reason, line in first.items():
        assert report.examples[reason][0].where == f"{path}:{line}", reason
    details = {r: e[0].detail for r, e in report.examples.items()}
    assert "'fr' is not the registered 'de'" in details["bad_lang_code"]
    assert [e.detail for e in report.examples["bad_lang_code"]][1].startswith(
        "src_lang: invalid language code 'EN'")


def test_aligned_text_files_name_the_file_of_the_bad_line(tmp_path):
    src = _write(tmp_path / "c.en", [a for a, *_ in TEXT if a is not None])
    tgt = _write(tmp_path / "c.de", [b for _, b, *_ in TEXT], gz=True)
    pairs, report = _read(sources.CorpusSource(src, "en", "de", tgt_path=tgt))
    counts, _ = _expected([r for *_, r, _ in TEXT])
    assert report.skipped == counts and report.total == len(TEXT)
    assert pairs == [("Hello world.", "Hallo Welt."), ("Last pair.", "Letztes Paar.")]
    where = [s.where for shown in report.examples.values() for s in shown]
    expected = [f"{src if side == 'src' else tgt}:{n}"
                for n, (*_, r, side) in enumerate(TEXT, start=1) if r]
    assert sorted(where) == sorted(expected)


def test_strict_mode_stops_at_the_first_bad_record(tmp_path):
    path = _write(tmp_path / "c.tsv", [line for line, _ in TSV])
    with pytest.raises(sources.BadRecordError, match=rf"{path}:2: invalid_utf8: .*Bad \\xff") as e:
        _read(sources.CorpusSource(path, "en", "de"), strict=True)
    assert e.value.skip.line == 2 and isinstance(e.value, ValueError)
    src = _write(tmp_path / "s.en", [b"ok one", b"ok two"])
    tgt = _write(tmp_path / "s.de", [b"gut eins", b"zwei\x00"])
    with pytest.raises(sources.BadRecordError, match=rf"{tgt}:2: control_chars"):
        _read(sources.CorpusSource(src, "en", "de", tgt_path=tgt), strict=True)


def test_limits_and_dedup_are_configurable(tmp_path):
    path = _write(tmp_path / "c.tsv", [line for line, _ in TSV])
    source = sources.CorpusSource(path, "en", "de")
    _, loose = _read(source, dedup=False, max_chars=2000, max_length_ratio=None)
    assert loose.kept == 7 and not loose.skipped["duplicate"] + loose.skipped["too_long"]
    _, tight = _read(source, max_length_ratio=1.2)  # also "Grüße ..." (15 vs 23 chars)
    assert tight.skipped["length_ratio"] == 2
    with pytest.raises(ValueError, match="CleanConfig.max_chars"):
        sources.CleanConfig(max_chars=0)


def test_duplicates_across_files_and_orientations_share_one_seen_set(tmp_path):
    a = _write(tmp_path / "a.tsv", [b"Hello.\tHallo.", b"Yes.\tJa."])
    b = _write(tmp_path / "b.tsv", [b"Hallo.\tHello.", b"Nein.\tNo."])  # de-en
    seen, report = set(), sources.Report()
    kept = [p for s in (sources.CorpusSource(a, "en", "de"), sources.CorpusSource(b, "de", "en"))
            for p in sources.read_pairs(s, None, report, seen)]
    assert kept == [("Hello.", "Hallo."), ("Yes.", "Ja."), ("Nein.", "No.")]
    assert report.examples["duplicate"][0].where == f"{b}:1"


@pytest.mark.parametrize("code", ["en", "de", "pt-BR", "zh-Hans", "zh-Hant-TW", "es-419",
                                  "yue", "sr-Latn"])
def test_valid_language_codes(code):
    assert sources.check_lang_code(code) == code


@pytest.mark.parametrize("code,hint", [("english", None), ("EN_us", "en-US"), ("", None),
                                       ("pt_br", "pt-BR"), ("zh-hans", "zh-Hans"),
                                       ("e", None), (None, None), ("en-", None)])
def test_invalid_language_codes_are_clear_errors(code, hint):
    with pytest.raises(ValueError, match="language code") as e:
        sources.check_lang_code(code)
    assert (f"did you mean {hint!r}" in str(e.value)) == (hint is not None)


def test_corpus_source_rejects_bad_definitions(tmp_path):
    with pytest.raises(ValueError, match=r"tgt_lang.*did you mean 'pt-BR'"):
        sources.CorpusSource("a.tsv", "en", "pt_BR")
    with pytest.raises(ValueError, match="both 'en'"):
        sources.CorpusSource("a.tsv", "en", "en")
    with pytest.raises(ValueError, match="cannot tell the format"):
        sources.CorpusSource("a.csv", "en", "de")
    with pytest.raises(ValueError, match="tgt_path"):
        sources.CorpusSource("a.txt", "en", "de", format="text")
    with pytest.raises(ValueError, match="split"):
        sources.CorpusSource("a.tsv", "en", "de", split="dev set")
    assert sources.CorpusSource("a.en", "en", "de", tgt_path="a.de").resolved_format == "text"
    assert sources.CorpusSource("a.txt", "en", "de", format="jsonl").resolved_format == "jsonl"
    got = sources.as_sources([{"path": "a.tsv", "src_lang": "en", "tgt_lang": "de"}])
    assert got == (sources.CorpusSource("a.tsv", "en", "de"),)
    with pytest.raises(ValueError, match="unknown field"):
        sources.as_sources([{"path": "a.tsv", "src_lang": "en", "tgt_lang": "de", "lang": 1}])
    with pytest.raises(FileNotFoundError, match="no such corpus file"):
        list(sources.read_pairs(sources.CorpusSource(tmp_path / "none.tsv", "en", "de")))


def test_truncated_gzip_is_a_file_error_not_a_skip(tmp_path):
    data = gzip.compress(b"".join(b"Hello %d.\tHallo %d.\n" % (i, i) for i in range(2000)))
    path = tmp_path / "cut.tsv.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut.tsv.gz: unreadable after line \d+"):
        list(sources.read_pairs(sources.CorpusSource(path, "en", "de")))


def test_report_files_are_written(tmp_path):
    path = _write(tmp_path / "c.tsv", [line for line, _ in TSV])
    _, report = _read(sources.CorpusSource(path, "en", "de"))
    out = sources.write_reports(tmp_path / "model", [report, report])
    data = json.loads(out.read_text())
    assert data["total"] == 2 * len(TSV) and data["skipped"]["duplicate"] == 2
    assert data["reports"][0]["examples"]["too_long"][0]["where"] == f"{path}:7"
    assert data["reports"][0]["examples"]["too_long"][0]["excerpt"].endswith("x...")
    text = (tmp_path / "model" / "data_report.txt").read_text()
    assert f"{path}:6" in text and "\\x07" in text


def _validate(capsys, *args):
    rc = cli.main(["data", "validate", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_validate_cli_json_gives_exact_counts(tmp_path, capsys):
    path = _write(tmp_path / "mixed.jsonl", [line for line, _ in JSONL])
    rc, out, _ = _validate(capsys, "--src_lang=en", "--tgt_lang=de", path, "--json",
                           f"--report_dir={tmp_path / 'r'}")
    last = json.loads(out.strip().splitlines()[-1])
    counts, _ = _expected([r for _, r in JSONL])
    assert rc == 0
    assert last == {"file": str(path), "tgt_file": None, "format": "jsonl", "src_lang": "en",
                    "tgt_lang": "de", "total": len(JSONL), "kept": 2, "skipped": counts}
    assert json.loads((tmp_path / "r" / "data_report.json").read_text())["kept"] == 2


def test_validate_cli_human_output_and_text_pairs(tmp_path, capsys):
    src = _write(tmp_path / "c.en", [a for a, *_ in TEXT if a is not None])
    tgt = _write(tmp_path / "c.de", [b for _, b, *_ in TEXT])
    rc, out, _ = _validate(capsys, "--src_lang=en", "--tgt_lang=de", src, f"--tgt_file={tgt}")
    assert rc == 0
    assert "kept 2/9" in out and f"{tgt}:3" in out and f"{src}:2" in out
    assert re.search(r"missing_column +2\n", out)


def test_validate_cli_strict_and_bad_arguments(tmp_path, capsys):
    path = _write(tmp_path / "c.tsv", [line for line, _ in TSV])
    rc, out, err = _validate(capsys, "--src_lang=en", "--tgt_lang=de", path, "--strict",
                             "--json")
    assert rc == 1 and f"{path}:2: invalid_utf8" in err
    last = json.loads(out.strip().splitlines()[-1])
    assert last["total"] == 2 and last["skipped"]["invalid_utf8"] == 1 and "error" in last
    with pytest.raises(SystemExit, match="did you mean 'en-US'"):
        _validate(capsys, "--src_lang=EN_us", "--tgt_lang=de", path)
    with pytest.raises(SystemExit, match="no such corpus file"):
        _validate(capsys, "--src_lang=en", "--tgt_lang=de", tmp_path / "none.tsv")
    rc, out, _ = _validate(capsys, "--src_lang=en", "--tgt_lang=de", path, "--json",
                           "--no_dedup", "--max_chars=5000", "--max_length_ratio=0")
    assert json.loads(out.strip().splitlines()[-1])["kept"] == 7


def test_validate_does_not_import_tensorflow(tmp_path):
    path = _write(tmp_path / "c.tsv", [line for line, _ in TSV])
    code = ("import sys; from jaxmt import cli; "
            f"rc = cli.main(['data', 'validate', '--src_lang=en', '--tgt_lang=de', {str(path)!r}, "
            "'--json']); bad = [m for m in ('tensorflow', 'seqio', 'jax') if m in sys.modules]; "
            "assert rc == 0 and not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


# ---------------------------------------------------------------- seqio registration

@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    pytest.importorskip("seqio")
    from jaxmt.data import vocab

    return vocab.train_vocab(tmp_path_factory.mktemp("vocab") / "spm.model", ("en", "de"),
                             vocab_size=1000, sample_per_lang=500)


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    train = _write(d / "train.tsv.gz", [line for line, _ in TSV], gz=True)
    # The reverse orientation, as aligned files: joins en-de/train, with one duplicate.
    rev_de = _write(d / "more.de", [b"Hallo Welt.", b"Guten Abend.", b"Bad \xff"])
    rev_en = _write(d / "more.en", [b"Hello world.", b"Good evening.", b"Bad"])
    valid = _write(d / "valid.jsonl", [line for line, _ in JSONL])
    return [sources.CorpusSource(train, "en", "de"),
            {"path": str(rev_de), "tgt_path": str(rev_en), "src_lang": "de", "tgt_lang": "en"},
            sources.CorpusSource(valid, "en", "de", split="validation")]


def test_register_corpus_makes_tasks_for_both_directions(spm_path, corpus_files, tmp_path):
    from jaxmt.data import tasks, vocab

    seqio = pytest.importorskip("seqio")
    mixture = tasks.register_corpus(corpus_files, spm_path, prefix="t_corpus",
                                    report_dir=tmp_path)
    assert mixture == "t_corpus_mix"
    names = {t.name for t in seqio.get_mixture_or_task(mixture).tasks}
    assert names == {"t_corpus_en_de", "t_corpus_de_en"}
    # TSV keeps 4 of 13; the text pair adds "Good evening." (the other two are skipped).
    report = tasks.SKIP_REPORTS["t_corpus_de_en"]["train"]
    assert (report.total, report.kept) == (16, 5)
    assert report.skipped["duplicate"] == 2 and report.skipped["invalid_utf8"] == 2
    assert json.loads((tmp_path / "data_report.json").read_text())["kept"] == 5 + 2

    sp = vocab.load_processor(spm_path)
    for src, tgt in (("en", "de"), ("de", "en")):
        task = seqio.get_mixture_or_task(f"t_corpus_{src}_{tgt}")
        assert set(task.splits) == {"train", "validation"}
        assert task.num_input_examples("train") == 5
        got = list(task.get_dataset({"inputs": 512, "targets": 512}, split="train",
                                    shuffle=False).as_numpy_iterator())
        assert len(got) == 5  # the skipped records never reach (or break) iteration
        ex = got[0]
        s, t = ("Hello world.", "Hallo Welt.")[:: 1 if src == "en" else -1]
        assert ex["inputs_pretokenized"].decode() == embedded.tag_source(s, tgt)
        assert ex["inputs"][0] == vocab.tag_id(sp, tgt)
        assert sp.decode(list(ex["inputs"][:-1])) == embedded.tag_source(s, tgt)
        assert sp.decode(list(ex["targets"][:-1])) == t and ex["targets"][-1] == vocab.EOS_ID
    valid = list(seqio.get_mixture_or_task("t_corpus_de_en").get_dataset(
        {"inputs": 64, "targets": 64}, split="validation", shuffle=False).as_numpy_iterator())
    assert [e["targets_pretokenized"].decode() for e in valid] == ["Hello world.", "With codes."]

    # Re-registering replaces this prefix's tasks; one direction only this time.
    one_way = [sources.CorpusSource(corpus_files[0].path, "en", "de", both_directions=False)]
    tasks.register_corpus(one_way, spm_path, prefix="t_corpus")
    assert {n for n in seqio.TaskRegistry.names() if n.startswith("t_corpus_")} == {
        "t_corpus_en_de"}


def test_register_corpus_batches_and_errors(spm_path, corpus_files, tmp_path):
    from jaxmt.data import pipeline, tasks

    mixture = tasks.register_corpus(corpus_files[:1], spm_path, prefix="t_corpus_b")
    batch = next(pipeline.train_batches(mixture, 32, 32, 2, seed=0))
    assert batch["encoder_input_tokens"].shape == (2, 32)
    with pytest.raises(sources.BadRecordError, match=r"train.tsv.gz:2: invalid_utf8"):
        tasks.register_corpus(corpus_files[:1], spm_path, prefix="t_corpus_b",
                              limits={"strict": True})
    path = corpus_files[0].path
    with pytest.raises(ValueError, match="no target-language tag for 'pt-BR'"):
        tasks.register_corpus([sources.CorpusSource(path, "en", "pt-BR")], spm_path,
                              prefix="t_corpus_b")
    with pytest.raises(ValueError, match="no train pairs"):
        tasks.register_corpus([sources.CorpusSource(path, "en", "de", split="test")],
                              spm_path, prefix="t_corpus_b")
