"""Text <-> ids for every kind of model directory, without TensorFlow.

Three kinds, chosen by the ``tokenizer`` section of ``jaxmt_config.json``
(:class:`TokenizerConfig`):

* no section: a model trained by jaxmt. One shared SentencePiece model
  (``spm.model``) and a target-language tag ``<2xx>`` before every source text.
* ``kind="t5"``: an imported T5 / mT5 checkpoint with its own ``spiece.model``.
  Its ids already follow jaxmt's convention (pad 0, EOS 1, UNK 2).
* ``kind="marian"``: an imported MarianMT (opus-mt) checkpoint: ``source.spm`` and
  ``target.spm`` split text into pieces, ``vocab.json`` numbers them. Marian numbers
  ``</s>`` 0, ``<unk>`` 1 and ``<pad>`` last, so the importer reorders the
  vocabulary (:func:`id_permutation`) and this tokenizer applies the same reordering.

The imported kinds reproduce what the Hugging Face tokenizers do for translation:
``decode`` stops at EOS and drops the special ids (pad, EOS, UNK, T5's sentinel ids
past the SentencePiece model) as ``skip_special_tokens=True`` does.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Sequence

import numpy as np
import sentencepiece as spm

from jaxmt.config import VOCAB_FILE, DataConfig, TokenizerConfig
from jaxmt.data import signals
from jaxmt.data.embedded import tag_source
from jaxmt.data.vocab import EOS_ID, PAD_ID, UNK_ID, tag_id

_BOUNDARY = "\u2581"  # SentencePiece's word-boundary mark


def id_permutation(vocab_size: int, reordered_ids: Sequence[int]) -> np.ndarray:
    """``perm[jaxmt_id] = original_id``: ``reordered_ids`` first, the rest in order.

    For opus-mt (pad = V-1, ``</s>`` 0, ``<unk>`` 1) this is ``[V-1, 0, 1, 2, ..., V-2]``.
    An embedding table converts with ``table[perm]``; ids map back with ``perm[ids]``.
    """
    first = [int(i) for i in reordered_ids]
    if len(set(first)) != len(first) or any(not 0 <= i < vocab_size for i in first):
        raise ValueError(f"reordered ids {first} must be distinct and below {vocab_size}")
    rest = np.setdiff1d(np.arange(vocab_size), np.asarray(first, np.int64))
    return np.concatenate([np.asarray(first, np.int64), rest])


def _until_eos(ids) -> list[int]:
    out = []
    for t in ids:
        t = int(t)
        if t == EOS_ID:
            break
        out.append(t)
    return out


class Tokenizer:
    """What :class:`~jaxmt.inference.translator.Translator` needs: encode, decode, language checks."""

    langs: tuple[str, ...] = ()
    num_ids: int | None = None  # ids the vocabulary can decode; None: every model id

    def check_langs(self, src_lang: str | None, tgt_lang: str | None) -> None:
        """Raises ValueError when the languages cannot be expressed for this model."""

    def encode(self, text: str, src_lang: str | None, tgt_lang: str | None) -> list[int]:
        """Source ids without the final EOS (the caller truncates, then appends it)."""
        raise NotImplementedError

    def encode_text(self, text: str) -> list[int]:
        """Source-side ids of ``text`` as it is, with no language signal added (``text``
        may already start with one), no EOS."""
        raise NotImplementedError

    def encode_target(self, text: str) -> list[int]:
        """Target-side ids of ``text`` (what the decoder is trained to emit), no EOS."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids, up to the first EOS."""
        raise NotImplementedError


def check_tagged_langs(langs: Sequence[str], src_lang: str | None, tgt_lang: str | None,
                       names: tuple[str, str] = ("src_lang", "tgt_lang")) -> None:
    """A jaxmt-trained model needs both languages, each one it was trained on.

    ``names`` are what the message calls the two arguments (the CLI's ``--src_lang``).
    """
    for lang, name in zip((src_lang, tgt_lang), names):
        if not lang:
            raise ValueError(f"{name} is required: this model translates between "
                             f"{', '.join(langs)}; pass one of them")
        if lang not in langs:
            raise ValueError(f"{name}={lang!r} is not one of this model's languages; choose "
                             f"one of {', '.join(langs)}")


