"""Run configuration: frozen dataclasses, the only types gin binds.

Each dataclass validates itself in ``__post_init__`` so a bad gin binding fails
before anything is compiled, with a message that names the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import numbers
import os
import re
from collections.abc import Mapping
from typing import Any

import gin

from jaxmt import hardware  # imports JAX only when "auto" is resolved
from jaxmt.data import bucketing, embedded, mixture, sources  # pure Python: no TensorFlow
from jaxmt.data.mixture import directions


def _check(cond: bool, cls: str, field: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{cls}.{field}: {msg}")


def _is_int(v: Any) -> bool:  # bool is an int to Python, never to a config
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


# Annotation -> (accepts, normalise, what it takes). gin and JSON give lists for tuples,
# ints for floats, numpy gives numpy scalars; the fields hold plain Python values so the
# configs compare equal and serialise to JSON.
_KINDS = {
    "bool": (lambda v: isinstance(v, bool), bool, "True or False"),
    "int": (_is_int, int, "an int"),
    "float": (_is_real, float, "a finite number"),
    "str": (lambda v: isinstance(v, str), str, "a string"),
    "dict": (lambda v: isinstance(v, Mapping), dict, "a dict"),
    "tuple": (lambda v: isinstance(v, (tuple, list)), tuple, "a tuple"),
    "tuple[str, ...]": (lambda v: isinstance(v, (tuple, list)) and all(
        isinstance(x, str) for x in v), tuple, "a tuple of strings"),
    "tuple[int, ...]": (lambda v: isinstance(v, (tuple, list)) and all(map(_is_int, v)),
                        lambda v: tuple(map(int, v)), "a tuple of ints"),
}


def _check_types(obj: Any) -> None:
    """Checks every field of a config dataclass against its annotation, and normalises it.

    Called first in ``__post_init__``, so a wrong type (``steps=2.5``, ``"5"`` from a
    quoted gin value, a string in JSON) fails with the field's name instead of a
    TypeError deep in training. Fields of other types (nested configs) are the class's
    own checks.
    """
    for f in dataclasses.fields(obj):
        if f.type not in _KINDS:
            continue
        accepts, normalise, what = _KINDS[f.type]
        v = getattr(obj, f.name)
        _check(accepts(v), type(obj).__name__, f.name,
               f"must be {what}, got {v!r} ({type(v).__name__})")
        object.__setattr__(obj, f.name, normalise(v))


def _check_min(obj: Any, low: float, *fields: str, strict: bool = False) -> None:
    """Each of ``fields`` is ``>= low`` (``> low`` when ``strict``); types checked first."""
    for f in fields:
        v = getattr(obj, f)
        _check(v > low if strict else v >= low, type(obj).__name__, f,
               f"must be {'>' if strict else '>='} {low}, got {v!r}")


def _check_patterns(obj: Any, field: str) -> None:
    """Every string of the tuple ``field`` compiles as a regular expression."""
    for pattern in getattr(obj, field):
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"{type(obj).__name__}.{field}: {pattern!r} is not a regular "
                             f"expression ({e})") from None


def _did_you_mean(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known: {sorted(known)}"


# precision policy -> (compute dtype, parameter dtype). Logits, softmax, norms' statistics
# and the loss are float32 under every policy; "fp16" adds dynamic loss scaling.
PRECISIONS = {"fp32": ("float32", "float32"), "bf16": ("bfloat16", "float32"),
              "bf16_params": ("bfloat16", "bfloat16"), "fp16": ("float16", "float32")}
# ModelConfig.precision's values: "auto" is bf16 where the backend computes it natively,
# else fp32 (jaxmt/hardware.py); `jaxmt train` stores the concrete policy it chose.
PRECISION_CHOICES = ("auto", *PRECISIONS)
REMAT_POLICIES = ("none", "full", "dots_saveable", "save_attention_out", "offload")
ACTIVATIONS = ("gelu", "gelu_exact", "relu", "silu", "linear")


# Attention implementations (jaxmt.modeling.attention.attend). Exact: xla (materialised scores, the
# reference), dot_product (jax.nn.dot_product_attention: cuDNN on CUDA GPUs for fp16/bf16
# and the shapes cuDNN takes, else XLA), flash (the Pallas kernel on GPU/TPU, blockwise on
# CPU), blockwise (pure-JAX online softmax, memory linear in length). Approximate: local,
# bigbird, performer. auto picks by length.
ATTENTION_IMPLS = ("xla", "dot_product", "flash", "blockwise", "local", "bigbird", "performer",
                   "auto")
_EXACT = ("xla", "dot_product", "flash", "blockwise")
# What each attention type accepts: BigBird here is an encoder pattern; windows over
# target-vs-source positions mean nothing; and Performer's linear scan needs query and key
# segments at the same positions, which packed cross-attention does not have. Cross-
# attention costs target x source, linear in the source, so the exact kernels suffice.
_ALLOWED = {"encoder": ATTENTION_IMPLS,
            "decoder": tuple(i for i in ATTENTION_IMPLS if i != "bigbird"),
            "cross": _EXACT + ("auto",)}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Which attention implementation each attention type uses, and their knobs.

    Attributes:
      encoder, decoder, cross: an implementation from ``ATTENTION_IMPLS`` for encoder
        self-attention, decoder self-attention and cross-attention. Decode steps (one
        query against the KV cache) attend over the whole cache as the teacher-forced
        decoder does: with ``local`` they apply the same window, with ``performer`` the
        same FAVOR+ features (cached greedy decoding equals teacher forcing). Off the
        ``xla`` path there is no dropout on attention probabilities (residual and MLP
        dropout still apply). ``dot_product`` asks for cuDNN on CUDA GPUs and falls back
        to XLA, with a logged reason, where cuDNN cannot take the call (float32, head
        dims not a multiple of 8 or too large, odd lengths with a bias); elsewhere it is XLA.
      block_size: flash/blockwise tile size (query and key blocks); 0 (the default) picks
        per backend: flash 64 on GPU (Triton tiles live in registers) and 512 on TPU,
        blockwise 512.
      window: local attention's reach: keys within ``window`` positions (behind only,
        when causal).
      global_tokens: local attention's global tokens: the first ones see and are seen
        by every position.
      bigbird_block, bigbird_global_blocks, bigbird_random_blocks: BigBird's block size
        and the global and random key blocks each query block adds to its 3-block window.
      performer_features: FAVOR+ random features (more: closer to softmax, slower).
      auto_threshold: ``auto`` uses ``auto_short`` up to this key length, ``auto_long``
        above it (``flash`` where ``auto_long`` does not apply, e.g. local for cross-attention).
      seed: fixes BigBird's random blocks and Performer's features.
      flash_interpret: run ``flash`` as the Pallas kernel in interpret mode, whatever
        the backend (tests and debugging on CPU; slow). Off, CPU runs ``blockwise``.
    """

    encoder: str = "xla"
    decoder: str = "xla"
    cross: str = "xla"
    block_size: int = 0
    window: int = 128
    global_tokens: int = 0
    bigbird_block: int = 64
    bigbird_global_blocks: int = 1
    bigbird_random_blocks: int = 2
    performer_features: int = 256
    auto_threshold: int = 512
    auto_short: str = "xla"
    auto_long: str = "local"
    seed: int = 0
    flash_interpret: bool = False

    def __post_init__(self):
        n = type(self).__name__
        for kind, allowed in _ALLOWED.items():
            _check(getattr(self, kind) in allowed, n, kind,
                   f"unknown or unsupported implementation {getattr(self, kind)!r} for {kind} "
                   f"attention; choose one of {allowed}")
        for f in ("window", "bigbird_block", "bigbird_global_blocks",
                  "performer_features", "auto_threshold"):
            _check(isinstance(getattr(self, f), int) and getattr(self, f) > 0, n, f,
                   f"must be a positive int, got {getattr(self, f)!r}")
        for f in ("block_size", "global_tokens", "bigbird_random_blocks"):  # 0: per backend
            _check(isinstance(getattr(self, f), int) and getattr(self, f) >= 0, n, f,
                   f"must be a non-negative int, got {getattr(self, f)!r}")
        _check(self.auto_short in _EXACT, n, "auto_short", f"must be exact, one of {_EXACT}")
        _check(self.auto_long in ATTENTION_IMPLS[:-1], n, "auto_long",
               f"choose one of {ATTENTION_IMPLS[:-1]}")

    def resolve(self, kind: str, key_length: int) -> str:
        """The implementation ``kind`` attention uses at a static ``key_length``."""
        impl = getattr(self, kind)
        if impl != "auto":
            return impl
        impl = self.auto_short if key_length <= self.auto_threshold else self.auto_long
        return impl if impl in _ALLOWED[kind] else "flash"


