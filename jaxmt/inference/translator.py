"""Translator: the public, TensorFlow-free inference API.

    from jaxmt import Translator
    t = Translator.from_pretrained("runs/demo")
    t.translate(["In the beginning was the Word."], src_lang="en", tgt_lang="de")
    Translator.from_pretrained("opus-mt-en-de").translate(["Good morning."])  # Hugging Face dir

Text goes through SentencePiece directly (:mod:`jaxmt.inference.tokenizer`); the Model
decodes (``EncoderDecoderModel.predict_batch``, greedy with a KV cache). Inputs are
bucketed by length (powers of two) and padded to a fixed batch, so a long job compiles
only a handful of shapes.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import unicodedata
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import sentencepiece as spm

from jaxmt import config as cfglib
from jaxmt.checkpoint import Checkpointer
from jaxmt.config import DataConfig, ModelConfig
from jaxmt.data.vocab import EOS_ID
from jaxmt.inference.tokenizer import TaggedTokenizer, Tokenizer, load_tokenizer
from jaxmt.modeling.model import EncoderDecoderModel

PyTree = Any
MIN_BUCKET = 16
IMPORTED_MAX_LEN = 256  # source and output token limit of imported models (no DataConfig)
# Anything that str.splitlines() would split on, plus other control characters.
_LINE_BREAKS = re.compile(r"[\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def clean_text(text: str) -> str:
    """Control characters and line breaks become spaces; whitespace is collapsed."""
    text = "".join(" " if unicodedata.category(c) == "Cc" else c for c in text)
    return " ".join(_LINE_BREAKS.sub(" ", text).split())


def suppress_ids(params: PyTree, ids: Sequence[int]) -> PyTree:
    """Parameters whose logits can never pick ``ids`` (the reference's ``bad_words_ids``).

    Done through ``final_logits_bias``, so decoding itself needs no change; only the
    returned copy is affected, never a saved checkpoint.
    """
    if not ids:
        return params
    dec = params["decoder"]
    if "final_logits_bias" not in dec:
        raise ValueError(f"suppressing token ids {list(ids)} needs a final_logits_bias")
    # -1e10 like the attention masks: never the argmax, and no inf to poison a softmax.
    bias = jnp.asarray(dec["final_logits_bias"]).at[jnp.asarray(ids)].set(-1e10)
    return {**params, "decoder": {**dec, "final_logits_bias": bias}}


def with_encoder_attention(model_cfg: ModelConfig, impl: str | None) -> ModelConfig:
    """``model_cfg`` with only its encoder's attention implementation replaced (None:
    unchanged); the trained windows, decoder and cross-attention settings stay."""
    if impl is None:
        return model_cfg
    return dataclasses.replace(
        model_cfg, attention=dataclasses.replace(model_cfg.attention, encoder=impl))


def _bucket(n: int, cap: int) -> int:
    b = MIN_BUCKET
    while b < n:
        b *= 2
    return min(b, cap)


class Translator:
    """Translates lists of sentences with a jaxmt model directory or an imported checkpoint.

    Args:
        model_cfg: The network's configuration.
        params: Its parameters.
        tokenizer: Text <-> ids (:mod:`jaxmt.inference.tokenizer`).
        max_src_len: Longer inputs are truncated (and counted in ``truncated``).
        max_decode_len: The most tokens generated per sentence.
        batch_size: Sentences per decoding call.
        suppressed_ids: Ids never generated (see :func:`suppress_ids`).
    """

    def __init__(self, model_cfg: ModelConfig, params: PyTree, tokenizer: Tokenizer,
                 max_src_len: int = 128, max_decode_len: int = 128, batch_size: int = 32,
                 suppressed_ids: Sequence[int] = ()):
        self.model = EncoderDecoderModel(model_cfg)
        self.params = suppress_ids(params, suppressed_ids)
        self.tokenizer = tokenizer
        self.langs = tokenizer.langs
        self.max_src_len = max_src_len
        self.max_decode_len = max_decode_len
        self.batch_size = batch_size
        self.truncated = 0  # inputs cut to max_src_len so far

    @classmethod
    def from_pretrained(cls, model_dir: str, step: int | None = None,
                        input_prefix: str | None = None, precision: str = "fp32",
                        encoder_attention: str | None = None, **kwargs) -> "Translator":
        """Loads config, vocabulary and the (latest) checkpoint's parameters onto one device.

        ``model_dir`` is a jaxmt model directory (trained, or written by ``jaxmt
        convert``) or a Hugging Face T5 / mT5 / MarianMT directory, converted in memory
        (:mod:`jaxmt.inference.hf_import`) with the given ``precision`` policy. Nothing
        is written into it. Without ``step``, the newest readable checkpoint is used (an
        unreadable newer one is skipped with a warning). ``input_prefix`` replaces an
        imported model's source prefix (e.g. ``"translate English to German: "`` for
        T5); other keyword arguments go to the constructor. ``encoder_attention``
        replaces only the encoder's attention implementation (e.g. ``"local"`` for long
        inputs; the parameters are the same); every other trained attention setting
        (windows, decoder, cross-attention) is kept.
        """
        from jaxmt.inference import hf_import

        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        if hf_import.is_hf_checkpoint(model_dir):
            imported = hf_import.import_checkpoint(model_dir, precision=precision,
                                                   input_prefix=input_prefix)
            params = jax.device_put(imported.params, device)
            model_cfg = with_encoder_attention(imported.model, encoder_attention)
            return cls._imported(model_dir, model_cfg, imported.tokenizer, params, **kwargs)
        cfgs = cfglib.load(model_dir)
        model_cfg = with_encoder_attention(cfgs["model"], encoder_attention)
        ckpt = Checkpointer(model_dir, async_save=False, read_only=True)  # writes nothing
        try:
            shapes = EncoderDecoderModel(model_cfg).param_shapes()
            abstract = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)
            if step is None:
                step, params = ckpt.restore_latest_params(abstract)
            else:
                params = ckpt.restore_params(step, abstract)
        finally:
            ckpt.close()
        if "tokenizer" in cfgs:  # written by `jaxmt convert`
            tok_cfg = cfgs["tokenizer"]
            if input_prefix is not None:
                tok_cfg = dataclasses.replace(tok_cfg, input_prefix=input_prefix)
            return cls._imported(model_dir, model_cfg, tok_cfg, params, **kwargs)
        data_cfg = cfgs.get("data", DataConfig())
        sp = spm.SentencePieceProcessor(model_file=os.path.join(model_dir, cfglib.VOCAB_FILE))
        kwargs.setdefault("max_src_len", data_cfg.max_eval_len)
        kwargs.setdefault("max_decode_len", data_cfg.max_eval_len)
        return cls(model_cfg, params, TaggedTokenizer(sp, data_cfg.corpus_langs), **kwargs)

    @classmethod
    def _imported(cls, vocab_dir: str, model_cfg: ModelConfig, tok_cfg, params: PyTree,
                  **kwargs) -> "Translator":
        tokenizer = load_tokenizer(vocab_dir, tok_cfg, model_cfg.vocab_size)
        kwargs.setdefault("max_src_len", IMPORTED_MAX_LEN)
        kwargs.setdefault("max_decode_len", IMPORTED_MAX_LEN)
        kwargs.setdefault("suppressed_ids", tok_cfg.suppressed_ids)
        return cls(model_cfg, params, tokenizer, **kwargs)

    def encode(self, text: str, tgt_lang: str | None, src_lang: str | None = None) -> list[int]:
        """Source ids of one text, truncated to ``max_src_len``, ending in EOS."""
        ids = self.tokenizer.encode(clean_text(text), src_lang, tgt_lang)
        if len(ids) + 1 > self.max_src_len:
            self.truncated += 1
            ids = ids[: self.max_src_len - 1]
        return ids + [EOS_ID]

    def translate(self, texts: Sequence[str], src_lang: str | None = None,
                  tgt_lang: str | None = None) -> list[str]:
        """One output string per input, in order; empty (or blank) inputs give ''.

        A jaxmt-trained model needs both languages; an imported one only those its
        input prefix names (e.g. ``tgt_lang`` for multilingual Marian), or none.
        """
        self.tokenizer.check_langs(src_lang, tgt_lang)
        out = [""] * len(texts)
        todo = [(i, self.encode(t, tgt_lang, src_lang)) for i, t in enumerate(texts)
                if clean_text(t)]
        todo.sort(key=lambda x: len(x[1]))  # similar lengths share a bucket
        bs = self.batch_size
        for start in range(0, len(todo), bs):
            chunk = todo[start:start + bs]
            src_len = _bucket(max(len(ids) for _, ids in chunk), self.max_src_len)
            dec_len = _bucket(2 * src_len, self.max_decode_len)
            arr = np.zeros((bs, src_len), np.int32)
            for r, (_, ids) in enumerate(chunk):
                arr[r, : len(ids)] = ids
            gen = np.asarray(self.model.predict_batch(
                self.params, {"encoder_input_tokens": arr}, max_decode_len=dec_len,
                num_ids=self.tokenizer.num_ids))
            for r, (i, _) in enumerate(chunk):
                out[i] = clean_text(self.tokenizer.decode(gen[r]))
        return out


def translate_stream(translator: Translator, data: bytes, src_lang: str | None,
                     tgt_lang: str | None, chunk_lines: int = 512) -> bytes:
    """Line contract of ``jaxmt translate``: exactly one output line per input line.

    Lines are split on b"\\n" only (a lone \\r or U+2028 inside a line stays one line);
    invalid UTF-8 is replaced, not fatal.
    """
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":  # the final newline ends the last line
        lines.pop()
    texts = [ln.decode("utf-8", errors="replace") for ln in lines]
    outs = []
    for s in range(0, len(texts), chunk_lines):
        outs.extend(translator.translate(texts[s:s + chunk_lines], src_lang, tgt_lang))
    if translator.truncated:
        print(f"note: {translator.truncated} input line(s) longer than {translator.max_src_len} "
              f"tokens were truncated", file=sys.stderr)
    return "".join(o + "\n" for o in outs).encode("utf-8")
