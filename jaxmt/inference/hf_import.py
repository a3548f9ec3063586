"""Imports Hugging Face T5, mT5 and MarianMT checkpoints as jaxmt models.

    jaxmt convert --from_hf ~/opus-mt-en-de --out runs/opus-en-de
    Translator.from_pretrained("~/opus-mt-en-de")  # the same conversion, in memory

A Hugging Face directory holds ``config.json`` (with ``model_type``), the weights
(``model.safetensors``, ``pytorch_model.bin`` or a sharded index of either) and the
tokenizer files: ``spiece.model`` for T5/mT5; ``source.spm``, ``target.spm`` and
``vocab.json`` for Marian. Weights are read with ``safetensors.numpy``; ``.bin``
files go through ``torch.load(weights_only=True)`` (torch is imported only then),
so no arbitrary object is ever unpickled.

What the conversion does besides renaming and transposing:

* T5 keeps one relative-bias table per stack in block 0; jaxmt shares one per stack too.
  Original T5 (``tie_word_embeddings`` true) ties the output layer and rescales the
  decoder output by ``d_model ** -0.5``; T5.1.1/mT5 checkpoints carry an untied
  ``lm_head``. The checkpoint's ``tie_word_embeddings`` decides (transformers 5 ties
  every T5 at run time); a tied mT5 is not rescaled, as in the reference's mT5 code.
* Marian scales attention scores by ``head_dim ** -0.5``; jaxmt follows T5 and does
  not, so the scale is folded into the query kernel and bias.
* Marian numbers ``</s>`` 0, ``<unk>`` 1 and ``<pad>`` (the decoder start) last; jaxmt
  needs pad 0, EOS 1, UNK 2. The vocabulary rows (embedding, output layer,
  ``final_logits_bias``) are reordered with :func:`jaxmt.inference.tokenizer.id_permutation`
  and the tokenizer record stores the same reordering.
* The generation defaults (``generation_config.json``, or ``config.json``'s generation
  fields in older checkpoints) become a :class:`jaxmt.config.DecodeConfig`, the
  ``decode`` section ``jaxmt convert`` writes: ``num_beams``, ``length_penalty``,
  ``early_stopping``, ``max_length``/``max_new_tokens``, ``min_length``,
  ``forced_eos_token_id``, ``no_repeat_ngram_size``, ``repetition_penalty``, sampling,
  and single-token ``bad_words_ids`` (opus-mt bans ``<pad>``) as ``suppressed_ids``
  (:mod:`jaxmt.inference.hf_generation` has the mapping). With them, beam search gives
  the reference ``generate()``'s outputs (``tests/test_decode_parity.py``).

Anything the converter cannot represent exactly fails with an :class:`HFImportError`
that names the config field and file, or the tensor.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import numpy as np

from jaxmt.config import (CONFIG_FILE, IMPORTED_DECODE, DecodeConfig, ModelConfig,
                          TokenizerConfig, to_json)
from jaxmt.fileio import atomic_directory, write_atomic
from jaxmt.inference import hf_generation
from jaxmt.inference.hf_config import ConfigFields, HFImportError
from jaxmt.inference.tokenizer import id_permutation

PyTree = Any
HF_CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
ARCHITECTURES = {"t5": ("T5ForConditionalGeneration", "T5WithLMHeadModel"),
                 "mt5": ("MT5ForConditionalGeneration",),
                 "marian": ("MarianMTModel",)}
MARIAN_LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default; not in Marian's config

@dataclasses.dataclass(frozen=True)
class ImportedModel:
    """A converted checkpoint: the model and tokenizer records, unrolled-or-scanned params
    and the checkpoint's generation defaults."""

    model: ModelConfig
    tokenizer: TokenizerConfig
    params: PyTree
    decode: DecodeConfig = IMPORTED_DECODE


def is_hf_checkpoint(path: str) -> bool:
    """True for a directory with a Hugging Face ``config.json`` (one with ``model_type``)."""
    cfg = os.path.join(path, HF_CONFIG)
    if not os.path.isfile(cfg) or os.path.exists(os.path.join(path, CONFIG_FILE)):
        return False
    try:
        with open(cfg, encoding="utf-8") as f:
            return "model_type" in json.load(f)
    except (OSError, ValueError):
        return False


# ----------------------------------------------------------------------------- reading

