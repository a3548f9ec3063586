"""The shared SentencePiece vocabulary: ids, coverage, tags, seqio parity, reproducibility."""

import pytest

from jaxmt.data import embedded, vocab

SIZE, PER_LANG = 2000, 2000
# Already NFKC-normalised, so decode(encode(x)) must give them back exactly.
SAMPLES = [
    "Ça coûte déjà très cher",
    "Привет, мир",
    "مرحبا بالعالم",
    "Größe und Übermaß",
    "¿Qué pasó? ¡Ay!",
    "ꙮ ist ein seltenes Zeichen 🙂",
]


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    return vocab.train_vocab(tmp_path_factory.mktemp("vocab") / "spm.model",
                             embedded.EMBEDDED_LANGS, SIZE, PER_LANG, seed=0)


@pytest.fixture(scope="module")
def sp(spm_path):
    return vocab.load_processor(spm_path)


@pytest.mark.slow
def test_written_exactly_and_atomically(spm_path):
    assert spm_path.name == "spm.model" and spm_path.stat().st_size > 0
    assert [p.name for p in spm_path.parent.iterdir()] == ["spm.model"]


def test_t5_special_ids(sp):
    assert sp.get_piece_size() == SIZE
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    assert (vocab.PAD_ID, vocab.EOS_ID, vocab.UNK_ID) == (0, 1, 2)


@pytest.mark.parametrize("text", SAMPLES)
def test_no_unknowns_and_exact_round_trip(sp, text):
    ids = sp.encode(text)
    assert vocab.UNK_ID not in ids
    assert sp.decode(ids) == text


def test_rare_characters_fall_back_to_bytes(sp):
    pieces = sp.encode("ꙮ🙂", out_type=str)
    assert sum(p.startswith("<0x") for p in pieces) == 3 + 4  # their UTF-8 bytes
    # nmt_nfkc folds compatibility characters first: "𝔘" is read as "U", not as UNK.
    ids = sp.encode("𝔘")
    assert vocab.UNK_ID not in ids and sp.decode(ids) == "U"


@pytest.mark.parametrize("lang", embedded.EMBEDDED_LANGS)
def test_every_tag_is_one_id_and_comes_first(sp, lang):
    tag = embedded.lang_tag(lang)
    assert sp.encode(tag) == [vocab.tag_id(sp, lang)]
    ids = sp.encode(embedded.tag_source("In the beginning", lang))
    assert ids[0] == vocab.tag_id(sp, lang)
    assert sp.decode(ids) == f"{tag} In the beginning"


def test_tags_are_distinct_and_unknown_tags_rejected(sp):
    ids = {vocab.tag_id(sp, lang) for lang in embedded.EMBEDDED_LANGS}
    assert len(ids) == len(embedded.EMBEDDED_LANGS)
    assert not ids & {vocab.PAD_ID, vocab.EOS_ID, vocab.UNK_ID}
    with pytest.raises(ValueError, match="no tag piece '▁<2xx>'"):  # valid code, no piece
        vocab.tag_id(sp, "xx")
    with pytest.raises(ValueError, match="invalid language code 'english'"):
        vocab.tag_id(sp, "english")


def test_seqio_vocabulary_matches_the_processor(sp, spm_path):
    sv = vocab.seqio_vocabulary(spm_path)
    assert sv.vocab_size == SIZE
    assert (sv.pad_id, sv.eos_id, sv.unk_id) == (0, 1, 2)
    for text in SAMPLES + [embedded.tag_source("Im Anfang schuf Gott", "en")]:
        assert sv.encode(text) == sp.encode(text)
        assert [int(i) for i in sv.encode_tf(text).numpy()] == sp.encode(text)


def test_sample_is_balanced_deterministic_and_per_language():
    langs = ("en", "ru", "ar")
    sample = vocab.sample_sentences(langs, 50, seed=3)
    assert len(sample) == 150
    assert sample == vocab.sample_sentences(langs, 50, seed=3)
    assert sample != vocab.sample_sentences(langs, 50, seed=4)
    # Languages are interleaved, and a language's draw ignores which others are chosen.
    assert sample[1::3] == vocab.sample_sentences(("ru",), 50, seed=3)
    _, train = embedded.load_split("train", ["en"])
    assert set(sample[0::3]) <= set(train["en"])


@pytest.mark.slow
def test_training_is_reproducible(spm_path, tmp_path):
    again = vocab.train_vocab(tmp_path / "again.model", embedded.EMBEDDED_LANGS, SIZE, PER_LANG,
                              seed=0)
    assert again.read_bytes() == spm_path.read_bytes()


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        vocab.load_processor(tmp_path / "nope.model")


# ---------------------------------------------------------------- corpus vocabularies

