"""Translator: the public, TensorFlow-free inference API.

    from jaxmt import Translator
    t = Translator.from_pretrained("runs/demo")
    t.translate(["In the beginning was the Word."], src_lang="en", tgt_lang="de")

Text goes through SentencePiece directly; the model runs with greedy KV-cache
decoding. Inputs are bucketed by length (powers of two) and padded to a fixed batch,
so a long job compiles only a handful of shapes.
"""

from __future__ import annotations

import os
import re
import sys
import unicodedata
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
import sentencepiece as spm

from jaxmt import config as cfglib
from jaxmt.checkpoint import Checkpointer
from jaxmt.config import DataConfig, ModelConfig
from jaxmt.data.corpora import tag_source
from jaxmt.decoding import EOS_ID, greedy_decode, strip_eos
from jaxmt.model import EncoderDecoderModel

PyTree = Any
MIN_BUCKET = 16
# Anything that str.splitlines() would split on, plus other control characters.
_LINE_BREAKS = re.compile(r"[\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def clean_text(text: str) -> str:
    """Control characters and line breaks become spaces; whitespace is collapsed."""
    text = "".join(" " if unicodedata.category(c) == "Cc" else c for c in text)
    return " ".join(_LINE_BREAKS.sub(" ", text).split())


def _bucket(n: int, cap: int) -> int:
    b = MIN_BUCKET
    while b < n:
        b *= 2
    return min(b, cap)


class Translator:
    """Translates lists of sentences with a trained jaxmt model directory."""

    def __init__(self, model_cfg: ModelConfig, params: PyTree, sp: spm.SentencePieceProcessor,
                 langs: Sequence[str], max_src_len: int = 128, max_decode_len: int = 128,
                 batch_size: int = 32):
        self.model = EncoderDecoderModel(model_cfg)
        self.params = params
        self.sp = sp
        self.langs = tuple(langs)
        self.max_src_len = max_src_len
        self.max_decode_len = max_decode_len
        self.batch_size = batch_size
        self.truncated = 0  # inputs cut to max_src_len so far

    @classmethod
    def from_pretrained(cls, model_dir: str, step: int | None = None, **kwargs) -> "Translator":
        """Loads config, vocabulary and the (latest) checkpoint's parameters onto one device."""
        cfgs = cfglib.load(model_dir)
        model_cfg, data_cfg = cfgs["model"], cfgs.get("data", DataConfig())
        sp = spm.SentencePieceProcessor(model_file=os.path.join(model_dir, cfglib.VOCAB_FILE))
        ckpt = Checkpointer(model_dir, async_save=False)
        step = step if step is not None else ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"{ckpt.directory}: no checkpoint to load.")
        model = EncoderDecoderModel(model_cfg)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shapes = jax.eval_shape(lambda: nn.unbox(
            model.init(jax.random.PRNGKey(0), model.dummy_batch(1, 8, 8))))
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                shapes)
        params = ckpt.restore_params(step, abstract)
        ckpt.close()
        kwargs.setdefault("max_src_len", data_cfg.max_eval_len)
        kwargs.setdefault("max_decode_len", data_cfg.max_eval_len)
        return cls(model_cfg, params, sp, data_cfg.langs, **kwargs)

    def _check_lang(self, lang: str, field: str) -> None:
        if lang not in self.langs:
            raise ValueError(f"{field}={lang!r} is not one of this model's languages {self.langs}")

    def encode(self, text: str, tgt_lang: str) -> list[int]:
        ids = self.sp.encode(tag_source(clean_text(text), tgt_lang))
        if len(ids) + 1 > self.max_src_len:
            self.truncated += 1
            ids = ids[: self.max_src_len - 1]
        return ids + [EOS_ID]

    def translate(self, texts: Sequence[str], src_lang: str, tgt_lang: str) -> list[str]:
        """One output string per input, in order; empty (or blank) inputs give ''."""
        self._check_lang(src_lang, "src_lang")
        self._check_lang(tgt_lang, "tgt_lang")
        out = [""] * len(texts)
        todo = [(i, self.encode(t, tgt_lang)) for i, t in enumerate(texts) if clean_text(t)]
        todo.sort(key=lambda x: len(x[1]))  # similar lengths share a bucket
        bs = self.batch_size
        for start in range(0, len(todo), bs):
            chunk = todo[start:start + bs]
            src_len = _bucket(max(len(ids) for _, ids in chunk), self.max_src_len)
            dec_len = _bucket(2 * src_len, self.max_decode_len)
            arr = np.zeros((bs, src_len), np.int32)
            for r, (_, ids) in enumerate(chunk):
                arr[r, : len(ids)] = ids
            gen = np.asarray(greedy_decode(self.model.module, self.params, arr, dec_len))
            for r, (i, _) in enumerate(chunk):
                out[i] = clean_text(self.sp.decode(strip_eos(gen[r])))
        return out


def translate_stream(translator: Translator, data: bytes, src_lang: str, tgt_lang: str,
                     chunk_lines: int = 512) -> bytes:
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
