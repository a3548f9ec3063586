"""The shared SentencePiece vocabulary: ids, coverage, tags, seqio parity, reproducibility."""

import pytest

from jaxmt.data import corpora, vocab

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
                             corpora.EMBEDDED_LANGS, SIZE, PER_LANG, seed=0)


@pytest.fixture(scope="module")
def sp(spm_path):
    return vocab.load_processor(spm_path)


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


@pytest.mark.parametrize("lang", corpora.EMBEDDED_LANGS)
def test_every_tag_is_one_id_and_comes_first(sp, lang):
    tag = corpora.lang_tag(lang)
    assert sp.encode(tag) == [vocab.tag_id(sp, lang)]
    ids = sp.encode(corpora.tag_source("In the beginning", lang))
    assert ids[0] == vocab.tag_id(sp, lang)
    assert sp.decode(ids) == f"{tag} In the beginning"


def test_tags_are_distinct_and_unknown_tags_rejected(sp):
    ids = {vocab.tag_id(sp, lang) for lang in corpora.EMBEDDED_LANGS}
    assert len(ids) == len(corpora.EMBEDDED_LANGS)
    assert not ids & {vocab.PAD_ID, vocab.EOS_ID, vocab.UNK_ID}
    with pytest.raises(ValueError, match="'xx'"):
        vocab.tag_id(sp, "xx")


def test_seqio_vocabulary_matches_the_processor(sp, spm_path):
    sv = vocab.seqio_vocabulary(spm_path)
    assert sv.vocab_size == SIZE
    assert (sv.pad_id, sv.eos_id, sv.unk_id) == (0, 1, 2)
    for text in SAMPLES + [corpora.tag_source("Im Anfang schuf Gott", "en")]:
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
    _, train = corpora.load_split("train", ["en"])
    assert set(sample[0::3]) <= set(train["en"])


def test_training_is_reproducible(spm_path, tmp_path):
    again = vocab.train_vocab(tmp_path / "again.model", corpora.EMBEDDED_LANGS, SIZE, PER_LANG,
                              seed=0)
    assert again.read_bytes() == spm_path.read_bytes()


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        vocab.load_processor(tmp_path / "nope.model")