ADAPTER_ROUTES = ("language", "direction")
QUANT_MODES = ("none", "int8", "w8a8")
# What LoRA can adapt: the attention projections and the MLP's input/output matrices.
LORA_TARGETS = ("query", "key", "value", "out", "mlp_in", "mlp_out")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Language adapters (Bapna & Firat 2019): after every encoder and decoder layer, a
    residual bottleneck LayerNorm -> down-projection -> ReLU -> up-projection, one per
    routing key, chosen per token by the batch's languages.

    Attributes:
      size: the bottleneck width; 0 = no adapters.
      langs: the routing keys, each with its own adapter. ``route="language"``: language
        codes (``"es"``); the encoder routes by source language and the decoder by target
        language. ``route="direction"``: directions (``"en-es"``), one adapter per
        direction in both stacks. A language or direction not listed passes through
        unadapted (the base model's output exactly).
      route: "language" | "direction".
    """

    size: int = 0
    langs: tuple[str, ...] = ()
    route: str = "language"

    def __post_init__(self):
        _check_types(self)
        _check_min(self, 0, "size")
        _check(self.route in ADAPTER_ROUTES, "AdapterConfig", "route",
               f"unknown value {self.route!r}; choose one of {ADAPTER_ROUTES}")
        _check(len(set(self.langs)) == len(self.langs), "AdapterConfig", "langs",
               f"duplicate keys in {self.langs}")
        _check(not self.size or self.langs, "AdapterConfig", "langs",
               "adapters (size > 0) need at least one language or direction to route to")
        if self.route == "direction":
            for k in self.langs:
                _check(k.count("-") == 1 and all(k.split("-")), "AdapterConfig", "langs",
                       f"route='direction' takes keys like 'en-es', got {k!r}")

    def route_ids(self, src: str, tgt: str) -> tuple[int, int]:
        """(encoder id, decoder id) of a direction: indices into ``langs``, -1 where the
        language (or direction) has no adapter."""
        idx = lambda k: self.langs.index(k) if k in self.langs else -1  # noqa: E731
        if self.route == "direction":
            return idx(f"{src}-{tgt}"), idx(f"{src}-{tgt}")
        return idx(src), idx(tgt)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adaptation (Hu et al. 2021): ``W + (alpha / rank) * A @ B`` on the
    projections named in ``targets``, with B = 0 at initialisation (so the model starts
    as the base) and mergeable into W for inference at no cost.

    Attributes:
      rank: r; 0 = no LoRA.
      alpha: the scale numerator (the update is multiplied by alpha / rank).
      targets: any of :data:`LORA_TARGETS`.
    """

    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = ("query", "key", "value", "out", "mlp_in", "mlp_out")

    def __post_init__(self):
        _check_types(self)
        _check_min(self, 0, "rank")
        _check_min(self, 0, "alpha", strict=True)
        for t in self.targets:
            _check(t in LORA_TARGETS, "LoraConfig", "targets",
                   f"unknown target {t!r}; choose from {LORA_TARGETS}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Encoder-decoder hyper-parameters and architecture switches.

    The defaults are T5.1.1 / mT5. ``gin_configs/models/`` sets the switches together
    for each family: ``t5_original.gin`` (ReLU MLP, tied embeddings, rescaled logits)
    and ``marian.gin`` (sinusoidal positions, post-LayerNorm, biases, scaled and tied
    embeddings, final logits bias).
    """

    vocab_size: int = 8192
    emb_dim: int = 256
    num_heads: int = 4
    head_dim: int = 64
    mlp_dim: int = 768
    num_encoder_layers: int = 3
    num_decoder_layers: int = 3
    dropout_rate: float = 0.0
    # "gelu" is the tanh approximation (T5.1.1's gelu_new); "gelu_exact" the erf form.
    # Two or more activations make a gated MLP (their product).
    mlp_activations: tuple[str, ...] = ("gelu", "linear")
    position_embedding: str = "relative"  # relative (T5 bias) | sinusoidal (Vaswani)
    relpos_buckets: int = 32
    relpos_max_distance: int = 128
    norm_type: str = "rms"  # rms (T5) | layer
    norm_position: str = "pre"  # pre | post (Marian); pre adds a final norm per stack
    norm_epsilon: float = 1e-6
    use_bias: bool = False  # biases on attention and MLP projections
    scale_embeddings: bool = False  # token embeddings times sqrt(emb_dim)
    tie_embeddings: bool = False  # logits from the shared token embedding
    rescale_logits: bool = False  # decoder output times emb_dim ** -0.5 before logits (T5)
    final_logits_bias: bool = False
    scan_layers: bool = False  # nn.scan over a stacked `layers` axis, not unrolled
    encoder_remat: str = "none"  # one of REMAT_POLICIES
    decoder_remat: str = "none"
    precision: str = "auto"  # one of PRECISION_CHOICES
    # A factory, so gin bindings of AttentionConfig apply without naming it here.
    attention: AttentionConfig = dataclasses.field(default_factory=lambda: AttentionConfig())
    # Parameter-efficient fine-tuning on top of a base (jaxmt train --init_from).
    adapter: AdapterConfig = dataclasses.field(default_factory=lambda: AdapterConfig())
    lora: LoraConfig = dataclasses.field(default_factory=lambda: LoraConfig())
    # Post-training int8 for inference (`jaxmt quantize`, jaxmt/compress/quantize.py): the
    # projection and embedding weights are stored as int8 with per-output-channel float32
    # scales. "int8": weight-only (dequantized into the compute dtype, so it saves memory
    # and bytes on disk); "w8a8": also the activations, per token, with int8 x int8 ->
    # int32 dots. A quantized model decodes only; it does not train.
    quant: str = "none"  # one of QUANT_MODES

    def __post_init__(self):
        n = type(self).__name__
        for f, cls in (("attention", AttentionConfig), ("adapter", AdapterConfig),
                       ("lora", LoraConfig)):
            if isinstance(getattr(self, f), dict):  # from jaxmt_config.json
                object.__setattr__(self, f, cls(**getattr(self, f)))
            _check(isinstance(getattr(self, f), cls), n, f,
                   f"must be an {cls.__name__}, got {type(getattr(self, f)).__name__}")
        _check_types(self)
        _check_min(self, 1, "vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim",
                   "num_encoder_layers", "num_decoder_layers", "relpos_buckets")
        _check(0.0 <= self.dropout_rate < 1.0, n, "dropout_rate",
               f"must be in [0, 1), got {self.dropout_rate!r}")
        _check(len(self.mlp_activations) >= 1, n, "mlp_activations", "needs at least one")
        for a in self.mlp_activations:
            _check(a in ACTIVATIONS, n, "mlp_activations", f"unknown activation {a!r} {ACTIVATIONS}")
        choices = {"position_embedding": ("relative", "sinusoidal"), "norm_type": ("rms", "layer"),
                   "norm_position": ("pre", "post"), "encoder_remat": REMAT_POLICIES,
                   "decoder_remat": REMAT_POLICIES, "precision": PRECISION_CHOICES,
                   "quant": QUANT_MODES}
        for f, allowed in choices.items():
            _check(getattr(self, f) in allowed, n, f,
                   f"unknown value {getattr(self, f)!r}; choose one of {allowed}")
        _check_min(self, 0, "norm_epsilon", strict=True)
        # T5 bucketing divides by log(max_distance / (buckets / 2)) in the decoder.
        _check(self.relpos_max_distance > self.relpos_buckets // 2, n, "relpos_max_distance",
               f"must exceed relpos_buckets / 2 = {self.relpos_buckets // 2}, "
               f"got {self.relpos_max_distance}")
        if self.position_embedding == "sinusoidal":
            _check(self.emb_dim % 2 == 0, n, "emb_dim", "sinusoidal positions need an even size")

    @property
    def resolved_precision(self) -> str:
        """The concrete policy (a key of PRECISIONS): ``precision``, or for "auto" what
        this machine computes natively, decided once per process on first use."""
        if self.precision == "auto":
            return hardware.auto_precision().policy
        return self.precision

    @property
    def dtype(self) -> str:
        """Compute dtype of matmul operands and activations."""
        return PRECISIONS[self.resolved_precision][0]

    @property
    def param_dtype(self) -> str:
        return PRECISIONS[self.resolved_precision][1]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape and what is sharded; the presets are ``gin_configs/mesh/*.gin``.

    Axis sizes multiply to the device count; -1 on one axis means "all remaining
    devices". ``replica`` is data parallelism across slices or nodes (DCN), ``data``
    within one, ``fsdp`` shards weights and optimizer state (ZeRO) while also splitting
    the batch, and ``tensor`` splits heads, MLP units and the vocabulary (Megatron).

    Attributes:
      shard_params: True (ZeRO-3 / FSDP) splits parameters over ``fsdp`` as well as the
        optimizer state; False (ZeRO-1) keeps parameters whole on every ``fsdp`` device
        and splits only the optimizer state (the gradients are reduce-scattered into
        it, then the updated parameters all-gathered).
    """

    replica: int = 1
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    shard_params: bool = True

    def __post_init__(self):
        _check_types(self)
        sizes = (self.replica, self.data, self.fsdp, self.tensor)
        _check(sum(s == -1 for s in sizes) <= 1, "MeshConfig", "replica/data/fsdp/tensor",
               "at most one axis may be -1")
        _check(all(isinstance(s, int) and (s == -1 or s >= 1) for s in sizes), "MeshConfig",
               "replica/data/fsdp/tensor", f"sizes must be integers >= 1 or -1, got {sizes}")

    @property
    def sizes(self) -> tuple[int, int, int, int]:
        """``(replica, data, fsdp, tensor)``, as in :data:`jaxmt.sharding.axes.MESH_AXES`."""
        return (self.replica, self.data, self.fsdp, self.tensor)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which corpus, languages and directions to train on, and how to batch them."""

    langs: tuple[str, ...] = ("en", "de", "fr", "ru")
    pivot: str = "en"  # directions are pivot->xx and xx->pivot
    temperature: float = 5.0  # mixture rate proportional to n_i ** (1 / temperature)
    vocab_size: int = 8000  # SentencePiece pieces; must not exceed ModelConfig.vocab_size
    vocab_sample_per_lang: int = 20000  # sentences per language for SentencePiece training
    src_len: int = 64
    tgt_len: int = 64
    # How examples become rows: "pack" (several per row, jaxmt/data/packing.py), "bucket"
    # (one per row, in batches of a few lengths with the same token budget,
    # jaxmt/data/bucketing.py: one compilation per length) or "pad" (one per row, padded
    # to src_len/tgt_len).
    batching: str = "pack"
    # "bucket" only: the row lengths, increasing, the last = max(src_len, tgt_len). A
    # bucket of length L gets batch_size * max(src_len, tgt_len) / L rows (rounded down
    # to what the mesh divides).
    bucket_lengths: tuple[int, ...] = (16, 32, 64)
    max_eval_len: int = 128
    # Your own parallel corpora (jaxmt/data/sources.py): CorpusSources or dicts of their
    # fields, e.g. ({"path": "data/en-de.tsv.gz", "src_lang": "en", "tgt_lang": "de"},).
    # When set they replace the embedded Bible, and their language pairs give the
    # directions (`langs` and `pivot` then only choose nothing).
    corpora: tuple = ()
    clean: sources.CleanConfig = sources.CleanConfig()  # bad-input limits, strict mode
    # Language-balanced mixture (jaxmt/data/mixture.py; `jaxmt data mixture` prints the
    # resulting rate table). Rates are computed from min(train pairs, cap) ** (1 / temperature):
    # mixture_cap caps every direction (0 = none); mixture_caps caps by direction "en-de" or
    # by language "de" (every direction with it on either side; the smallest cap wins).
    # mixture_weights gives directions a fixed share, e.g. {"en-de": 0.4}: the others share
    # the rest by temperature (if every direction is named, the weights are relative).
    mixture_cap: int = 0
    mixture_caps: dict = dataclasses.field(default_factory=dict)
    mixture_weights: dict = dataclasses.field(default_factory=dict)
    # Pre-tokenised cache written by `jaxmt data cache` (jaxmt/data/cache.py); training reads
    # it when every direction has a fresh one there. "" = MODEL_DIR/data_cache.
    cache_dir: str = ""
    # The target-language signal put before every source when fine-tuning an imported
    # base (jaxmt train --init_from): a template with {src}, {tgt} (codes) and {src_name},
    # {tgt_name} (English names). "auto": the base's own (T5: "translate {src_name} to
    # {tgt_name}: ", multilingual opus-mt: ">>{tgt}<< "). jaxmt models always use their
    # <2xx> tags.
    input_prefix: str = "auto"
    # Sequence-level distillation (Kim & Rush 2016): the directory `jaxmt distill translate`
    # wrote (the teacher's outputs for the training sources), and the share of each
    # direction's examples drawn from it; the rest come from the references. 1.0 = the
    # distilled corpus alone. "" = none.
    distilled: str = ""
    distilled_rate: float = 1.0

    def __post_init__(self):
        n = type(self).__name__
        _check(isinstance(self.corpora, (tuple, list)), n, "corpora",
               f"must be a tuple of CorpusSources or dicts, got {self.corpora!r}")
        try:
            object.__setattr__(self, "corpora", sources.as_sources(self.corpora))
        except ValueError as e:
            raise ValueError(f"{n}.corpora: {e}") from None
        if isinstance(self.clean, Mapping):  # from gin or jaxmt_config.json
            names = [f.name for f in dataclasses.fields(sources.CleanConfig)]
            for k in self.clean:
                _check(k in names, n, "clean", f"unknown field {k!r}{_did_you_mean(k, names)}")
            object.__setattr__(self, "clean", sources.CleanConfig(**self.clean))
        _check(isinstance(self.clean, sources.CleanConfig), n, "clean",
               f"must be a CleanConfig or a dict of its fields, got {self.clean!r}")
        _check_types(self)
        for lang in self.langs:
            err = sources.lang_code_error(lang)
            _check(err is None, n, "langs", str(err))
        _check(self.pivot in self.langs, n, "pivot", f"{self.pivot!r} is not in langs {self.langs}")
        _check(len(self.langs) >= 2, n, "langs", "need at least two languages")
        _check_min(self, 0, "temperature", strict=True)
        _check_min(self, 1, "vocab_sample_per_lang", "src_len", "tgt_len", "max_eval_len")
        _check_min(self, 0, "mixture_cap")
        _check(0.0 < self.distilled_rate <= 1.0, n, "distilled_rate",
               f"must be in (0, 1], got {self.distilled_rate!r}")
        # SentencePiece's first pieces are fixed: pad/EOS/UNK, 256 byte-fallback pieces and
        # one tag per language (every embedded one and the corpora's; jaxmt/data/vocab.py).
        tags = set(embedded.EMBEDDED_LANGS) | set(self.corpus_langs)
        _check(self.vocab_size > 3 + 256 + len(tags), n, "vocab_size",
               f"must exceed {3 + 256 + len(tags)} (pad/EOS/UNK, 256 byte pieces and "
               f"{len(tags)} language tags come first), got {self.vocab_size}")
        _check(self.batching in bucketing.BATCHINGS, n, "batching",
               f"unknown value {self.batching!r}; choose one of {bucketing.BATCHINGS}")
        if self.batching == "bucket":
            err = bucketing.lengths_error(self.bucket_lengths, max(self.src_len, self.tgt_len))
            _check(err is None, n, "bucket_lengths", str(err))
        mixture.resolve(self.directions, self.mixture_cap, self.mixture_caps,
                        self.mixture_weights, owner="DataConfig")

    @property
    def directions(self) -> list[tuple[str, str]]:
        if self.corpora:
            pairs = [(c.src_lang, c.tgt_lang) for c in self.corpora]
            pairs += [(c.tgt_lang, c.src_lang) for c in self.corpora if c.both_directions]
            return list(dict.fromkeys(pairs))
        return directions(self.langs, self.pivot)

    @property
    def corpus_langs(self) -> tuple[str, ...]:
        """The languages trained on: the corpora's, else ``langs``."""
        if not self.corpora:
            return self.langs
        return tuple(dict.fromkeys(lang for d in self.directions for lang in d))


# The weights magnitude pruning sparsifies by default: every projection matrix of the
# attention and MLP blocks (not embeddings, norms, biases, position tables or adapters).
PRUNE_TARGETS = (r".*/(query|key|value|out|wi_\d+|wo)",)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """Gradual magnitude pruning while training (Zhu & Gupta 2017), through optax masks.

    From ``start_step`` to ``end_step`` the sparsity of every target weight rises as
    ``s_t = sparsity * (1 - (1 - t)^3)`` (t the fraction of the way), recomputed every
    ``every`` steps and at ``end_step``: exactly ``floor(s_t * n)`` smallest-magnitude
    entries of each matrix (each layer's, when scanned) are set to zero after the step's
    update, and stay zero. Steps count optimizer updates (a step skipped for non-finite
    gradients does not count). Only trained parameters are pruned; the train log reports
    ``sparsity``, the share of zeros among the targets. The weights stay dense (zeros), so
    this alone saves neither memory nor time. Structured pruning (whole heads and MLP
    units, `jaxmt prune --structured`) is a one-shot rewrite of a trained model, not this;
    see jaxmt/compress/prune.py.

    Attributes:
      sparsity: the final fraction of zeros in each target matrix; 0 = off.
      start_step, end_step: the ramp; ``end_step`` 0 = ``TrainConfig.steps``.
      every: steps between mask updates.
      targets: regexes over parameter paths (re.fullmatch), as ``TrainConfig.trainable``.
    """

    sparsity: float = 0.0
    start_step: int = 0
    end_step: int = 0
    every: int = 100
    targets: tuple[str, ...] = PRUNE_TARGETS

    def __post_init__(self):
        _check_types(self)
        _check(0.0 <= self.sparsity < 1.0, "PruneConfig", "sparsity",
               f"must be in [0, 1), got {self.sparsity!r}")
        _check_min(self, 0, "start_step", "end_step")
        _check_min(self, 1, "every")
        _check(not self.end_step or self.end_step > self.start_step, "PruneConfig", "end_step",
               f"must exceed start_step={self.start_step} (or be 0 = TrainConfig.steps), "
               f"got {self.end_step}")
        _check_patterns(self, "targets")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Token-level knowledge distillation (Hinton et al. 2015; Kim & Rush 2016, word-level):
    the loss is ``(1 - alpha) * CE + alpha * T^2 * KL(teacher || student)`` at temperature T,
    with the teacher run frozen in the same step, its parameters sharded by the same rules.

    Sequence-level distillation is data, not a loss: `jaxmt distill translate` writes the
    teacher's beam outputs as a corpus, and ``DataConfig.distilled`` trains on it.

    The teacher may be larger and of another architecture, but reads the same batches;
    it computes in the student's precision policy when that keeps its parameter dtype
    (jaxmt/compress/distill.py). The train log shows both terms per token (``ce``,
    ``kd``; ``loss`` = (1 - alpha) * ce + alpha * kd).

    Attributes:
      teacher: the teacher's model directory (trained by jaxmt, or a `jaxmt convert`
        output; an adapter/LoRA directory after `jaxmt export`); "" = no distillation.
      alpha: the weight of the distillation term (0 = plain cross entropy, the KD term
        only logged).
      temperature: T, softening both distributions.
      vocab_mapping: teacher and student vocabularies must match piece for piece over the
        student's pieces (copy the teacher's spm.model into the student's model directory
        before its first run); True instead matches the pieces they share (by string) and
        distils over those, reporting the coverage (and logging ``kd_covered``, the share
        of target tokens whose piece is shared).
    """

    teacher: str = ""
    alpha: float = 0.5
    temperature: float = 1.0
    vocab_mapping: bool = False

    def __post_init__(self):
        _check_types(self)
        _check(0.0 <= self.alpha <= 1.0, "DistillConfig", "alpha",
               f"must be in [0, 1], got {self.alpha!r}")
        _check_min(self, 0, "temperature", strict=True)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation, schedule and bookkeeping."""

    steps: int = 1000
    batch_size: int = 32  # global, in packed rows (bucketing: rows of the longest bucket)
    # Gradient accumulation: the batch is cut into this many microbatches, run one after
    # another in a lax.scan, with their gradients summed in float32. Same update, less
    # activation memory; batch_size must divide by (replica x data x fsdp) x this.
    num_microbatches: int = 1
    # Adafactor with parameter-scaled updates is T5's recipe and learned far faster than
    # AdamW on the demo (chrF 30.6 vs 15.3 at equal steps; see README).
    optimizer: str = "adafactor"  # adafactor | adamw
    learning_rate: float = 1e-2
    warmup_steps: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    label_smoothing: float = 0.1
    z_loss: float = 1e-4
    seed: int = 0
    log_every: int = 20
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    # Dynamic loss scaling, used only by ModelConfig.precision = "fp16" (jaxmt/train/loss_scale.py):
    # the starting scale, and the finite steps after which it doubles (halved on overflow).
    loss_scale_init: float = 2.0 ** 15
    loss_scale_growth_interval: int = 2000
    # A run stops, with an error, after this many consecutive steps whose loss or
    # gradients were not finite: one bad batch is skipped, a diverged run is not retried
    # forever.
    max_nonfinite_steps: int = 10
    # After SIGTERM/SIGINT (preemption), the seconds the run has to save a checkpoint
    # before it exits.
    preemption_grace_s: float = 30.0
    # A wall-clock budget for training (fairseq's --stop-time-hours), counted across
    # resumes; 0 = none. Training stops at ``steps`` or when the budget is spent, whichever
    # comes first, with a checkpoint. The learning rate decays over whichever of the two
    # is nearer (see jaxmt/train/trainer.py: learning_rate_schedule), so a budget never
    # cuts the schedule off half-way.
    max_minutes: float = 0.0
    # Regular expressions over parameter paths ("decoder/layers_0/mlp/wo"); a parameter
    # trains when any of them matches its whole path (re.fullmatch), and the others stay
    # frozen with no optimizer state. Empty: everything trains, except with adapters or
    # LoRA (ModelConfig.adapter / .lora), where only their parameters train.
    trainable: tuple[str, ...] = ()
    # Gradual magnitude pruning and token-level distillation (factories: gin bindings of
    # PruneConfig / DistillConfig apply without naming them here).
    prune: PruneConfig = dataclasses.field(default_factory=lambda: PruneConfig())
    distill: DistillConfig = dataclasses.field(default_factory=lambda: DistillConfig())

    def __post_init__(self):
        for f, cls in (("prune", PruneConfig), ("distill", DistillConfig)):
            if isinstance(getattr(self, f), dict):  # from jaxmt_config.json
                object.__setattr__(self, f, cls(**getattr(self, f)))
            _check(isinstance(getattr(self, f), cls), "TrainConfig", f,
                   f"must be a {cls.__name__}, got {type(getattr(self, f)).__name__}")
        _check_types(self)
        _check_patterns(self, "trainable")
        _check_min(self, 1, "steps", "batch_size", "num_microbatches", "log_every",
                   "checkpoint_every", "keep_checkpoints", "loss_scale_growth_interval",
                   "max_nonfinite_steps")
        _check_min(self, 0, "warmup_steps", "weight_decay", "z_loss", "seed", "max_minutes")
        _check_min(self, 0, "learning_rate", "grad_clip", "preemption_grace_s", strict=True)
        _check(self.batch_size % self.num_microbatches == 0, "TrainConfig", "num_microbatches",
               f"batch_size={self.batch_size} is not divisible by num_microbatches="
               f"{self.num_microbatches}; make batch_size a multiple of {self.num_microbatches}"
               f" or num_microbatches a divisor of {self.batch_size}")
        _check(self.optimizer in ("adamw", "adafactor"), "TrainConfig", "optimizer",
               f"unknown optimizer {self.optimizer!r} (adamw | adafactor)")
        _check(0.0 <= self.label_smoothing < 1.0, "TrainConfig", "label_smoothing",
               f"must be in [0, 1), got {self.label_smoothing!r}")
        # The scale never drops below 1, and must stay a finite float32.
        _check(1.0 <= self.loss_scale_init <= 2.0 ** 127, "TrainConfig", "loss_scale_init",
               f"must be in [1, 2**127], got {self.loss_scale_init}")