CORPUS_SIZE, CORPUS_PER_LANG = 1000, 2000
BAD_WORD = "Quetzalcoatlxyz"  # only in a line that read_pairs skips


@pytest.fixture(scope="module")
def corpus_sources(tmp_path_factory):
    """en-de pairs of the embedded train split as de-CH, en-pt pairs as pt-BR (TSV)."""
    from jaxmt.data import sources

    d = tmp_path_factory.mktemp("corpus")
    out = []
    for tgt, code in (("de", "de-CH"), ("pt", "pt-BR")):
        pairs, _ = embedded.parallel_pairs("en", tgt, "train")
        lines = [f"{s}\t{t}" for s, t in pairs[:3000]]
        lines.insert(5, f"{BAD_WORD} one\t{BAD_WORD}\x07 two")  # control_chars: skipped
        path = d / f"en-{code}.tsv"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        out.append(sources.CorpusSource(str(path), "en", code))
    valid, _ = embedded.parallel_pairs("en", "de", "validation")
    path = d / "valid.tsv"
    path.write_text("".join(f"{s}\t{t}\n" for s, t in valid), encoding="utf-8")
    out.append(sources.CorpusSource(str(path), "en", "de-CH", split="validation"))
    return out


@pytest.fixture(scope="module")
def corpus_spm(corpus_sources, tmp_path_factory):
    # As jaxmt.train.run.train() calls it: DataConfig.corpus_langs, .corpora (dicts work too), .clean.
    import dataclasses
    return vocab.train_vocab(tmp_path_factory.mktemp("cvocab") / "spm.model",
                             ("en", "de-CH", "pt-BR"), CORPUS_SIZE, CORPUS_PER_LANG, seed=0,
                             corpus=[dataclasses.asdict(s) for s in corpus_sources],
                             limits={"max_chars": 2000})


def test_corpus_languages_get_one_piece_tags(corpus_spm):
    sp = vocab.load_processor(corpus_spm)
    assert sp.get_piece_size() == CORPUS_SIZE
    assert vocab.tag_langs(["pt-BR", "en", "de-CH"]) == [*embedded.EMBEDDED_LANGS, "de-CH",
                                                         "pt-BR"]
    for lang in ("de-CH", "pt-BR", "en", "ar"):  # embedded tags stay, at their old ids
        ids = sp.encode(embedded.tag_source("Grüezi mitenand", lang))
        assert ids[0] == vocab.tag_id(sp, lang)
        assert sp.decode(ids) == f"<2{lang}> Grüezi mitenand"
    assert [vocab.tag_id(sp, x) for x in embedded.EMBEDDED_LANGS] == list(range(3, 11))
    assert (vocab.tag_id(sp, "de-CH"), vocab.tag_id(sp, "pt-BR")) == (11, 12)
    with pytest.raises(ValueError, match="<2fr-CA>"):
        vocab.tag_id(sp, "fr-CA")


def test_corpus_sample_is_balanced_checked_and_deterministic(corpus_sources):
    from jaxmt.data import sources

    sample = vocab.sample_corpus_sentences(corpus_sources, ["en", "de-CH"], 500, seed=1)
    assert len(sample) == 1000
    assert sample == vocab.sample_corpus_sentences(corpus_sources, ["en", "de-CH"], 500, seed=1)
    assert sample != vocab.sample_corpus_sentences(corpus_sources, ["en", "de-CH"], 500, seed=2)
    # Interleaved; one language's draw ignores the others; the en side of both files counts
    # once per sentence; the validation file is never read; skipped lines never sampled.
    assert sample[1::2] == vocab.sample_corpus_sentences(corpus_sources, ["de-CH"], 500, seed=1)
    assert len(set(sample[0::2])) == 500
    train_de = {t for s, t in embedded.parallel_pairs("en", "de", "train")[0]}
    assert set(sample[1::2]) <= train_de
    assert not any(BAD_WORD in s for s in sample)
    # Fewer sentences than asked: the whole language, as read_pairs cleans it.
    clean = {t for _, t in sources.read_pairs(corpus_sources[1])}
    assert 2900 < len(clean) < 3000
    assert sorted(vocab.sample_corpus_sentences(corpus_sources, ["pt-BR"], 10**6)) == sorted(clean)
    with pytest.raises(ValueError, match=r"no train text for \['fr'\]"):
        vocab.sample_corpus_sentences(corpus_sources, ["en", "fr"], 10)
    with pytest.raises(ValueError, match="no train-split source"):
        vocab.sample_corpus_sentences(corpus_sources[2:], ["en"], 10)
    with pytest.raises(sources.BadRecordError, match="control_chars"):
        vocab.sample_corpus_sentences(corpus_sources, ["en"], 10, limits={"strict": True})