def check_prefixed_langs(cfg: TokenizerConfig, src_lang: str | None, tgt_lang: str | None,
                         names: tuple[str, str] = ("src_lang", "tgt_lang")) -> None:
    """An imported model needs the languages its input prefix names (``{src}``/``{tgt}``,
    ``{src_name}``/``{tgt_name}``: those need a code with a name), and a ``tgt_lang``
    among its ``target_langs`` when it lists them."""
    choices = f" (one of {', '.join(cfg.target_langs)})" if cfg.target_langs else ""
    used = signals.placeholders(cfg.input_prefix)
    for key, lang, name in (("src", src_lang, names[0]), ("tgt", tgt_lang, names[1])):
        if used & {key, key + "_name"} and not lang:
            raise ValueError(f"{name} is required: this model's input prefix is "
                             f"{cfg.input_prefix!r}; pass {name}=CODE"
                             f"{choices if key == 'tgt' else ''}")
    if cfg.target_langs and tgt_lang is not None and tgt_lang not in cfg.target_langs:
        raise ValueError(f"{names[1]}={tgt_lang!r} is not one of this model's target languages; "
                         f"choose one of {', '.join(cfg.target_langs)}")
    signals.format_prefix(cfg.input_prefix, src_lang, tgt_lang)  # a name for every code


BASE_FILE = "base.json"  # a fine-tuned directory's record of its base (inference/pretrained.py)


def tagged_langs(model_dir: str, data_cfg: DataConfig) -> tuple[str, ...]:
    """The languages a jaxmt-tagged model reads: those it trained on, and, fine-tuned
    from a jaxmt base (``jaxmt train --init_from``), the base's (its ``base.json``)."""
    base = []
    path = os.path.join(model_dir, BASE_FILE)
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                base = list(json.load(f).get("langs") or [])
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: unreadable ({e})") from None
    return tuple(dict.fromkeys(base + list(data_cfg.corpus_langs)))


def check_model_langs(cfgs: dict, src_lang: str | None, tgt_lang: str | None,
                      names: tuple[str, str] = ("src_lang", "tgt_lang"),
                      model_dir: str | None = None) -> None:
    """The language check of the tokenizer a model directory's configs describe
    (``jaxmt_config.json``'s sections, and ``model_dir``'s base record), without loading
    any vocabulary or weights."""
    if "tokenizer" in cfgs:
        check_prefixed_langs(cfgs["tokenizer"], src_lang, tgt_lang, names)
    else:
        data = cfgs.get("data", DataConfig())
        langs = tagged_langs(model_dir, data) if model_dir else data.corpus_langs
        check_tagged_langs(langs, src_lang, tgt_lang, names)


class TaggedTokenizer(Tokenizer):
    """jaxmt-trained models: ``"<2xx> text"`` through the shared ``spm.model``."""

    def __init__(self, sp: spm.SentencePieceProcessor, langs: Sequence[str]):
        self.sp = sp
        self.langs = tuple(langs)
        self.num_ids = sp.get_piece_size()

    def check_langs(self, src_lang, tgt_lang):
        check_tagged_langs(self.langs, src_lang, tgt_lang)

    def encode(self, text, src_lang, tgt_lang):
        return self.sp.encode(tag_source(text, tgt_lang))

    def encode_text(self, text):
        return self.sp.encode(text)

    encode_target = encode_text

    def decode(self, ids):
        out = []
        for t in _until_eos(ids):
            if t == PAD_ID:  # greedy decoding pads finished rows; a PAD ends the text
                break
            out.append(t)
        return self.sp.decode(out)


class _Prefixed(Tokenizer):
    """Shared by the imported kinds: the input prefix and its language checks."""

    def __init__(self, cfg: TokenizerConfig):
        self.cfg = cfg
        self.langs = cfg.target_langs

    def check_langs(self, src_lang, tgt_lang):
        check_prefixed_langs(self.cfg, src_lang, tgt_lang)

    def prefix(self, src_lang, tgt_lang) -> str:
        """``input_prefix`` filled in by :func:`jaxmt.data.signals.format_prefix`."""
        return signals.format_prefix(self.cfg.input_prefix, src_lang, tgt_lang)

    def encode(self, text, src_lang, tgt_lang):
        return self.encode_text(self.prefix(src_lang, tgt_lang) + text)