DECODE_STRATEGIES = ("greedy", "beam", "sample")
LENGTH_PENALTIES = ("gnmt", "power", "none")
EARLY_STOPPING = ("never", "heuristic", "first")
CACHE_REORDERS = ("auto", "shared", "gather", "one_hot")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """How a model translates: the ``decode`` section of its directory's config.

    ``jaxmt train`` stores the run's (gin: ``DecodeConfig.beam_size = 5``); ``jaxmt
    convert`` stores an imported checkpoint's generation defaults. ``Translator.translate
    (..., **overrides)`` and the ``translate``/``eval`` flags replace single fields. The
    defaults are for translation: beam 4 with T5X's GNMT penalty, canonical stopping,
    outputs capped relative to their source, and no 4-gram generated twice (loops).

    Attributes:
        strategy: ``"greedy"``, ``"beam"`` or ``"sample"``.
        beam_size: beams kept per sentence (beam search).
        n_best: outputs returned per sentence, best first (at most ``beam_size``, or
            ``num_decodes`` when sampling).
        length_penalty: ``"gnmt"`` ``((5 + len) / 6) ** alpha`` (T5X), ``"power"``
            ``len ** alpha`` (Hugging Face, CTranslate2) or ``"none"``.
        alpha: the penalty's exponent.
        early_stopping: ``"never"`` (canonical: stop when no alive beam can win),
            ``"heuristic"`` (Hugging Face's ``early_stopping=False``) or ``"first"``
            (``True``: stop at ``beam_size`` finished hypotheses).
        min_len: fewest output tokens, EOS included.
        max_len_a, max_len_b: an output has at most ``a * source_tokens + b`` tokens,
            EOS included (fairseq's ``--max-len-a/b``); the translator's ``max_decode_len``
            caps it too. Outputs cut off there are counted and reported.
        temperature, top_k, top_p: sampling (``top_k=0`` and ``top_p=1``: no cut).
        num_decodes: samples drawn per sentence.
        seed: the sampling seed.
        no_repeat_ngram_size: an n-gram is never generated twice (0: off).
        repetition_penalty: CTRL's penalty on tokens already generated (1: off).
        suppressed_ids: ids never generated: padding for jaxmt models, an imported
            model's ``bad_words_ids``.
        forced_eos: the last token an output can take is EOS (Hugging Face's
            ``forced_eos_token_id``).
        cache_reorder: how beam search's self-attention caches follow the beams:
            ``"shared"`` (nothing moves: a source's beams share one cache, each reading
            its ancestors' slots through a mask), ``"gather"`` (move the cache after the
            beams each step), ``"one_hot"`` (T5X's einsum: moves it within each batch
            shard on a mesh) or ``"auto"`` (shared, but for a Performer decoder, whose
            FAVOR+ step needs its own cache: one-hot on a mesh, else gather).
    """

    strategy: str = "beam"
    beam_size: int = 4
    n_best: int = 1
    length_penalty: str = "gnmt"
    alpha: float = 0.6
    early_stopping: str = "never"
    min_len: int = 1
    max_len_a: float = 2.0
    max_len_b: int = 10
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_decodes: int = 1
    seed: int = 0
    no_repeat_ngram_size: int = 4
    repetition_penalty: float = 1.0
    # Padding (id 0) starts the decoder and pads the targets, so a jaxmt-trained model
    # never learns its logit: a barely trained one may pick it, which reads as an empty
    # output. Imported checkpoints bring their own list (IMPORTED_DECODE: none).
    suppressed_ids: tuple[int, ...] = (0,)
    forced_eos: bool = False
    cache_reorder: str = "auto"

    def __post_init__(self):
        _check_types(self)
        _check_min(self, 1, "beam_size", "n_best", "min_len", "max_len_b", "num_decodes")
        _check_min(self, 0, "max_len_a", "top_k", "seed", "no_repeat_ngram_size")
        _check_min(self, 0, "temperature", "top_p", "repetition_penalty", strict=True)
        _check(self.top_p <= 1.0, "DecodeConfig", "top_p", f"must be <= 1, got {self.top_p}")
        for field, allowed in (("strategy", DECODE_STRATEGIES),
                               ("length_penalty", LENGTH_PENALTIES),
                               ("early_stopping", EARLY_STOPPING),
                               ("cache_reorder", CACHE_REORDERS)):
            _check(getattr(self, field) in allowed, "DecodeConfig", field,
                   f"unknown value {getattr(self, field)!r}; choose one of {', '.join(allowed)}")
        _check(all(i >= 0 for i in self.suppressed_ids), "DecodeConfig", "suppressed_ids",
               f"ids must be >= 0, got {self.suppressed_ids}")
        raise_ = {"greedy": "use strategy='beam'", "beam": "raise beam_size",
                  "sample": "raise num_decodes"}[self.strategy]
        _check(self.n_best <= self.outputs, "DecodeConfig", "n_best",
               f"{self.n_best} outputs per sentence, but strategy {self.strategy!r} gives "
               f"{self.outputs} ({raise_})")

    @property
    def outputs(self) -> int:
        """Hypotheses decoded per sentence (beams, samples, or 1)."""
        return {"greedy": 1, "beam": self.beam_size, "sample": self.num_decodes}[self.strategy]