def _load_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFImportError(f"{path}: not a JSON file ({e}); the Hugging Face checkpoint "
                            "is damaged, download it again") from e


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    try:
        return {k: np.asarray(v, np.float32) for k, v in load_file(path).items()}
    except TypeError:  # bfloat16: numpy has no such dtype; read the raw layout with ml_dtypes
        return _read_safetensors_raw(path)


def _read_safetensors_raw(path: str) -> dict[str, np.ndarray]:
    import ml_dtypes  # a jax dependency

    dtypes = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in dtypes:
            raise HFImportError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        arr = np.frombuffer(data[start:end], dtype=dtypes[info["dtype"]])
        out[name] = arr.reshape(info["shape"]).astype(np.float32)
    return out


def _read_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{path}: reading PyTorch .bin weights needs torch "
                          "(pip install 'jaxmt[hf]'); safetensors files do not") from e
    # weights_only: tensors and plain containers only, never arbitrary pickled objects.
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise HFImportError(f"{path}: expected a state dict, got {type(state).__name__}")
    out = {}
    for name, t in state.items():
        if not torch.is_tensor(t):
            raise HFImportError(f"{path}: entry {name!r} is not a tensor")
        out[name] = t.detach().to(torch.float32).numpy()
    return out


def read_weights(hf_dir: str) -> tuple[dict[str, np.ndarray], str]:
    """Every tensor of the checkpoint as float32 numpy, and the file it came from.

    Prefers safetensors over ``.bin``; a ``*.index.json`` names the shards to read.
    """
    for name in WEIGHT_FILES:
        path = os.path.join(hf_dir, name)
        if not os.path.exists(path):
            continue
        reader = _read_safetensors if "safetensors" in name else _read_torch
        if not name.endswith(".index.json"):
            return reader(path), path
        shards = sorted(set(_load_json(path)["weight_map"].values()))
        out = {}
        for shard in shards:
            out.update(reader(os.path.join(hf_dir, shard)))
        return out, path
    raise FileNotFoundError(f"{hf_dir}: no weights (looked for {', '.join(WEIGHT_FILES)})")