class T5Tokenizer(_Prefixed):
    """T5 / mT5: ``spiece.model`` ids are the model's ids.

    Ids at or past the SentencePiece model's size are T5's sentinel ids
    (``<extra_id_N>``) or unused rows; like the special ids they decode to nothing.
    """

    def __init__(self, cfg: TokenizerConfig, sp: spm.SentencePieceProcessor):
        super().__init__(cfg)
        self.sp = sp

    def encode_text(self, text):
        return self.sp.encode(text)

    encode_target = encode_text

    def decode(self, ids):
        n = self.sp.get_piece_size()
        keep = [t for t in _until_eos(ids)
                if t < n and not (self.sp.is_control(t) or self.sp.is_unknown(t))]
        return self.sp.decode(keep)


class MarianTokenizer(_Prefixed):
    """opus-mt: SentencePiece pieces numbered by ``vocab.json``, then reordered.

    Encoding splits a leading ``>>xx<<`` language code off (it is one vocabulary
    entry), encodes the rest with the source model and looks each piece up in
    ``vocab.json`` (unknown pieces become ``<unk>``). Decoding reverses the lookup and
    joins the pieces with the source model, as the reference tokenizer does for a
    shared vocabulary.
    """

    def __init__(self, cfg: TokenizerConfig, source: spm.SentencePieceProcessor,
                 target: spm.SentencePieceProcessor, vocab: dict[str, int], vocab_size: int):
        super().__init__(cfg)
        self.source, self.target = source, target
        perm = id_permutation(vocab_size, cfg.reordered_ids)  # jaxmt -> original
        self.to_original = perm
        self.from_original = np.argsort(perm)  # original -> jaxmt
        bad = {p: i for p, i in vocab.items() if not 0 <= i < vocab_size}
        if bad:
            raise ValueError(f"{cfg.vocab_files[2]}: ids outside the model's vocabulary "
                             f"(size {vocab_size}): {dict(list(bad.items())[:5])}")
        self.vocab = vocab
        self.pieces = {i: p for p, i in vocab.items()}
        self.unk = int(self.from_original[vocab["<unk>"]])

    def _lookup(self, piece: str) -> int:
        i = self.vocab.get(piece)
        return self.unk if i is None else int(self.from_original[i])

    def _encode_with(self, sp: spm.SentencePieceProcessor, text: str) -> list[int]:
        ids = []
        if text.startswith(">>") and (end := text.find("<<")) != -1:
            ids.append(self._lookup(text[:end + 2]))
            text = text[end + 2:]
        return ids + [self._lookup(p) for p in sp.encode(text, out_type=str)]

    def encode_text(self, text):
        return self._encode_with(self.source, text)

    def encode_target(self, text):
        """``target.spm``'s pieces, numbered by the shared ``vocab.json`` and reordered,
        as the reference tokenizer's ``text_target=`` does."""
        return self._encode_with(self.target, text)

    def unknown_code(self, text: str) -> str | None:
        """The leading ``>>xx<<`` code of ``text`` when ``vocab.json`` lacks it, else None."""
        if text.startswith(">>") and (end := text.find("<<")) != -1:
            code = text[:end + 2]
            return None if code in self.vocab else code
        return None

    def decode(self, ids):
        pieces = []
        for t in _until_eos(ids):
            if t in (PAD_ID, EOS_ID, UNK_ID):
                continue
            orig = int(self.to_original[t])
            pieces.append(self.pieces.get(orig) or self.source.id_to_piece(orig))
        return self.source.decode_pieces(pieces).replace(_BOUNDARY, " ").strip()


def _processor(path: str) -> spm.SentencePieceProcessor:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: SentencePiece model missing")
    return spm.SentencePieceProcessor(model_file=path)


def load_tokenizer(directory: str, cfg: TokenizerConfig, vocab_size: int) -> Tokenizer:
    """The tokenizer of an imported model whose vocabulary files are in ``directory``."""
    files = [os.path.join(directory, f) for f in cfg.vocab_files]
    if cfg.kind == "t5":
        return T5Tokenizer(cfg, _processor(files[0]))
    if not os.path.exists(files[2]):
        raise FileNotFoundError(f"{files[2]}: Marian vocabulary missing")
    with open(files[2], encoding="utf-8") as f:
        vocab = json.load(f)
    if "<unk>" not in vocab:
        raise ValueError(f"{files[2]}: no '<unk>' entry")
    return MarianTokenizer(cfg, _processor(files[0]), _processor(files[1]), vocab, vocab_size)