IMPORTED_MAX_LEN = 256  # source and output token limit of imported models (no DataConfig)
# An imported checkpoint without generation defaults decodes as the reference's
# `generate()` does by default: greedy, no n-gram blocking, up to the token limit.
IMPORTED_DECODE = DecodeConfig(strategy="greedy", no_repeat_ngram_size=0, max_len_a=0.0,
                               max_len_b=IMPORTED_MAX_LEN, suppressed_ids=())


TOKENIZER_KINDS = ("t5", "marian")


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """How an imported model turns text into ids and back (``jaxmt_config.json``).

    Attributes:
        kind: ``"t5"`` (one SentencePiece model whose ids are the model's ids) or
            ``"marian"`` (source/target SentencePiece models plus ``vocab.json``).
        vocab_files: File names in the model directory: ``("spiece.model",)`` or
            ``("source.spm", "target.spm", "vocab.json")``.
        input_prefix: Prepended to every source text. ``{src}`` and ``{tgt}`` are
            replaced by the ``src_lang``/``tgt_lang`` arguments, ``{src_name}`` and
            ``{tgt_name}`` by their English names (:func:`jaxmt.data.signals.format_prefix`),
            e.g. ``">>{tgt}<< "`` for a multilingual Marian model or
            ``"translate {src_name} to {tgt_name}: "`` for T5.
        target_langs: The values ``tgt_lang`` may take (a multilingual Marian model's
            ``>>xx<<`` codes); empty means the prefix decides alone.
        reordered_ids: Original ids that became jaxmt's pad 0, EOS 1 and UNK 2; the
            other ids follow in their original order (:func:`id_permutation`).
            Empty when the original ids already follow jaxmt's convention.
        suppressed_ids: jaxmt ids the model must never generate (the checkpoint's
            single-token ``bad_words_ids``, e.g. Marian's pad).
    """

    kind: str
    vocab_files: tuple[str, ...]
    input_prefix: str = ""
    target_langs: tuple[str, ...] = ()
    reordered_ids: tuple[int, ...] = ()
    suppressed_ids: tuple[int, ...] = ()

    def __post_init__(self):
        _check_types(self)
        for f in ("reordered_ids", "suppressed_ids"):
            _check(all(i >= 0 for i in getattr(self, f)), "TokenizerConfig", f,
                   f"ids must be >= 0, got {getattr(self, f)}")
        if self.kind not in TOKENIZER_KINDS:
            raise ValueError(f"TokenizerConfig.kind: unknown value {self.kind!r}; "
                             f"choose one of {TOKENIZER_KINDS}")
        want = {"t5": 1, "marian": 3}[self.kind]
        if len(self.vocab_files) != want:
            raise ValueError(f"TokenizerConfig.vocab_files: kind {self.kind!r} needs {want} "
                             f"file(s), got {self.vocab_files}")
        if self.reordered_ids and len(self.reordered_ids) != 3:
            raise ValueError("TokenizerConfig.reordered_ids: needs exactly the original "
                             f"pad, EOS and UNK ids, got {self.reordered_ids}")