class _Tensors:
    """Hands out checkpoint tensors by name and shape; remembers which were used."""

    def __init__(self, tensors: dict[str, np.ndarray], source: str):
        self.tensors, self.source, self.used = tensors, source, set()

    def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.tensors:
            raise HFImportError(f"{self.source}: missing tensor {name!r} (expected shape {shape})")
        return self._checked(name, shape)

    def maybe(self, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
        return self._checked(name, shape) if name in self.tensors else None

    def _checked(self, name, shape):
        x = self.tensors[name]
        if tuple(x.shape) != tuple(shape):
            raise HFImportError(f"{self.source}: tensor {name!r} has shape {tuple(x.shape)}, "
                                f"expected {tuple(shape)} from {HF_CONFIG}")
        self.used.add(name)
        return x

    def same_as(self, name: str, ref: np.ndarray, ref_name: str, why: str) -> None:
        """An optional copy of ``ref`` (tied weights saved twice) must equal it."""
        x = self.maybe(name, ref.shape)
        if x is not None and not np.array_equal(x, ref):
            raise HFImportError(f"{self.source}: tensor {name!r} differs from {ref_name!r}, "
                                f"but {why}")

    def check_all_used(self, model_type: str) -> None:
        extra = sorted(set(self.tensors) - self.used)
        if extra:
            more = f" (and {len(extra) - 10} more)" if len(extra) > 10 else ""
            raise HFImportError(f"{self.source}: unexpected tensors for a {model_type!r} model "
                                f"with this {HF_CONFIG}: {extra[:10]}{more}")


# ----------------------------------------------------------------------------- configs

def _check_architecture(f: ConfigFields, model_type: str) -> None:
    if model_type not in ARCHITECTURES:
        f.fail("model_type", f"unsupported; jaxmt imports {', '.join(ARCHITECTURES)} "
               "checkpoints only")
    for arch in f.get("architectures", []):
        if arch not in ARCHITECTURES[model_type]:
            f.fail("architectures", f"{arch!r} is not an encoder-decoder with a language-model "
                   f"head; expected one of {ARCHITECTURES[model_type]}")
    if not f.get("is_encoder_decoder", True):
        f.fail("is_encoder_decoder", "jaxmt imports encoder-decoder models only")


def _t5_config(f: ConfigFields, model_type: str, **overrides) -> ModelConfig:
    proj = f.get("feed_forward_proj", "relu")
    parts = proj.split("-")
    gated = len(parts) == 2 and parts[0] == "gated"
    if len(parts) > 1 and not gated:
        f.fail("feed_forward_proj", "expected 'ACT' or 'gated-ACT'")
    act = f.activation("feed_forward_proj", "gelu_new" if proj == "gated-gelu" else parts[-1])
    for name, want in (("pad_token_id", 0), ("eos_token_id", 1), ("decoder_start_token_id", 0)):
        if f.token_id(name, want) != want:
            f.fail(name, f"jaxmt's T5 convention needs {want}")
    tied = bool(f.get("tie_word_embeddings", True))
    layers = int(f.get("num_layers"))
    return ModelConfig(
        vocab_size=int(f.get("vocab_size")), emb_dim=int(f.get("d_model")),
        num_heads=int(f.get("num_heads")), head_dim=int(f.get("d_kv")), mlp_dim=int(f.get("d_ff")),
        num_encoder_layers=layers, num_decoder_layers=int(f.get("num_decoder_layers", layers)),
        dropout_rate=float(f.get("dropout_rate", 0.1)),
        mlp_activations=(act, "linear") if gated else (act,), position_embedding="relative",
        relpos_buckets=int(f.get("relative_attention_num_buckets", 32)),
        relpos_max_distance=int(f.get("relative_attention_max_distance", 128)),
        norm_type="rms", norm_position="pre", norm_epsilon=float(f.get("layer_norm_epsilon", 1e-6)),
        use_bias=False, scale_embeddings=False, tie_embeddings=tied,
        # The reference rescales tied T5 outputs; its mT5 code never does.
        rescale_logits=tied and model_type == "t5", final_logits_bias=False, **overrides)


def _marian_config(f: ConfigFields, **overrides) -> ModelConfig:
    vocab = int(f.get("vocab_size"))
    if not f.get("share_encoder_decoder_embeddings", True):
        f.fail("share_encoder_decoder_embeddings", "jaxmt shares one embedding table")
    if int(f.get("decoder_vocab_size", vocab)) != vocab:
        f.fail("decoder_vocab_size", f"must equal vocab_size={vocab}")
    for enc, dec in (("encoder_attention_heads", "decoder_attention_heads"),
                     ("encoder_ffn_dim", "decoder_ffn_dim")):
        if f.get(enc) != f.get(dec):
            f.fail(dec, f"differs from {enc}={f.get(enc)!r}; jaxmt needs equal encoder and "
                   "decoder sizes")
    d_model, heads = int(f.get("d_model")), int(f.get("encoder_attention_heads"))
    act = f.activation("activation_function", f.get("activation_function", "gelu"))
    if d_model % heads:
        f.fail("encoder_attention_heads", f"does not divide d_model={d_model}")
    if f.token_id("decoder_start_token_id") != f.token_id("pad_token_id"):
        f.fail("decoder_start_token_id", "jaxmt starts decoding with the pad token "
               f"(pad_token_id={f.get('pad_token_id')})")
    return ModelConfig(
        vocab_size=vocab, emb_dim=d_model, num_heads=heads, head_dim=d_model // heads,
        mlp_dim=int(f.get("encoder_ffn_dim")), num_encoder_layers=int(f.get("encoder_layers")),
        num_decoder_layers=int(f.get("decoder_layers")), dropout_rate=float(f.get("dropout", 0.1)),
        mlp_activations=(act,),
        position_embedding="sinusoidal",
        norm_type="layer", norm_position="post", norm_epsilon=MARIAN_LAYER_NORM_EPS, use_bias=True,
        scale_embeddings=bool(f.get("scale_embedding", False)),
        tie_embeddings=bool(f.get("tie_word_embeddings", True)), rescale_logits=False,
        final_logits_bias=True, **overrides)


# ----------------------------------------------------------------------------- tensors

def _put(tree: dict, path: str, value: np.ndarray) -> None:
    """``tree["a"]["b"]["c"] = value`` for ``path="a/b/c"``."""
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def _t5_params(ts: _Tensors, cfg: ModelConfig) -> dict:
    """T5/mT5 tensors -> jaxmt's unrolled tree (torch ``Linear`` weights are [out, in])."""
    d, h, k, m, v = cfg.emb_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
    p: dict = {}
    shared = ts.take("shared.weight", (v, d))
    _put(p, "token_embed/embedding", shared)
    tied_why = "jaxmt shares one embedding table"
    for stack in ("encoder", "decoder"):
        ts.same_as(f"{stack}.embed_tokens.weight", shared, "shared.weight", tied_why)

    def attention(src: str, dst: str) -> None:
        for hf, ours in (("q", "query"), ("k", "key"), ("v", "value")):
            w = ts.take(f"{src}.{hf}.weight", (h * k, d))  # torch Linear: [out, in]
            _put(p, f"{dst}/{ours}", w.T.reshape(d, h, k))
        _put(p, f"{dst}/out", ts.take(f"{src}.o.weight", (d, h * k)).T.reshape(h, k, d))

    def mlp(src: str, dst: str) -> None:
        hf_in = ["wi_0", "wi_1"] if len(cfg.mlp_activations) == 2 else ["wi"]
        for i, name in enumerate(hf_in):
            _put(p, f"{dst}/wi_{i}", ts.take(f"{src}.{name}.weight", (m, d)).T)
        _put(p, f"{dst}/wo", ts.take(f"{src}.wo.weight", (d, m)).T)

    def norm(src: str, dst: str) -> None:
        _put(p, f"{dst}/scale", ts.take(f"{src}.weight", (d,)))

    for stack, n in (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers)):
        _put(p, f"{stack}/relpos_bias/rel_embedding", ts.take(
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            (cfg.relpos_buckets, h)))
        # HF block i holds sub-layers layer.0, layer.1 (, layer.2) in this order.
        subs = ([("attention", "SelfAttention"), ("mlp", "DenseReluDense")] if stack == "encoder"
                else [("self_attention", "SelfAttention"), ("cross_attention", "EncDecAttention"),
                      ("mlp", "DenseReluDense")])
        for i in range(n):
            for j, (ours, hf) in enumerate(subs):
                src, dst = f"{stack}.block.{i}.layer.{j}", f"{stack}/layers_{i}/{ours}"
                (mlp if ours == "mlp" else attention)(f"{src}.{hf}", dst)
                norm(f"{src}.layer_norm", f"{dst}_norm")
        norm(f"{stack}.final_layer_norm", f"{stack}/final_norm")
    # Saved by some checkpoints, never used by the reference either.
    ts.maybe("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
             (cfg.relpos_buckets, h))
    if cfg.tie_embeddings:
        ts.same_as("lm_head.weight", shared, "shared.weight", f"{HF_CONFIG} ties them")
    else:
        _put(p, "decoder/logits_dense", ts.take("lm_head.weight", (v, d)).T)
    return p


