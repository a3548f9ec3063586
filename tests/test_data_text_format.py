"""Training on an imported base model's own tokenizer and target-language signal.

The seqio Tasks, given a :class:`jaxmt.data.signals.TextFormat` built by
:func:`jaxmt.inference.tokenizer.text_format`, must give exactly the ids the
inference tokenizers give (and the Hugging Face reference tokenizers) for the same
texts and languages; the pre-tokenised cache must never mix tokenizers; and the
default (jaxmt's ``spm.model`` and ``<2xx>`` tag) must stay as it was.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import sentencepiece as spm

seqio = pytest.importorskip("seqio")
from jaxmt.data import cache, embedded, signals, tasks, vocab  # noqa: E402
from jaxmt.data.pyvocab import FunctionVocabulary  # noqa: E402
from jaxmt.inference import hf_import  # noqa: E402
from jaxmt.inference import tokenizer as toklib  # noqa: E402

EOS = vocab.EOS_ID
N_PAIRS = 40
BIG = {"inputs": 4096, "targets": 4096}

from spm_models import train_spm  # noqa: E402

# ----------------------------------------------------------------------------- fixtures



@pytest.fixture(scope="module")
def texts():
    _, t = embedded.load_split("train", ["en", "de"])
    return {lang: [x for x in t[lang] if x][:300] for lang in ("en", "de")}


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    """A small jaxmt vocabulary (tags included) of en and de: faster than conftest's."""
    return vocab.train_vocab(tmp_path_factory.mktemp("tf_vocab") / "spm.model", ("en", "de"),
                             vocab_size=500, sample_per_lang=400)


@pytest.fixture(scope="module")
def pairs():
    """en-de pairs of the test split; a few with characters the vocabularies never saw."""
    p = embedded.parallel_pairs("en", "de", "test")[0][:N_PAIRS - 2]
    return p + [("Ωmega ✓ naïve — 東京", "Größe ß ☃"), ("two  spaces", "x  y")]


@pytest.fixture(scope="module")
def corpus_tsv(tmp_path_factory, pairs):
    path = tmp_path_factory.mktemp("tf_corpus") / "en-de.tsv"
    path.write_text("".join(f"{a}\t{b}\n" for a, b in pairs), encoding="utf-8")
    return str(path)