CONFIG_FILE = "jaxmt_config.json"  # in every model directory, beside VOCAB_FILE
CACHE_DIR = "data_cache"  # DataConfig.cache_dir's default, inside the model directory
VOCAB_FILE = "spm.model"
# "tokenizer" appears only in directories made by `jaxmt convert` (imported checkpoints);
# "decode" only in those written since DecodeConfig (older ones decode with its defaults).
_TYPES = {"model": ModelConfig, "mesh": MeshConfig, "data": DataConfig, "train": TrainConfig,
          "tokenizer": TokenizerConfig, "decode": DecodeConfig}


def to_json(**configs: Any) -> str:
    """Serialises named configs; the model directory keeps them for gin-free reloads."""
    return json.dumps({k: dataclasses.asdict(v) for k, v in configs.items()}, indent=2)


# Fields added after the first jaxmt_config.json layout. A directory written before them
# lacks them, and they take their defaults; any other missing field is an error (a
# truncated or hand-edited file). A field added to a config class belongs here too.
# (model.precision and data.batching replaced older keys: from_json migrates those.)
_ADDED_LATER = {
    "ModelConfig": {"position_embedding", "norm_type", "norm_position", "norm_epsilon",
                    "use_bias", "scale_embeddings", "tie_embeddings", "rescale_logits",
                    "final_logits_bias", "scan_layers", "encoder_remat", "decoder_remat",
                    "attention", "adapter", "lora", "quant"},
    "MeshConfig": {"replica", "shard_params"},
    "DataConfig": {"corpora", "clean", "mixture_cap", "mixture_caps", "mixture_weights",
                   "bucket_lengths", "cache_dir", "input_prefix", "distilled",
                   "distilled_rate"},
    "TrainConfig": {"num_microbatches", "loss_scale_init", "loss_scale_growth_interval",
                    "max_nonfinite_steps", "preemption_grace_s", "max_minutes", "trainable",
                    "prune", "distill"},
}
_NESTED = {("ModelConfig", "attention"): AttentionConfig,
           ("ModelConfig", "adapter"): AdapterConfig, ("ModelConfig", "lora"): LoraConfig,
           ("DataConfig", "clean"): sources.CleanConfig,
           ("TrainConfig", "prune"): PruneConfig, ("TrainConfig", "distill"): DistillConfig}