def sinusoidal_table(num_positions: int, dim: int) -> np.ndarray:
    """Marian's fixed positions: sin in the first half of each row, cos in the second."""
    freq = np.power(10000.0, -2.0 * np.arange(dim // 2) / dim)  # [dim/2]
    angles = np.arange(num_positions)[:, None] * freq[None, :]  # [positions, dim/2]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


def _marian_params(ts: _Tensors, cfg: ModelConfig, perm: np.ndarray, max_positions: int) -> dict:
    """Marian tensors -> jaxmt's unrolled tree; vocabulary rows reordered by ``perm``."""
    d, h, k, m, v = cfg.emb_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
    pre = "model." if any(n.startswith("model.") for n in ts.tensors) else ""
    p: dict = {}
    shared = ts.take(f"{pre}shared.weight", (v, d))
    _put(p, "token_embed/embedding", shared[perm])
    tied_why = "jaxmt shares one embedding table"
    for stack in ("encoder", "decoder"):
        ts.same_as(f"{pre}{stack}.embed_tokens.weight", shared, f"{pre}shared.weight", tied_why)
        # Older checkpoints save the fixed table; jaxmt computes it (layers.sinusoidal_positions).
        pos = ts.maybe(f"{pre}{stack}.embed_positions.weight", (max_positions, d))
        if pos is not None and not np.allclose(pos, sinusoidal_table(max_positions, d), atol=1e-5):
            raise HFImportError(f"{ts.source}: tensor {pre}{stack}.embed_positions.weight is not "
                                "Marian's sinusoidal table (learned positions are unsupported)")
    scale = k ** -0.5  # folded into the query: jaxmt does not scale scores

    def attention(src: str, dst: str) -> None:
        for hf, ours in (("q", "query"), ("k", "key"), ("v", "value")):
            w = ts.take(f"{src}.{hf}_proj.weight", (h * k, d)).T.reshape(d, h, k)
            b = ts.take(f"{src}.{hf}_proj.bias", (h * k,)).reshape(h, k)
            if hf == "q":
                w, b = w * scale, b * scale
            _put(p, f"{dst}/{ours}", w)
            _put(p, f"{dst}/{ours}_bias", b)
        _put(p, f"{dst}/out", ts.take(f"{src}.out_proj.weight", (d, h * k)).T.reshape(h, k, d))
        _put(p, f"{dst}/out_bias", ts.take(f"{src}.out_proj.bias", (d,)))

    def norm(src: str, dst: str) -> None:
        _put(p, f"{dst}/scale", ts.take(f"{src}.weight", (d,)))
        _put(p, f"{dst}/bias", ts.take(f"{src}.bias", (d,)))

    for stack, n in (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers)):
        for i in range(n):
            src, dst = f"{pre}{stack}.layers.{i}", f"{stack}/layers_{i}"
            if stack == "encoder":
                attention(f"{src}.self_attn", f"{dst}/attention")
                norm(f"{src}.self_attn_layer_norm", f"{dst}/attention_norm")
            else:
                attention(f"{src}.self_attn", f"{dst}/self_attention")
                norm(f"{src}.self_attn_layer_norm", f"{dst}/self_attention_norm")
                attention(f"{src}.encoder_attn", f"{dst}/cross_attention")
                norm(f"{src}.encoder_attn_layer_norm", f"{dst}/cross_attention_norm")
            _put(p, f"{dst}/mlp/wi_0", ts.take(f"{src}.fc1.weight", (m, d)).T)
            _put(p, f"{dst}/mlp/wi_0_bias", ts.take(f"{src}.fc1.bias", (m,)))
            _put(p, f"{dst}/mlp/wo", ts.take(f"{src}.fc2.weight", (d, m)).T)
            _put(p, f"{dst}/mlp/wo_bias", ts.take(f"{src}.fc2.bias", (d,)))
            norm(f"{src}.final_layer_norm", f"{dst}/mlp_norm")
    if cfg.tie_embeddings:
        ts.same_as("lm_head.weight", shared, f"{pre}shared.weight", f"{HF_CONFIG} ties them")
    else:
        _put(p, "decoder/logits_dense", ts.take("lm_head.weight", (v, d))[perm].T)
    # The reference treats a missing final_logits_bias as zeros.
    bias = ts.maybe("final_logits_bias", (1, v))
    bias = np.zeros(v, np.float32) if bias is None else bias[0]
    _put(p, "decoder/final_logits_bias", bias[perm])
    return p


# ----------------------------------------------------------------------------- tokenizer

def _generation_fields(hf_dir: str, f: ConfigFields) -> ConfigFields:
    path = os.path.join(hf_dir, GENERATION_CONFIG)
    return ConfigFields(_load_json(path), path) if os.path.exists(path) else f


def _t5_tokenizer(hf_dir: str, cfg: ModelConfig, gen: ConfigFields,
                  input_prefix: str | None) -> TokenizerConfig:
    import sentencepiece as spm

    path = os.path.join(hf_dir, "spiece.model")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: T5/mT5 SentencePiece model missing")
    sp = spm.SentencePieceProcessor(model_file=path)
    ids = (sp.pad_id(), sp.eos_id(), sp.unk_id())
    if ids != (0, 1, 2):
        raise HFImportError(f"{path}: pad/eos/unk ids are {ids}, T5 needs (0, 1, 2)")
    if sp.get_piece_size() > cfg.vocab_size:
        raise HFImportError(f"{path}: {sp.get_piece_size()} pieces exceed the model's "
                            f"vocab_size={cfg.vocab_size} ({HF_CONFIG})")
    suppressed = hf_generation.suppressed_ids(gen, np.arange(cfg.vocab_size))
    return TokenizerConfig(kind="t5", vocab_files=("spiece.model",),
                           input_prefix=input_prefix or "", suppressed_ids=suppressed)


def _marian_tokenizer(hf_dir: str, cfg: ModelConfig, f: ConfigFields, gen: ConfigFields,
                      input_prefix: str | None) -> TokenizerConfig:
    files = ("source.spm", "target.spm", "vocab.json")
    for name in files:
        if not os.path.exists(os.path.join(hf_dir, name)):
            raise FileNotFoundError(f"{os.path.join(hf_dir, name)}: Marian tokenizer file missing")
    tok_cfg_path = os.path.join(hf_dir, "tokenizer_config.json")
    if (os.path.exists(os.path.join(hf_dir, "target_vocab.json"))
            or (os.path.exists(tok_cfg_path) and _load_json(tok_cfg_path).get("separate_vocabs"))):
        raise HFImportError(f"{hf_dir}: separate source/target vocabularies (target_vocab.json, "
                            "separate_vocabs) are unsupported")
    vocab_path = os.path.join(hf_dir, "vocab.json")
    vocab = _load_json(vocab_path)
    special = {"<pad>": f.token_id("pad_token_id"), "</s>": f.token_id("eos_token_id")}
    if "<unk>" not in vocab:
        raise HFImportError(f"{vocab_path}: no '<unk>' entry")
    for piece, want in special.items():
        if piece in vocab and vocab[piece] != want:
            raise HFImportError(f"{vocab_path}: {piece!r} is {vocab[piece]}, but {HF_CONFIG} "
                                f"says {want}")
    reordered = (special["<pad>"], special["</s>"], int(vocab["<unk>"]))
    perm = id_permutation(cfg.vocab_size, reordered)
    codes = tuple(p[2:-2] for p in vocab if p.startswith(">>") and p.endswith("<<"))
    if input_prefix is None:
        input_prefix = ">>{tgt}<< " if codes else ""
    return TokenizerConfig(
        kind="marian", vocab_files=files, input_prefix=input_prefix, target_langs=codes,
        reordered_ids=() if reordered == (0, 1, 2) else reordered,
        suppressed_ids=hf_generation.suppressed_ids(gen, np.argsort(perm)))


# ----------------------------------------------------------------------------- checks

def _flat(tree: PyTree) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): x for path, x in leaves}