def test_bad_codes_and_settings_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="did you mean 'pt-BR'"):
        vocab.train_vocab(tmp_path / "x.model", ["en", "pt_br"], 500, 10)
    with pytest.raises(ValueError, match="character_coverage"):
        vocab.train_vocab(tmp_path / "x.model", ["en"], 500, 10, character_coverage=0)
    with pytest.raises(ValueError, match="embedded corpus has"):  # no corpus: embedded only
        vocab.train_vocab(tmp_path / "x.model", ["en", "pt-BR"], 500, 10)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- report

def test_report_no_unknowns_exact_round_trip_plausible_fertility(corpus_spm):
    # The vocabulary saw English, German and Portuguese only: Arabic, Cyrillic, emoji and
    # rare characters are spelled in byte pieces, never UNK, and decode back exactly.
    texts = {"en": ["In the beginning God created the heaven and the earth.",
                    "And the earth was without form, and void;", "  Spaces   folded  "],
             "de-CH": ["Grüezi mitenand, wie gaht's?", "Größe und Übermaß"],
             "ru": ["Привет, мир"], "ar": ["مرحبا بالعالم"], "misc": SAMPLES + ["ﬁne 𝔘"]}
    r = vocab.report(corpus_spm, texts)
    assert list(r["langs"]) == list(texts) and r["vocab_size"] == CORPUS_SIZE
    for lang, s in r["langs"].items():
        assert s["unk_rate"] == 0.0 and s["round_trip"] == 1.0, lang
        assert s["sentences"] == len(texts[lang])
        assert s["fertility"] == pytest.approx(s["pieces"] / s["words"])
    assert r["langs"]["en"]["round_trip_raw"] == pytest.approx(2 / 3)  # whitespace folded
    assert r["langs"]["misc"]["round_trip_raw"] == pytest.approx(6 / 7)  # "ﬁ" -> "fi"
    assert 1.0 <= r["langs"]["en"]["fertility"] < 2.5
    assert r["langs"]["ar"]["byte_rate"] > 0.8 and r["langs"]["en"]["byte_rate"] == 0
    assert r["langs"]["en"]["tag_id"] == 3 and r["langs"]["misc"]["tag_id"] is None


def test_report_warns_on_fertility_over_twice_the_median(corpus_spm):
    # Trained on en/de/pt only: on Russian and Arabic the vocabulary falls back to bytes.
    _, texts = embedded.load_split("validation", ["en", "de", "fr", "ru", "ar"])
    r = vocab.report(corpus_spm, texts)
    f = {lang: s["fertility"] for lang, s in r["langs"].items()}
    assert 1.2 < f["en"] < 2.5 and 1.5 < f["de"] < 3.5 and f["ru"] > 6 and f["ar"] > 6
    assert r["median_fertility"] == pytest.approx(f["fr"])
    warned = sorted(w.split(":")[0] for w in r["warnings"] if "fertility" in w)
    assert warned == ["ar", "ru"]
    assert all(s["unk_rate"] == 0 and s["round_trip"] == 1.0 for s in r["langs"].values())
    text = vocab.format_report(r)
    assert "warning: ru: fertility" in text and text.count("\n") == 1 + 5 + len(r["warnings"])
    # The same text on a vocabulary that covers every language: no warnings.
    assert vocab.report(corpus_spm, {"en": texts["en"], "de": texts["de"]})["warnings"] == []


def test_report_warns_on_unknowns_and_missing_tags(tmp_path):
    import io

    import sentencepiece as spm

    model = io.BytesIO()  # no byte fallback, no tags: the kind of model report catches
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["abc abd", "ab ba"] * 50),
                                   model_writer=model, vocab_size=12, minloglevel=2,
                                   hard_vocab_limit=False,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    (tmp_path / "m.model").write_bytes(model.getvalue())
    r = vocab.report(tmp_path / "m.model", {"en": ["abc xyz"], "de": [" ", ""]})
    assert r["langs"]["en"]["unk_rate"] > 0 and r["langs"]["en"]["round_trip"] == 0.0
    assert r["langs"]["de"]["sentences"] == 0
    assert any(w.startswith("en: unk_rate") for w in r["warnings"])
    assert any(w.startswith("en: no one-piece target tag") for w in r["warnings"])
    assert "de: no text to measure" in r["warnings"]


# ---------------------------------------------------------------- jaxmt vocab

_CLI = """
import contextlib, io, json, sys
from jaxmt.cli import main
outs = []
for argv in json.loads(sys.argv[1]):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    outs.append([rc, buf.getvalue()])
print(json.dumps({"outs": outs, "tf": [m for m in ("tensorflow", "seqio", "jax")
                                       if m in sys.modules]}))
"""