def _write_config(d, cfg) -> None:
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory, texts):
    """A T5 directory as read_configs sees it: config.json and spiece.model (no weights)."""
    d = tmp_path_factory.mktemp("tf_t5")
    proto = train_spm(texts["en"] + texts["de"], 400, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    (d / "spiece.model").write_bytes(proto)
    n = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
    _write_config(d, {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"],
                      "vocab_size": n + 100, "d_model": 16, "d_kv": 4, "d_ff": 32,
                      "num_layers": 1, "num_heads": 4, "feed_forward_proj": "relu",
                      "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
                      "is_encoder_decoder": True})
    return str(d)


def _marian_vocab(src: bytes, tgt: bytes, codes=()) -> dict[str, int]:
    v = {"</s>": 0, "<unk>": 1}
    for code in codes:
        v[code] = len(v)
    for proto in (src, tgt):
        sp = spm.SentencePieceProcessor(model_proto=proto)
        for i in range(sp.get_piece_size()):
            if not (sp.is_control(i) or sp.is_unknown(i)):
                v.setdefault(sp.id_to_piece(i), len(v))
    v["<pad>"] = len(v)
    return v


def _make_marian(d, texts, codes=()):
    """opus-mt layout: source.spm (en), target.spm (de), vocab.json (</s> 0, <unk> 1,
    <pad> last, optional >>xx<< codes), config.json."""
    src, tgt = train_spm(texts["en"], 300), train_spm(texts["de"], 300)
    (d / "source.spm").write_bytes(src)
    (d / "target.spm").write_bytes(tgt)
    v = _marian_vocab(src, tgt, codes)
    (d / "vocab.json").write_text(json.dumps(v, ensure_ascii=False))
    pad = v["<pad>"]
    _write_config(d, {"model_type": "marian", "architectures": ["MarianMTModel"],
                      "vocab_size": pad + 1, "decoder_vocab_size": pad + 1, "d_model": 16,
                      "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 4,
                      "decoder_attention_heads": 4, "encoder_ffn_dim": 32,
                      "decoder_ffn_dim": 32, "activation_function": "swish",
                      "pad_token_id": pad, "eos_token_id": 0, "decoder_start_token_id": pad,
                      "is_encoder_decoder": True, "share_encoder_decoder_embeddings": True})
    return str(d)


@pytest.fixture(scope="module")
def marian_dir(tmp_path_factory, texts):
    return _make_marian(tmp_path_factory.mktemp("tf_marian"), texts)


@pytest.fixture(scope="module")
def marian_multi_dir(tmp_path_factory, texts):
    return _make_marian(tmp_path_factory.mktemp("tf_marian_multi"), texts,
                        codes=(">>deu<<", ">>eng<<"))


def _format(d, template=None):
    """The directory's TextFormat, and its inference tokenizer reading the same signal
    (``input_prefix`` = the format's template)."""
    model_cfg, tok_cfg = hf_import.read_configs(d)
    fmt = toklib.text_format(d, tok_cfg, model_cfg.vocab_size, template)
    tok_cfg = dataclasses.replace(tok_cfg, input_prefix=fmt.template)
    return fmt, toklib.load_tokenizer(d, tok_cfg, model_cfg.vocab_size)


def _examples(task_name, split="train"):
    task = seqio.get_mixture_or_task(task_name)
    ds = task.get_dataset(BIG, split=split, shuffle=False)
    return list(ds.as_numpy_iterator())


def _register(corpus_tsv, prefix, vocab_path=None, **kw):
    return tasks.register_corpus([{"path": corpus_tsv, "src_lang": "en", "tgt_lang": "de"}],
                                 vocab_path, prefix=prefix, **kw)


def _check_task_ids(prefix, tok, pairs, src="en", tgt="de", target_ids=None):
    """Both directions' examples: tokenizer ids + EOS, in the corpus's order."""
    target_ids = target_ids or tok.encode_target
    for a, b, flip in ((src, tgt, False), (tgt, src, True)):
        got = _examples(tasks.corpus_task_name(prefix, a, b))
        assert len(got) == len(pairs)
        for ex, (x, y) in zip(got, pairs):
            s, t = (y, x) if flip else (x, y)
            assert list(ex["inputs"]) == tok.encode(s, a, b) + [EOS], (a, b, s)
            assert list(ex["targets"]) == target_ids(t) + [EOS], (a, b, t)


# ----------------------------------------------------------------------------- templates

def test_format_source_templates():
    assert signals.format_source(signals.TAG_TEMPLATE, "Hallo", "de", "en") == "<2en> Hallo"
    for lang in ("de", "pt-BR", "ar"):
        assert embedded.tag_source("Hi there", lang) == f"<2{lang}> Hi there"
        assert embedded.tag_source("Hi", lang) == signals.format_source(
            signals.TAG_TEMPLATE, "Hi", "en", lang)
    with pytest.raises(ValueError, match="english"):
        embedded.tag_source("Hi", "english")  # tag_source still checks the code
    assert (signals.format_source(signals.T5_TEMPLATE, "Hi.", "en", "de")
            == "translate English to German: Hi.")
    assert (signals.format_source("{src_name}->{tgt_name} [{src}>{tgt}] ", "x", "ro", "nl")
            == "Romanian->Dutch [ro>nl] x")
    assert signals.format_source(signals.MARIAN_TEMPLATE, "x", None, "fra") == ">>fra<< x"
    assert signals.format_source("{tgt_name}: ", "x", "en", "pt-BR") == "Portuguese: x"
    want = {"en": "English", "de": "German", "fr": "French", "es": "Spanish",
            "pt": "Portuguese", "it": "Italian", "ru": "Russian", "ar": "Arabic",
            "ro": "Romanian", "nl": "Dutch"}
    assert {k: signals.lang_name(k) for k in want} == want
    # Codes keep the inference tokenizer's old behaviour: a missing one is "".
    assert signals.format_prefix("{src}|{tgt}", None, None) == "|"
    assert signals.placeholders("translate {src_name} to {tgt}") == {"src_name", "tgt"}


def test_unknown_name_is_an_error_naming_the_code():
    with pytest.raises(ValueError, match="'yo'"):
        signals.format_source(signals.T5_TEMPLATE, "x", "en", "yo")
    with pytest.raises(ValueError, match="needs a target language"):
        signals.format_source(signals.T5_TEMPLATE, "x", "en", None)
    # Only the names need a table: codes are passed through.
    assert signals.format_source("<{tgt}> ", "x", "en", "yo") == "<yo> x"


def test_inference_prefix_has_names(t5_dir):
    model_cfg, tok_cfg = hf_import.read_configs(t5_dir, input_prefix=signals.T5_TEMPLATE)
    tok = toklib.load_tokenizer(t5_dir, tok_cfg, model_cfg.vocab_size)
    assert tok.prefix("en", "de") == "translate English to German: "
    assert tok.encode("Jesus wept.", "en", "de") == tok.sp.encode(
        "translate English to German: Jesus wept.")
    with pytest.raises(ValueError, match="src_lang is required"):
        tok.check_langs(None, "de")
    with pytest.raises(ValueError, match="'yo'"):
        tok.check_langs("en", "yo")
    tok.check_langs("en", "de")
    # {src}/{tgt} as before.
    _, cfg = hf_import.read_configs(t5_dir, input_prefix="{src}2{tgt}: ")
    assert toklib.load_tokenizer(t5_dir, cfg, model_cfg.vocab_size).prefix("en", None) == "en2: "


def test_default_templates(t5_dir, marian_dir, marian_multi_dir):
    assert toklib.default_template(None) == "<2{tgt}> "
    for d, want in ((t5_dir, signals.T5_TEMPLATE), (marian_dir, ""),
                    (marian_multi_dir, ">>{tgt}<< ")):
        fmt, _ = _format(d)
        assert fmt.template == want, d
    assert _format(t5_dir, "{tgt}: ")[0].template == "{tgt}: "
    _, tok_cfg = hf_import.read_configs(t5_dir, input_prefix="translate en to {tgt}: ")
    assert toklib.default_template(tok_cfg) == "translate en to {tgt}: "


# ----------------------------------------------------------------------------- vocabularies

def test_t5_seqio_vocabulary_gives_t5_tokenizer_ids(t5_dir, pairs):
    fmt, tok = _format(t5_dir)
    assert fmt.input_vocab is fmt.target_vocab and fmt.files == (f"{t5_dir}/spiece.model",)
    assert fmt.input_vocab.eos_id == EOS and fmt.input_vocab.pad_id == 0
    texts = [signals.format_source(fmt.template, t, "en", "de") for p in pairs for t in p]
    tf_ids = [fmt.input_vocab.encode_tf(t).numpy().tolist() for t in texts[:10]]
    for i, text in enumerate(texts):
        want = tok.encode_text(text)
        assert fmt.input_vocab.encode(text) == want, text
        if i < 10:
            assert tf_ids[i] == want, text


def test_marian_vocabulary_matches_tokenizer(marian_dir, pairs):
    fmt, tok = _format(marian_dir)
    assert isinstance(fmt.input_vocab, FunctionVocabulary)
    assert fmt.input_vocab != fmt.target_vocab
    assert fmt.input_vocab == _format(marian_dir)[0].input_vocab
    assert len(fmt.files) == 3 and fmt.kind == "marian"
    assert (fmt.input_vocab.eos_id, fmt.input_vocab.unk_id, fmt.input_vocab.pad_id) == (1, 2, 0)
    for en, de in pairs[:12]:
        src = fmt.input_vocab.encode_tf(en).numpy().tolist()
        tgt = fmt.target_vocab.encode_tf(de).numpy().tolist()
        assert src == tok.encode(en, None, None) == fmt.input_vocab.encode(en)
        assert tgt == tok.encode_target(de) == fmt.target_vocab.encode(de)
        assert fmt.target_vocab.decode(tgt + [EOS, 7, 8]) == tok.decode(tgt)
    # Targets go through target.spm, not source.spm.
    assert any(tok.encode_target(de) != tok.encode_text(de) for _, de in pairs[:12])
    batch = fmt.target_vocab.encode_tf(np.array([de for _, de in pairs[:3]]))
    assert batch.to_list() == [tok.encode_target(de) for _, de in pairs[:3]]
    ids = [tok.encode_target(de) + [EOS] for _, de in pairs[:3]]
    n = max(map(len, ids))
    padded = np.array([x + [0] * (n - len(x)) for x in ids], np.int32)
    decoded = fmt.target_vocab.decode_tf(padded).numpy()
    assert [x.decode() for x in decoded] == [tok.decode(x) for x in ids]
    assert fmt.target_vocab.decode_tf(padded[0]).numpy().decode() == tok.decode(ids[0])


@pytest.mark.filterwarnings("ignore:Recommended. pip install sacremoses")
def test_marian_ids_equal_the_reference_tokenizer(marian_multi_dir, pairs):
    transformers = pytest.importorskip("transformers")
    fmt, tok = _format(marian_multi_dir)
    ref = transformers.MarianTokenizer.from_pretrained(marian_multi_dir)
    perm = toklib.id_permutation(tok.to_original.size, tok.cfg.reordered_ids)
    for en, de in pairs[:10]:
        src = fmt.input_vocab.encode(fmt.source(en, "eng", "deu"))
        assert [int(perm[i]) for i in src + [EOS]] == ref(">>deu<< " + en)["input_ids"]
        tgt = fmt.target_vocab.encode(de)
        assert [int(perm[i]) for i in tgt + [EOS]] == ref(text_target=de)["input_ids"]


# ----------------------------------------------------------------------------- Tasks

def test_t5_tasks_give_the_tokenizer_ids(t5_dir, corpus_tsv, pairs):
    fmt, tok = _format(t5_dir)
    _register(corpus_tsv, "t_tf_t5", text_format=fmt)
    _check_task_ids("t_tf_t5", tok, pairs)
    ex = _examples(tasks.corpus_task_name("t_tf_t5", "de", "en"))[0]
    assert ex["inputs_pretokenized"].decode() == "translate German to English: " + pairs[0][1]
    assert ex["targets_pretokenized"].decode() == pairs[0][0]


def test_marian_tasks_give_the_tokenizer_ids(marian_multi_dir, tmp_path, pairs):
    fmt, tok = _format(marian_multi_dir)
    path = tmp_path / "eng-deu.tsv"
    path.write_text("".join(f"{a}\t{b}\n" for a, b in pairs), encoding="utf-8")
    mixture = tasks.register_corpus([{"path": str(path), "src_lang": "eng", "tgt_lang": "deu"}],
                                    None, prefix="t_tf_marian", text_format=fmt)
    _check_task_ids("t_tf_marian", tok, pairs, "eng", "deu")
    for row in tasks.mixture_stats(mixture, fmt):  # counts the format's tokens
        got = _examples(row["task"])
        assert row["src_tokens"] == sum(len(ex["inputs"]) for ex in got)
        assert row["tgt_tokens"] == sum(len(ex["targets"]) for ex in got)
    ex = _examples(tasks.corpus_task_name("t_tf_marian", "eng", "deu"))[0]
    assert ex["inputs"][0] == tok.encode_text(">>deu<<")[0] != vocab.UNK_ID
    assert ex["inputs_pretokenized"].decode() == ">>deu<< " + pairs[0][0]
    # A target language without a >>xx<< token fails before anything is registered.
    path2 = tmp_path / "eng-fra.tsv"
    path2.write_text("a\tb\n", encoding="utf-8")
    with pytest.raises(ValueError, match="'>>fra<<'"):
        tasks.register_corpus([{"path": str(path2), "src_lang": "eng", "tgt_lang": "fra"}],
                              None, prefix="t_tf_marian_bad", text_format=fmt)
    assert "t_tf_marian_bad_mix" not in seqio.MixtureRegistry.names()


def test_register_embedded_with_a_format(t5_dir):
    fmt, tok = _format(t5_dir)
    mixture = tasks.register(None, ("en", "de"), prefix="t_tf_bible", text_format=fmt)
    assert mixture == "t_tf_bible_mix"
    for src, tgt in (("en", "de"), ("de", "en")):
        ex = _examples(tasks.task_name("t_tf_bible", src, tgt), "test")[0]
        s, t = embedded.parallel_pairs(src, tgt, "test")[0][0]
        prefixed = signals.format_source(signals.T5_TEMPLATE, s, src, tgt)
        assert ex["inputs_pretokenized"].decode() == prefixed
        assert list(ex["inputs"]) == tok.encode_text(prefixed) + [EOS]
        assert list(ex["targets"]) == tok.encode_target(t) + [EOS]


def test_unknown_name_fails_before_registering(t5_dir, tmp_path):
    fmt, _ = _format(t5_dir)
    path = tmp_path / "en-yo.tsv"
    path.write_text("Hello\tBawo\n", encoding="utf-8")
    with pytest.raises(ValueError, match="'yo'"):
        tasks.register_corpus([{"path": str(path), "src_lang": "en", "tgt_lang": "yo"}],
                              None, prefix="t_tf_yo", text_format=fmt)
    assert not [n for n in seqio.TaskRegistry.names() if n.startswith("t_tf_yo")]
    with pytest.raises(ValueError, match="'yo'"):
        tasks.register(None, ("en", "de"), prefix="t_tf_yo", text_format=signals.TextFormat(
            fmt.input_vocab, fmt.target_vocab, "{tgt_name}", fmt.files,
            check=lambda s, t: signals.lang_name("yo")))
    # No tag piece is needed: the tag check is the default format's only.
    tasks.register_corpus([{"path": str(path), "src_lang": "en", "tgt_lang": "yo"}], None,
                          prefix="t_tf_yo", text_format=_format(t5_dir, "<2{tgt}> ")[0])


def test_register_from_config_passes_the_format(t5_dir, corpus_tsv):
    from jaxmt.config import DataConfig

    fmt, tok = _format(t5_dir)
    cfg = DataConfig(corpora=({"path": corpus_tsv, "src_lang": "en", "tgt_lang": "de"},))
    mixture = tasks.register_from_config(cfg, None, text_format=fmt)
    task = seqio.get_mixture_or_task(mixture).tasks[0]
    assert task.output_features["inputs"].vocabulary is fmt.input_vocab
    assert task.output_features["targets"].vocabulary is fmt.target_vocab


# ----------------------------------------------------------------------------- default path

def test_default_path_unchanged(spm_path, corpus_tsv, pairs):
    """None (spm.model + <2xx>) and the jaxmt-model format give the same examples."""
    sp = vocab.load_processor(spm_path)
    _register(corpus_tsv, "t_tf_tag", spm_path)
    tagged = _examples(tasks.corpus_task_name("t_tf_tag", "en", "de"))
    for ex, (s, t) in zip(tagged, pairs):
        assert ex["inputs_pretokenized"].decode() == embedded.tag_source(s, "de")
        assert list(ex["inputs"]) == sp.encode(embedded.tag_source(s, "de")) + [EOS]
        assert list(ex["targets"]) == sp.encode(t) + [EOS]
    with pytest.raises(FileNotFoundError):
        _register(corpus_tsv, "t_tf_tag_none")  # no vocab_path and no format

    fmt = toklib.text_format(str(spm_path.parent), None, 500)
    assert fmt.template == "<2{tgt}> " and fmt.kind == "jaxmt"
    assert cache.vocab_digest(fmt) == cache.vocab_digest(spm_path)  # caches stay valid
    _register(corpus_tsv, "t_tf_tag2", text_format=fmt)
    again = _examples(tasks.corpus_task_name("t_tf_tag2", "en", "de"))
    for a, b in zip(tagged, again):
        for k in ("inputs", "targets", "inputs_pretokenized"):
            assert np.array_equal(a[k], b[k]), k
    tok = toklib.TaggedTokenizer(sp, ("en", "de"))
    assert list(again[0]["inputs"]) == tok.encode(pairs[0][0], "en", "de") + [EOS]
    with pytest.raises(ValueError, match="no target-language tag for 'ro'"):
        fmt.check_direction("en", "ro")


# ----------------------------------------------------------------------------- cache

def test_cache_digest_covers_every_marian_file(marian_dir, tmp_path):
    fmt, _ = _format(marian_dir)
    digest = cache.vocab_digest(fmt)
    assert digest == cache.vocab_digest(_format(marian_dir)[0])
    for name in ("source.spm", "target.spm", "vocab.json"):
        d = tmp_path / name
        shutil.copytree(marian_dir, d)
        if name == "vocab.json":
            v = json.loads((d / name).read_text())
            a, b = [p for p, i in v.items() if 3 <= i][:2]
            v[a], v[b] = v[b], v[a]
            (d / name).write_text(json.dumps(v, ensure_ascii=False))
        else:
            other = "target.spm" if name == "source.spm" else "source.spm"
            shutil.copyfile(d / other, d / name)
        assert cache.vocab_digest(_format(str(d))[0]) != digest, name


def test_cache_of_one_format_refuses_another(t5_dir, marian_dir, corpus_tsv, tmp_path):
    root = str(tmp_path / "cache")
    t5_fmt, _ = _format(t5_dir)
    mixture = _register(corpus_tsv, "t_tf_cache", text_format=t5_fmt)
    rows = cache.build(root, mixture, t5_fmt, num_shards=1, progress=False)
    assert [r["status"] for r in rows] == ["built", "built"]
    assert cache.is_usable(root, mixture, t5_fmt)

    marian_fmt, tok = _format(marian_dir)
    assert _register(corpus_tsv, "t_tf_cache", text_format=marian_fmt) == mixture
    with pytest.raises(ValueError, match="another SentencePiece model"):
        cache.is_usable(root, mixture, marian_fmt)
    rows = cache.build(root, mixture, marian_fmt, num_shards=1, progress=False)
    assert [r["status"] for r in rows] == ["built", "built"]
    assert cache.is_usable(root, mixture, marian_fmt)
    # What the cache holds is the Marian tokenizer's ids.
    want = set()
    for task in seqio.get_mixture_or_task(mixture).tasks:
        for ex in task.source.get_dataset(split="train", shuffle=False).as_numpy_iterator():
            want.add((tuple(tok.encode_text(ex["inputs"].decode()) + [EOS]),
                      tuple(tok.encode_target(ex["targets"].decode()) + [EOS])))
    it = cache.cached_examples(mixture, root, seed=0, src_len=4096, tgt_len=4096)
    for _ in range(20):
        src, tgt = next(it)[:2]
        assert (tuple(src.tolist()), tuple(tgt.tolist())) in want