def check_params(params: PyTree, cfg: ModelConfig) -> None:
    """Raises HFImportError naming every path missing, extra or misshapen versus the model."""
    from jaxmt.modeling.model import EncoderDecoderModel

    want = _flat(EncoderDecoderModel(cfg).param_shapes())
    got = _flat(params)
    problems = [f"missing {k} {tuple(want[k].shape)}" for k in sorted(set(want) - set(got))]
    problems += [f"unexpected {k}" for k in sorted(set(got) - set(want))]
    problems += [f"{k}: shape {tuple(got[k].shape)}, model wants {tuple(want[k].shape)}"
                 for k in sorted(set(got) & set(want))
                 if tuple(got[k].shape) != tuple(want[k].shape)]
    if problems:
        raise HFImportError("converted parameters do not fit jaxmt's network: "
                            + "; ".join(problems))


# ----------------------------------------------------------------------------- entry points

def read_configs(hf_dir: str, precision: str = "fp32", scan_layers: bool = False,
                 input_prefix: str | None = None, with_decode: bool = False) -> tuple:
    """The model and tokenizer records :func:`import_checkpoint` would make, without
    reading the weights: a cheap check of a directory (and of the languages it takes).
    ``with_decode``: the generation defaults too, as a third item."""
    _, cfg, tok, decode = _records(hf_dir, precision, scan_layers, input_prefix)
    return (cfg, tok, decode) if with_decode else (cfg, tok)