def _files_key(paths: Sequence[str], salt: str) -> str:
    h = hashlib.sha256(salt.encode())
    for path in paths:
        with open(path, "rb") as f:
            h.update(os.path.basename(path).encode() + b"\x00" + hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def default_template(tok_cfg: TokenizerConfig | None) -> str:
    """The signal a base model understands, when training is not told another.

    A jaxmt-trained model: its tag ``"<2{tgt}> "``. An imported one: its
    ``input_prefix`` when set, else T5's ``"translate {src_name} to {tgt_name}: "``,
    or ``">>{tgt}<< "`` for a Marian vocabulary with ``>>xx<<`` codes, else none.
    """
    if tok_cfg is None:
        return signals.TAG_TEMPLATE
    if tok_cfg.input_prefix:
        return tok_cfg.input_prefix
    if tok_cfg.kind == "t5":
        return signals.T5_TEMPLATE
    return signals.MARIAN_TEMPLATE if tok_cfg.target_langs else ""


def text_format(directory: str, tok_cfg: TokenizerConfig | None, vocab_size: int,
                template: str | None = None) -> signals.TextFormat:
    """What the seqio Tasks need to train on a base model's own tokenizer and signal.

    Imports seqio (and TensorFlow): for training only.

    Args:
        directory: Where the vocabulary files are: a Hugging Face T5 / mT5 / MarianMT
            directory, one written by ``jaxmt convert``, or a jaxmt-trained model
            directory (``spm.model``).
        tok_cfg: Its :class:`TokenizerConfig` (``hf_import.read_configs`` or the
            directory's ``jaxmt_config.json``); None for a jaxmt-trained model.
        vocab_size: The model's vocabulary size (``ModelConfig.vocab_size``): Marian's
            id reordering depends on it.
        template: The source signal (:mod:`jaxmt.data.signals`); default
            :func:`default_template`.

    Returns:
        A :class:`jaxmt.data.signals.TextFormat` whose ids are this module's
        tokenizers' for the same text: ``encode(text, src, tgt)`` for sources (the
        template in place of ``input_prefix``), ``encode_target`` for targets.
    """
    from jaxmt.data import vocab as vocablib  # its seqio_vocabulary imports seqio

    template = default_template(tok_cfg) if template is None else template
    if tok_cfg is None:
        path = os.path.join(directory, VOCAB_FILE)
        sp = _processor(path)
        v = vocablib.seqio_vocabulary(path)

        def check_tag(src: str, tgt: str) -> None:
            if "<2{tgt}>" in template:
                try:
                    tag_id(sp, tgt)
                except ValueError as e:
                    raise ValueError(f"{path}: no target-language tag for {tgt!r} ({e})") from None

        return signals.TextFormat(v, v, template, (path,), check=check_tag, kind="jaxmt")
    files = tuple(os.path.join(directory, f) for f in tok_cfg.vocab_files)
    if tok_cfg.kind == "t5":
        _processor(files[0])  # a clear error when it is missing
        v = vocablib.seqio_vocabulary(files[0])
        return signals.TextFormat(v, v, template, files, kind="t5")
    from jaxmt.data.pyvocab import FunctionVocabulary  # seqio

    tok = load_tokenizer(directory, tok_cfg, vocab_size)

    salt = f"marian:{vocab_size}:{tuple(tok_cfg.reordered_ids)}"
    key = _files_key(files, salt)
    source = FunctionVocabulary(tok.encode_text, tok.decode, vocab_size, key=key + ":source")
    target = FunctionVocabulary(tok.encode_target, tok.decode, vocab_size, key=key + ":target")

    def check_code(src: str, tgt: str) -> None:
        code = tok.unknown_code(signals.format_prefix(template, src, tgt))
        if code is not None:
            have = ", ".join(tok_cfg.target_langs) or "none"
            raise ValueError(f"{files[2]}: no token {code!r} for {src}->{tgt} (template "
                             f"{template!r}); this model's language codes: {have}")

    return signals.TextFormat(source, target, template, files, salt=salt, check=check_code,
                              kind="marian")
