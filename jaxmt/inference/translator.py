"""Translator: the public, TensorFlow-free inference API.

    from jaxmt import Translator
    t = Translator.from_pretrained("runs/demo")
    t.translate(["In the beginning was the Word."], src_lang="en", tgt_lang="de")
    Translator.from_pretrained("opus-mt-en-de").translate(["Good morning."])  # Hugging Face dir

    t.translate(texts, src_lang="en", tgt_lang="de", strategy="greedy")  # DecodeConfig fields
    t.translate_n_best(texts, src_lang="en", tgt_lang="de", n_best=4)  # texts and scores

Text goes through SentencePiece directly (:mod:`jaxmt.inference.tokenizer`); the Model
decodes (``EncoderDecoderModel.predict_batch_with_aux``: greedy, beam search or
sampling over a KV cache, as the model directory's :class:`jaxmt.config.DecodeConfig`
says). Inputs are sorted by length and batched by a token budget in power-of-two shapes,
so a long job compiles only a handful of shapes.

Decoding runs on a :class:`~jaxmt.sharding.partitioning.Partitioner`'s mesh (one device
unless ``mesh=`` / ``jaxmt translate --mesh`` says otherwise): the batch splits over the
data axes and the parameters follow the rule table, so a model too large for one device
still decodes::

    Translator.from_pretrained("runs/big", mesh=MeshConfig(data=4, tensor=2))
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
import sys
import unicodedata
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from jaxmt import config as cfglib
from jaxmt.checkpoint import Checkpointer, abstract_like
from jaxmt.config import (IMPORTED_DECODE, IMPORTED_MAX_LEN, DataConfig, DecodeConfig,
                          MeshConfig, ModelConfig)
from jaxmt.data.packing import LANG_KEYS
from jaxmt.data.vocab import EOS_ID
from jaxmt.inference import pretrained
from jaxmt.inference.tokenizer import TaggedTokenizer, Tokenizer, load_tokenizer, tagged_langs
from jaxmt.modeling import param_tree
from jaxmt.modeling.model import EncoderDecoderModel
from jaxmt.sharding.partitioning import Partitioner

PyTree = Any
MIN_BUCKET = 16
PROGRESS_MIN_LINES = 256  # jobs this long show a progress bar
# Anything that str.splitlines() would split on, plus other control characters.
_LINE_BREAKS = re.compile(r"[\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def clean_text(text: str) -> str:
    """Control characters and line breaks become spaces; whitespace is collapsed."""
    text = "".join(" " if unicodedata.category(c) == "Cc" else c for c in text)
    return " ".join(_LINE_BREAKS.sub(" ", text).split())


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


@dataclasses.dataclass
class DecodeStats:
    """What a translator has done so far (``Translator.stats``); reported by the CLI."""

    lines: int = 0  # non-blank inputs translated
    src_tokens: int = 0
    out_tokens: int = 0  # of the best output
    src_truncated: int = 0  # inputs longer than max_src_len, cut
    out_truncated: int = 0  # best outputs that reached their length limit without EOS
    # The (max_len_a, max_len_b) of the calls whose outputs were cut, for the report.
    cut_caps: set[tuple[float, int]] = dataclasses.field(default_factory=set)


@dataclasses.dataclass(frozen=True)
class Hypothesis:
    """One output of :meth:`Translator.translate_n_best`: text and its decoding score
    (beam search: length-penalised log-probability; greedy and sampling: log-probability)."""

    text: str
    score: float


def floor_pow2(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def make_partitioner(mesh: MeshConfig | None = None) -> Partitioner:
    """The mesh a translator decodes on: ``mesh`` over every device of this process, or
    (None) its first device alone. This process's: in a multi-process run (``jaxmt distill
    translate``) each process decodes its own inputs."""
    if mesh is None:
        return Partitioner(MeshConfig(), jax.local_devices()[:1])
    return Partitioner(mesh, jax.local_devices())


@functools.lru_cache(maxsize=4)  # from_pretrained and the constructor ask alike (~1 s, T5-base)
def param_placement(model_cfg: ModelConfig, partitioner: Partitioner) -> PyTree:
    """Abstract parameters (``jax.ShapeDtypeStruct``s) carrying the shardings the
    partitioner's :attr:`~Partitioner.param_rules` give them: restore and placement targets.

    Raises:
        ValueError: the mesh does not divide the model's dimensions (checked first).
    """
    partitioner.check_model(model_cfg)
    model = EncoderDecoderModel(model_cfg)
    boxed = partitioner.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), model.dummy_batch(1, 8, 8)))
    return abstract_like(nn.unbox(boxed), partitioner.logical_shardings(boxed, params=True))


class Translator:
    """Translates lists of sentences with a jaxmt model directory or an imported checkpoint.

    Inputs are sorted by length and cut into batches of one source bucket (a power of
    two) each, with as many rows as ``max_tokens`` allows (a power of two, at most
    ``batch_size``), so a long job compiles a handful of shapes and short sentences
    share big batches; outputs come back in input order.

    Args:
        model_cfg: The network's configuration.
        params: Its parameters.
        tokenizer: Text <-> ids (:mod:`jaxmt.inference.tokenizer`).
        max_src_len: Longer inputs are truncated (counted in ``stats.src_truncated``).
        max_decode_len: The most tokens an output can have, whatever ``decode`` allows.
        batch_size: The most sentences per decoding call.
        max_tokens: Source tokens x hypotheses (beams or samples) per decoding call.
        decode: How to decode (:class:`jaxmt.config.DecodeConfig`); ``translate``'s
            keyword arguments override single fields.
        progress: A progress bar on stderr (lines/s, tokens/s): True, False, or None
            for jobs of at least :data:`PROGRESS_MIN_LINES` lines.
        partitioner: The mesh to decode on (:func:`make_partitioner`); default the first
            device. ``params`` are placed as its rules say (a no-op for parameters
            restored there), and each batch's rows are split over its data axes.

    Raises:
        ValueError: the partitioner's mesh does not divide the model's dimensions.
    """

    def __init__(self, model_cfg: ModelConfig, params: PyTree, tokenizer: Tokenizer,
                 max_src_len: int = 128, max_decode_len: int = 128, batch_size: int = 64,
                 max_tokens: int = 16384, decode: DecodeConfig = DecodeConfig(),
                 progress: bool | None = None, partitioner: Partitioner | None = None):
        self.model = EncoderDecoderModel(model_cfg)
        self.partitioner = partitioner if partitioner is not None else make_partitioner()
        placement = param_placement(model_cfg, self.partitioner)
        self.params = jax.device_put(params, jax.tree.map(lambda a: a.sharding, placement))
        model = self.model

        def predict(params, batch, rng, decode, max_decode_len, num_ids):
            return model.predict_batch_with_aux(params, batch, decode=decode,
                                                max_decode_len=max_decode_len,
                                                num_ids=num_ids, rng=rng)
        # Compiled once per (shape, decode config, length): the modules' logical
        # constraints resolve on this mesh; inputs bring their own shardings.
        self._predict = self.partitioner.jit(predict, static_argnums=(3, 4, 5))
        self.tokenizer = tokenizer
        self.langs = tokenizer.langs
        self.max_src_len = max_src_len
        self.max_decode_len = max_decode_len
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.decode = decode
        self.progress = progress
        self.stats = DecodeStats()

    @classmethod
    def from_pretrained(cls, model_dir: str, step: int | None = None,
                        input_prefix: str | None = None, precision: str = "fp32",
                        encoder_attention: str | None = None, mesh: MeshConfig | None = None,
                        merge_lora: bool = False, **kwargs) -> "Translator":
        """Loads config, vocabulary and the (latest) checkpoint's parameters.

        ``model_dir`` is a jaxmt model directory (trained, or written by ``jaxmt
        convert``) or a Hugging Face T5 / mT5 / MarianMT directory, converted in memory
        (:mod:`jaxmt.inference.hf_import`) with the given ``precision`` policy. Nothing
        is written into it. Decoding follows the directory's ``decode`` section (an
        imported checkpoint's generation defaults), unless ``decode=`` is given. Without
        ``step``, the newest readable checkpoint is used (an unreadable newer one is
        skipped with a warning). ``input_prefix`` replaces an imported model's source
        prefix (e.g. ``"translate English to German: "`` for T5); other keyword
        arguments go to the constructor. ``encoder_attention`` replaces only the
        encoder's attention implementation (e.g. ``"local"`` for long inputs; the
        parameters are the same); every other trained attention setting is kept.

        ``mesh`` spreads decoding over every device (:class:`jaxmt.config.MeshConfig`;
        default: the first device alone): checkpoint parameters are restored straight
        into their shards, imported ones placed there after conversion.

        A directory fine-tuned with adapters or LoRA over a frozen base
        (``jaxmt train --init_from``) holds only those parameters: the base named in its
        ``base.json`` is loaded with them, once its fingerprint is checked.
        ``merge_lora`` folds LoRA factors into the base weights (the same outputs, at
        the base model's cost).

        Raises:
            ValueError: ``mesh`` does not fit the devices or the model's dimensions
                (before any weights are read); the base of an adapter/LoRA directory is
                missing or has changed since it was trained on.
        """
        from jaxmt.inference import hf_import

        kwargs["partitioner"] = partitioner = make_partitioner(mesh)
        if hf_import.is_hf_checkpoint(model_dir):
            partitioner.check_model(hf_import.read_configs(model_dir)[0])  # before the weights
            imported = hf_import.import_checkpoint(model_dir, precision=precision,
                                                   input_prefix=input_prefix)
            model_cfg = with_encoder_attention(imported.model, encoder_attention)
            kwargs.setdefault("decode", getattr(imported, "decode", IMPORTED_DECODE))
            return cls._imported(model_dir, model_cfg, imported.tokenizer, imported.params,
                                 **kwargs)
        cfgs = cfglib.load(model_dir)
        model_cfg = with_encoder_attention(cfgs["model"], encoder_attention)
        abstract = param_placement(model_cfg, partitioner)
        record = pretrained.read_record(model_dir)
        base = None
        if record.get("saved") == "trainable":  # checked before any weights are read
            base = pretrained.base_of(model_dir, scan_layers=model_cfg.scan_layers)
            stored = param_tree.subset(abstract, param_tree.trainable_paths(
                param_tree.paths(abstract), cfgs["train"], model_cfg))
        ckpt = Checkpointer(model_dir, async_save=False, read_only=True)  # writes nothing
        try:
            target = abstract if base is None else stored
            if step is None:
                step, params = ckpt.restore_latest_params(target)
            else:
                params = ckpt.restore_params(step, target)
        finally:
            ckpt.close()
        if base is not None:
            params = param_tree.assemble(abstract, pretrained.load_params(base, abstract), params)
        if merge_lora and model_cfg.lora.rank:
            from jaxmt.modeling.adapters import merge_lora as merge
            params, model_cfg = merge(params, model_cfg)
        if "tokenizer" in cfgs:  # written by `jaxmt convert`
            tok_cfg = cfgs["tokenizer"]
            if input_prefix is not None:
                tok_cfg = dataclasses.replace(tok_cfg, input_prefix=input_prefix)
            kwargs.setdefault("decode", cfgs.get("decode", IMPORTED_DECODE))
            return cls._imported(model_dir, model_cfg, tok_cfg, params, **kwargs)
        data_cfg = cfgs.get("data", DataConfig())
        sp = spm.SentencePieceProcessor(model_file=os.path.join(model_dir, cfglib.VOCAB_FILE))
        kwargs.setdefault("max_src_len", data_cfg.max_eval_len)
        kwargs.setdefault("max_decode_len", data_cfg.max_eval_len)
        kwargs.setdefault("decode", cfgs.get("decode", DecodeConfig()))
        return cls(model_cfg, params, TaggedTokenizer(sp, tagged_langs(model_dir, data_cfg)),
                   **kwargs)

    @classmethod
    def _imported(cls, vocab_dir: str, model_cfg: ModelConfig, tok_cfg, params: PyTree,
                  **kwargs) -> "Translator":
        tokenizer = load_tokenizer(vocab_dir, tok_cfg, model_cfg.vocab_size)
        kwargs.setdefault("max_src_len", IMPORTED_MAX_LEN)
        kwargs.setdefault("max_decode_len", IMPORTED_MAX_LEN)
        decode = kwargs["decode"]
        banned = tuple(sorted(set(decode.suppressed_ids) | set(tok_cfg.suppressed_ids)))
        kwargs["decode"] = dataclasses.replace(decode, suppressed_ids=banned)
        return cls(model_cfg, params, tokenizer, **kwargs)

    def encode(self, text: str, tgt_lang: str | None, src_lang: str | None = None) -> list[int]:
        """Source ids of one text, truncated to ``max_src_len``, ending in EOS."""
        ids = self.tokenizer.encode(clean_text(text), src_lang, tgt_lang)
        if len(ids) + 1 > self.max_src_len:
            self.stats.src_truncated += 1
            ids = ids[: self.max_src_len - 1]
        return ids + [EOS_ID]

    def decode_config(self, **overrides) -> DecodeConfig:
        """This translator's :class:`DecodeConfig` with ``overrides`` (field names) replaced.

        Raises:
            ValueError: an unknown field (with the closest name) or a value the config
                rejects, naming the field.
        """
        fields = {f.name for f in dataclasses.fields(DecodeConfig)}
        for name in overrides:
            if name not in fields:
                close = difflib.get_close_matches(name, fields, n=1)
                raise ValueError(f"DecodeConfig has no field {name!r}"
                                 + (f"; did you mean {close[0]!r}?" if close else ""))
        return dataclasses.replace(self.decode, **overrides)

    def translate(self, texts: Sequence[str], src_lang: str | None = None,
                  tgt_lang: str | None = None, **overrides) -> list[str]:
        """One output string per input, in order; empty (or blank) inputs give ''.

        A jaxmt-trained model needs both languages; an imported one only those its
        input prefix names (e.g. ``tgt_lang`` for multilingual Marian), or none.
        ``overrides`` replace fields of the decoding config for this call, e.g.
        ``beam_size=8`` or ``strategy="greedy"``.
        """
        overrides["n_best"] = 1
        return [h[0].text for h in self.translate_n_best(texts, src_lang, tgt_lang,
                                                         **overrides)]

    def translate_n_best(self, texts: Sequence[str], src_lang: str | None = None,
                         tgt_lang: str | None = None, **overrides) -> list[list[Hypothesis]]:
        """``n_best`` hypotheses per input, best first (see :meth:`translate`); a blank
        input gives ``n_best`` empty hypotheses scored 0."""
        cfg = self.decode_config(**overrides)
        self.tokenizer.check_langs(src_lang, tgt_lang)
        out = [[Hypothesis("", 0.0)] * cfg.n_best for _ in texts]
        todo = [(i, self.encode(t, tgt_lang, src_lang)) for i, t in enumerate(texts)
                if clean_text(t)]
        todo.sort(key=lambda x: len(x[1]))  # similar lengths share a bucket
        show = self.progress if self.progress is not None else len(todo) >= PROGRESS_MIN_LINES
        bar = tqdm(total=len(todo), desc="translate", unit="line", disable=not show,
                   dynamic_ncols=True, file=sys.stderr)
        rng = jax.random.PRNGKey(cfg.seed)
        dp = self.partitioner.data_parallel_size
        start, n_batch = 0, 0
        while start < len(todo):
            src_len = _bucket(len(todo[start][1]), self.max_src_len)
            # The batches do not depend on the mesh (so sampling draws the same numbers).
            rows = min(self.batch_size, floor_pow2(self.max_tokens // (src_len * cfg.outputs)))
            chunk = []  # up to `rows` inputs of this bucket
            while (start < len(todo) and len(chunk) < rows
                   and _bucket(len(todo[start][1]), self.max_src_len) == src_len):
                chunk.append(todo[start])
                start += 1
            dec_len = _bucket(int(cfg.max_len_a * src_len + cfg.max_len_b), self.max_decode_len)
            # All-padding rows up to a multiple of the data-parallel size; dropped after.
            arr = np.zeros((-(-rows // dp) * dp, src_len), np.int32)
            for r, (_, ids) in enumerate(chunk):
                arr[r, : len(ids)] = ids
            batch = {"encoder_input_tokens": arr}
            if self.model.cfg.adapter.size:  # language adapters route by the direction
                for key, i in zip(LANG_KEYS, self.model.cfg.adapter.route_ids(src_lang, tgt_lang)):
                    batch[key] = np.full((arr.shape[0],), i, np.int32)
            rows_spec = jax.sharding.PartitionSpec(self.partitioner.batch_spec[0])
            batch = {k: jax.device_put(v, self.partitioner.batch_sharding if v.ndim == 2
                                       else self.partitioner.sharding(rows_spec))
                     for k, v in batch.items()}
            ids, scores = self._predict(self.params, batch, jax.random.fold_in(rng, n_batch),
                                        cfg, dec_len, self.tokenizer.num_ids)
            ids, scores = np.asarray(ids), np.asarray(scores)  # gathered to the host
            n_batch += 1
            for r, (i, src) in enumerate(chunk):
                out[i] = [Hypothesis(clean_text(self.tokenizer.decode(ids[r, n])),
                                     float(scores[r, n])) for n in range(cfg.n_best)]
                best = ids[r, 0]
                ended = np.flatnonzero(best == EOS_ID)
                self.stats.out_tokens += int(ended[0]) + 1 if ended.size else len(best)
                self.stats.out_truncated += int(not ended.size)
                if not ended.size:
                    self.stats.cut_caps.add((cfg.max_len_a, cfg.max_len_b))
                self.stats.src_tokens += len(src)
            self.stats.lines += len(chunk)
            bar.update(len(chunk))
            elapsed = max(bar.format_dict["elapsed"], 1e-9)
            bar.set_postfix_str(f"{self.stats.src_tokens / elapsed:,.0f} src tok/s, "
                                f"{self.stats.out_tokens / elapsed:,.0f} out tok/s", refresh=False)
        bar.close()
        return out

    def report(self) -> list[str]:
        """Notes on what was cut, for stderr: inputs over ``max_src_len``, outputs that
        hit their length limit."""
        notes = []
        if self.stats.src_truncated:
            notes.append(f"note: {self.stats.src_truncated} input line(s) longer than "
                         f"{self.max_src_len} tokens were truncated (raise --max_len)")
        if self.stats.out_truncated:
            caps = " or ".join(f"{a:g} x source tokens + {b}"
                               for a, b in sorted(self.stats.cut_caps))
            notes.append(
                f"note: {self.stats.out_truncated} of {self.stats.lines} output(s) reached "
                f"their length limit without ending (at most {caps}, and "
                f"{self.max_decode_len}); raise --max_len_a/--max_len_b or --max_len if they "
                "are cut short")
        return notes


def translate_stream(translator: Translator, data: bytes, src_lang: str | None,
                     tgt_lang: str | None, n_best: int | None = None, **overrides) -> bytes:
    """Line contract of ``jaxmt translate``: exactly one output line per input line, or
    with ``n_best`` K, K lines ``index<TAB>score<TAB>text`` per input line (index from 0).

    Lines are split on b"\\n" only (a lone \\r or U+2028 inside a line stays one line);
    invalid UTF-8 is replaced, not fatal. What was truncated goes to stderr.
    """
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":  # the final newline ends the last line
        lines.pop()
    texts = [ln.decode("utf-8", errors="replace") for ln in lines]
    if n_best is None:
        out = [o + "\n" for o in translator.translate(texts, src_lang, tgt_lang, **overrides)]
    else:
        out = [f"{i}\t{h.score:.4f}\t{h.text}\n" for i, hyps in enumerate(
            translator.translate_n_best(texts, src_lang, tgt_lang, n_best=n_best, **overrides))
            for h in hyps]
    for note in translator.report():
        print(note, file=sys.stderr)
    return "".join(out).encode("utf-8")