def _records(hf_dir: str, precision: str, scan_layers: bool, input_prefix: str | None
             ) -> tuple[ConfigFields, ModelConfig, TokenizerConfig, DecodeConfig]:
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"{hf_dir}: no such directory; pass a Hugging Face model "
                                "folder (config.json, weights, tokenizer files)")
    cfg_path = os.path.join(hf_dir, HF_CONFIG)
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{hf_dir}: not a Hugging Face checkpoint (no {HF_CONFIG}); "
                                "pass a folder written by save_pretrained() of a T5, mT5 or "
                                "MarianMT model")
    raw = _load_json(cfg_path)
    if not isinstance(raw, dict):
        raise HFImportError(f"{cfg_path}: a JSON {type(raw).__name__}, expected an object "
                            "with model_type; is this a Hugging Face model config?")
    f = ConfigFields(raw, cfg_path)
    model_type = f.get("model_type")
    _check_architecture(f, model_type)
    overrides = {"precision": precision, "scan_layers": scan_layers}
    cfg = _marian_config(f, **overrides) if model_type == "marian" else _t5_config(
        f, model_type, **overrides)
    gen = _generation_fields(hf_dir, f)
    if model_type == "marian":
        tok = _marian_tokenizer(hf_dir, cfg, f, gen, input_prefix)
    else:
        tok = _t5_tokenizer(hf_dir, cfg, gen, input_prefix)
    to_jaxmt = np.argsort(id_permutation(cfg.vocab_size, tok.reordered_ids))
    return f, cfg, tok, hf_generation.decode_config(gen, to_jaxmt)