def _fields_from(cls: type, raw: Any, where: str) -> dict[str, Any]:
    """``raw`` checked against ``cls``'s fields (nested configs too), ready for ``cls(**)``.

    Raises:
      ValueError: not an object, an unknown key (with the closest field), or a missing one.
    """
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object of {cls.__name__} fields, got "
                         f"{type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in fields:
            raise ValueError(f"{where}: unknown field {k!r}{_did_you_mean(k, fields)}")
    missing = [k for k in fields if k not in raw and k not in _ADDED_LATER.get(cls.__name__, ())]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")
    out = dict(raw)
    for k, v in raw.items():
        nested = _NESTED.get((cls.__name__, k))
        if nested and isinstance(v, dict):
            out[k] = nested(**_fields_from(nested, v, f"{where}.{k}"))
    for k in fields:  # added later: the class's default, never a gin binding of this run
        if k not in raw:
            nested = _NESTED.get((cls.__name__, k))
            out[k] = declared_default(nested) if nested else declared_default(cls, k)
    return out


def declared_default(cls: type, name: str | None = None) -> Any:
    """A field's declared default (``name``), or a ``cls`` built from every field's
    declared default: explicit arguments, so gin's bindings for the class do not apply."""
    if name is None:
        return cls(**{f.name: declared_default(cls, f.name) for f in dataclasses.fields(cls)})
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    nested = _NESTED.get((cls.__name__, name))
    if nested is not None:
        return declared_default(nested)
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def from_json(text: str, source: str = CONFIG_FILE) -> dict[str, Any]:
    """Inverse of :func:`to_json`, for files from any directory: validates everything.

    Args:
      text: the JSON text.
      source: the file it came from, first in every error message.

    Raises:
      ValueError: invalid JSON (with line and column), an unknown section or field (with
        the closest name), a missing field (other than :data:`_ADDED_LATER`'s) or a value
        its config class rejects; the message starts with ``source``.
    """
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: invalid JSON at line {e.lineno} column {e.colno}: "
                         f"{e.msg}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a JSON object of sections "
                         f"{sorted(_TYPES)}, got {type(raw).__name__}")
    out = {}
    for k, v in raw.items():
        if k not in _TYPES:
            raise ValueError(f"{source}: unknown section {k!r}{_did_you_mean(k, _TYPES)}")
        if k == "model" and isinstance(v, dict) and "dtype" in v:  # before precision policies
            v = dict(v)
            pair = (v.pop("dtype"), v.pop("param_dtype", "float32"))
            v["precision"] = {p: k for k, p in PRECISIONS.items()}.get(pair, "bf16")
        if k == "data" and isinstance(v, dict) and "pack" in v:  # before DataConfig.batching
            v = dict(v)
            v["batching"] = "pack" if v.pop("pack") else "pad"
        try:
            out[k] = _TYPES[k](**_fields_from(_TYPES[k], v, f"{source}: {k}"))
        except (TypeError, ValueError) as e:  # gin appends a line ("In call to ...")
            msg = (str(e).splitlines() or [repr(e)])[0]
            raise ValueError(msg if msg.startswith(source) else f"{source}: {msg}") from None
    return out


def load(model_dir: str) -> dict[str, Any]:
    """The configs a model directory was trained with (``jaxmt train`` writes them).

    Raises:
      FileNotFoundError: no ``jaxmt_config.json`` there.
      ValueError: the file is not valid (see :func:`from_json`); the message starts with
        its path.
    """
    path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not a jaxmt model directory (run `jaxmt train`).")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return from_json(text, source=path)