def _cli(*argvs):
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _CLI, json.dumps(argvs)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_cli_vocab_report_json_matches_the_function_without_tensorflow(corpus_spm, tmp_path):
    import json
    import shutil

    from jaxmt import config as cfglib

    # A model directory: its spm.model and its DataConfig's languages.
    shutil.copy(corpus_spm, tmp_path / cfglib.VOCAB_FILE)
    (tmp_path / cfglib.CONFIG_FILE).write_text(cfglib.to_json(
        data=cfglib.DataConfig(langs=("en", "de", "ru")), train=cfglib.TrainConfig()))
    res = _cli(["vocab", "report", f"--vocab={corpus_spm}", "--langs=en,de,ru", "--json"],
               ["vocab", "report", f"--vocab={corpus_spm}", "--langs=en,de,ru"],
               ["vocab", "report", f"--model_dir={tmp_path}", "--json"])
    assert res["tf"] == []  # neither TensorFlow nor seqio nor JAX
    (rc, out), (rc2, table), (rc3, out3) = res["outs"]
    assert rc == rc2 == rc3 == 0
    assert json.loads(out3)["langs"] == json.loads(out)["langs"]
    got = json.loads(out.splitlines()[-1])
    _, texts = embedded.load_split("validation", ["en", "de", "ru"])
    want = vocab.report(corpus_spm, texts)
    assert got["langs"] == want["langs"] and got["warnings"] == want["warnings"]
    assert got["split"] == "validation" and got["text"] == "embedded"
    assert table.splitlines()[0] == "text: the validation split of the embedded corpus"
    assert table.splitlines()[1:] == vocab.format_report(want).splitlines()


def test_cli_vocab_train_from_gin_and_corpus_flags(corpus_sources, tmp_path):
    import json

    gin_file = tmp_path / "run.gin"
    gin_file.write_text('DataConfig.langs = ("en", "ru")\nDataConfig.vocab_size = 700\n'
                        "DataConfig.vocab_sample_per_lang = 300\nTrainConfig.seed = 5\n"
                        "train.unknown_to_vocab = 1  # other configurables are skipped\n")
    train_tsv = corpus_sources[0].path
    res = _cli(["vocab", "train", f"--out={tmp_path / 'g.model'}", f"--gin_file={gin_file}",
                "--gin.DataConfig.vocab_size=600"],
               ["vocab", "train", f"--out={tmp_path / 'c.model'}", "--vocab_size=600",
                "--sample_per_lang=300", f"--corpus={train_tsv}:en:de-CH"],
               ["vocab", "report", f"--vocab={tmp_path / 'c.model'}", "--json",
                f"--corpus={train_tsv}:en:de-CH", "--max_sentences=50"])
    assert res["tf"] == [] and [rc for rc, _ in res["outs"]] == [0, 0, 0]
    assert "of en, ru from the embedded corpus (seed 5)" in res["outs"][0][1]
    sp = vocab.load_processor(tmp_path / "g.model")
    assert sp.get_piece_size() == 600
    assert (tmp_path / "g.model").read_bytes() == vocab.train_vocab(
        tmp_path / "g2.model", ["en", "ru"], 600, 300, seed=5).read_bytes()
    sp = vocab.load_processor(tmp_path / "c.model")
    assert sp.encode("<2de-CH>") == [vocab.tag_id(sp, "de-CH")]
    got = json.loads(res["outs"][2][1].splitlines()[-1])
    assert list(got["langs"]) == ["en", "de-CH"] and got["text"] == [train_tsv]
    assert got["langs"]["de-CH"]["sentences"] == 50 and got["langs"]["de-CH"]["tag_id"] == 11


def test_cli_vocab_errors(tmp_path):
    import subprocess
    import sys

    def run(*argv):
        return subprocess.run([sys.executable, "-m", "jaxmt.cli", *argv], capture_output=True,
                              text=True, timeout=60)

    (tmp_path / "x.model").write_bytes(b"x")
    p = run("vocab", "train", f"--out={tmp_path / 'x.model'}")
    assert p.returncode != 0 and "exists; pass --overwrite" in p.stderr
    p = run("vocab", "report", f"--vocab={tmp_path / 'none.model'}", "--langs=en")
    assert p.returncode != 0 and "none.model: no SentencePiece model" in p.stderr
    p = run("vocab", "report", f"--vocab={tmp_path / 'x.model'}", "--langs=en,english")
    assert p.returncode != 0 and "invalid language code 'english'" in p.stderr
    p = run("vocab", "train", f"--out={tmp_path / 'y.model'}", "--corpus=nocolons.tsv")
    assert p.returncode != 0 and "expected PATH:SRC_LANG:TGT_LANG" in p.stderr