def import_checkpoint(hf_dir: str, precision: str = "fp32", scan_layers: bool = False,
                      input_prefix: str | None = None) -> ImportedModel:
    """Converts a Hugging Face T5 / mT5 / MarianMT directory in memory.

    Args:
        hf_dir: Directory with ``config.json``, weights and tokenizer files.
        precision: jaxmt precision policy of the result (``ModelConfig.precision``).
        scan_layers: Stack the layers for ``nn.scan`` (``ModelConfig.scan_layers``).
        input_prefix: Text put before every source sentence (``{src}``/``{tgt}`` are
            replaced by the language codes, ``{src_name}``/``{tgt_name}`` by their
            English names); default: none, or ``">>{tgt}<< "`` for a
            multilingual Marian vocabulary.

    Returns:
        The model and tokenizer records, parameters as numpy arrays and the generation
        defaults (:mod:`jaxmt.inference.hf_generation`).

    Raises:
        HFImportError: An unsupported architecture, config option or tensor mismatch.
        FileNotFoundError: Weights or tokenizer files are missing.
    """
    f, cfg, tok, decode = _records(hf_dir, precision, scan_layers, input_prefix)
    model_type = f.get("model_type")
    tensors, source = read_weights(hf_dir)
    ts = _Tensors(tensors, source)
    if model_type == "marian":
        params = _marian_params(ts, cfg, id_permutation(cfg.vocab_size, tok.reordered_ids),
                                int(f.get("max_position_embeddings", 1024)))
    else:
        params = _t5_params(ts, cfg)
    ts.check_all_used(model_type)
    dtype = jax.numpy.dtype(cfg.param_dtype)  # knows bfloat16, unlike numpy
    params = jax.tree.map(lambda x: np.asarray(x, dtype), params)
    if cfg.scan_layers:
        from jaxmt.modeling.network import stack_layers
        params = stack_layers(params)
    check_params(params, cfg)
    return ImportedModel(cfg, tok, params, decode)


def convert(hf_dir: str, out_dir: str, **kwargs) -> ImportedModel:
    """Writes a jaxmt model directory that ``Translator.from_pretrained`` and
    ``jaxmt translate`` load like a trained one: ``jaxmt_config.json`` (model, tokenizer
    and decode sections: the checkpoint's generation defaults), the tokenizer files and
    a params-only checkpoint at step 0.

    Keyword arguments are those of :func:`import_checkpoint`.
    """
    from jaxmt.checkpoint import save_params

    imported = import_checkpoint(hf_dir, **kwargs)
    if os.path.exists(os.path.join(out_dir, CONFIG_FILE)):
        raise FileExistsError(f"{out_dir}: already a jaxmt model directory")
    # Built in a temporary directory beside out_dir and renamed when complete, so a
    # failed or killed conversion leaves nothing behind.
    with atomic_directory(out_dir) as tmp:
        for name in imported.tokenizer.vocab_files:
            shutil.copyfile(os.path.join(hf_dir, name), os.path.join(tmp, name))
        save_params(str(tmp), jax.tree.map(jax.numpy.asarray, imported.params),
                    meta={"step": 0, "imported_from": os.path.abspath(hf_dir)})
        write_atomic(os.path.join(tmp, CONFIG_FILE),
                     to_json(model=imported.model, tokenizer=imported.tokenizer,
                             decode=imported.decode))
    return imported
