"""The encoder-decoder network, in three architecture families chosen by ModelConfig:

- T5.1.1 / mT5 (default): pre-norm RMSNorm, relative position bias shared per stack,
  gated-GELU MLP, untied output layer.
- Original T5: the same with a ReLU MLP and tied embeddings (logits rescaled).
- Transformer-base / Marian: sinusoidal positions, LayerNorm (post- or pre-norm),
  biases, embeddings scaled by sqrt(d_model), tied embeddings, final logits bias.

Layers are unrolled (``layers_0``, ``layers_1``, ...) or, with ``scan_layers``, one
``nn.scan`` over parameters stacked on a ``layers`` axis, so compile time stays flat
as depth grows. Either form can be rematerialised per stack with a named policy.

Packed inputs are supported through segment ids: tokens attend only within their
segment. Language adapters (after every layer, chosen per token by its routing id)
and LoRA (on the projections) come with ``ModelConfig.adapter`` / ``.lora``; see
:mod:`jaxmt.modeling.adapters`. This module is pure computation; losses and decoding
live in :mod:`jaxmt.modeling.model` and :mod:`jaxmt.modeling.decoding`.
"""

from __future__ import annotations

import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmt.config import ModelConfig
from jaxmt.kernels.common import RelPos
from jaxmt.modeling import adapters
from jaxmt.modeling.attention import (Masking, MultiHeadAttention, PerformerStep, SharedBeamStep,
                                      dense_bias, mask_to_bias)
from jaxmt.modeling.layers import (Embed, MlpBlock, Norm, RelativePositionBias, bias_param,
                                   constrain, dense, dtype_of, normal, sinusoidal_positions,
                                   weight)
from jaxmt.sharding import axes

Array = jax.Array
PyTree = Any


def remat_policy(name: str):
    """The ``jax.checkpoint`` policy for a config name (see config.REMAT_POLICIES).

    ``full`` saves nothing inside a layer (only its input); ``dots_saveable`` keeps
    every matmul output (named ``dot`` by :func:`~jaxmt.modeling.layers.mixed_einsum`) and
    recomputes the element-wise work; ``save_attention_out`` keeps each attention
    block's output; ``offload`` moves the matmul outputs to pinned host memory
    instead of keeping or recomputing them.
    """
    cp = jax.checkpoint_policies
    if name == "full":
        return cp.nothing_saveable
    if name == "dots_saveable":
        return cp.save_only_these_names("dot")
    if name == "save_attention_out":
        return cp.save_only_these_names("attention_out")
    if name == "offload":
        kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
        if "pinned_host" not in kinds:
            raise ValueError(f"ModelConfig.*_remat: 'offload' needs pinned_host memory, which "
                             f"{jax.devices()[0].platform} lacks (it has {sorted(kinds)})")
        return cp.save_and_offload_only_these_names(
            names_which_can_be_saved=(), names_which_can_be_offloaded=("dot",),
            offload_src="device", offload_dst="pinned_host")
    raise ValueError(f"unknown remat policy {name!r}")


def _attn(cfg: ModelConfig, name: str) -> MultiHeadAttention:
    return MultiHeadAttention(num_heads=cfg.num_heads, head_dim=cfg.head_dim, emb_dim=cfg.emb_dim,
                              use_bias=cfg.use_bias, dropout_rate=cfg.dropout_rate,
                              dtype=cfg.dtype, param_dtype=cfg.param_dtype, lora=cfg.lora,
                              quant=cfg.quant, name=name)


def _mlp(cfg: ModelConfig) -> MlpBlock:
    return MlpBlock(emb_dim=cfg.emb_dim, mlp_dim=cfg.mlp_dim, activations=cfg.mlp_activations,
                    use_bias=cfg.use_bias, dropout_rate=cfg.dropout_rate, dtype=cfg.dtype,
                    param_dtype=cfg.param_dtype, lora=cfg.lora, quant=cfg.quant, name="mlp")


def _norm(cfg: ModelConfig, name: str) -> Norm:
    return Norm(kind=cfg.norm_type, epsilon=cfg.norm_epsilon, dtype=cfg.dtype,
                param_dtype=cfg.param_dtype, name=name)


def _residual(cfg: ModelConfig, name: str, x: Array, sublayer, deterministic: bool) -> Array:
    """Pre-norm ``x + f(norm(x))`` or post-norm ``norm(x + f(x))``, with dropout on f."""
    drop = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
    norm = _norm(cfg, name)
    if cfg.norm_position == "pre":
        return x + drop(sublayer(norm(x)), deterministic=deterministic)
    return norm(x + drop(sublayer(x), deterministic=deterministic))


def _adapt(cfg: ModelConfig, x: Array, lang_ids: Array | None) -> Array:
    """A layer's output through its language adapter (routing ids [b, t]), if any."""
    return adapters.adapter(cfg)(x, lang_ids) if cfg.adapter.size else x


class EncoderLayer(nn.Module):
    cfg: ModelConfig
    scanned: bool = False  # nn.scan wants (carry, output)

    @nn.compact
    def __call__(self, x: Array, bias: Array, deterministic: bool,
                 lang_ids: Array | None = None):
        cfg = self.cfg
        x = _residual(cfg, "attention_norm", x,
                      lambda y: _attn(cfg, "attention")(y, y, bias, deterministic), deterministic)
        x = _residual(cfg, "mlp_norm", x, lambda y: _mlp(cfg)(y, deterministic), deterministic)
        x = _adapt(cfg, x, lang_ids)
        return (x, None) if self.scanned else x


class DecoderLayer(nn.Module):
    cfg: ModelConfig
    scanned: bool = False

    @nn.compact
    def __call__(self, x: Array, encoded: Array, self_bias: Array, cross_bias: Array,
                 deterministic: bool, decode: bool, lang_ids: Array | None = None):
        cfg = self.cfg
        x = _residual(cfg, "self_attention_norm", x,
                      lambda y: _attn(cfg, "self_attention")(y, y, self_bias, deterministic,
                                                             decode=decode), deterministic)
        x = _residual(cfg, "cross_attention_norm", x,
                      lambda y: _attn(cfg, "cross_attention")(y, encoded, cross_bias,
                                                              deterministic, decode=decode,
                                                              cache=False), deterministic)
        x = _residual(cfg, "mlp_norm", x, lambda y: _mlp(cfg)(y, deterministic), deterministic)
        x = _adapt(cfg, x, lang_ids)
        return (x, None) if self.scanned else x


def _run_layers(cfg: ModelConfig, layer_cls, num_layers: int, policy: str,
                static_argnums: tuple[int, ...], x: Array, *args) -> Array:
    """Applies ``num_layers`` layers, unrolled or scanned, rematerialised by ``policy``.

    ``static_argnums`` index ``__call__``'s arguments with ``self`` as 0 (the Python
    bools), which remat must not trace.
    """
    if policy != "none":
        layer_cls = nn.remat(layer_cls, policy=remat_policy(policy), static_argnums=static_argnums,
                             prevent_cse=not cfg.scan_layers)  # scan already blocks CSE
    if not cfg.scan_layers:
        for i in range(num_layers):
            x = layer_cls(cfg, name=f"layers_{i}")(x, *args)
        return x
    stack = nn.scan(layer_cls, variable_axes={"params": 0, "cache": 0},
                    split_rngs={"params": True, "dropout": True},
                    in_axes=(nn.broadcast,) * len(args), length=num_layers,
                    metadata_params={nn.PARTITION_NAME: axes.LAYERS})
    x, _ = stack(cfg, scanned=True, name="layers")(x, *args)
    return x


def _masking(cfg: ModelConfig, kind: str, q_seg: Array, k_seg: Array,
             table: Array | None, bidirectional: bool) -> Array | Masking:
    """The attention input for ``kind``: a Masking for the chosen implementation, or for
    ``xla`` its dense bias [b, h|1, q, k] (built once per stack, shared by the layers)."""
    causal = kind == "decoder"
    relpos = None if table is None else RelPos(cfg.relpos_buckets, cfg.relpos_max_distance,
                                               bidirectional)
    m = Masking(q_seg, k_seg, table, impl=cfg.attention.resolve(kind, k_seg.shape[1]),
                causal=causal, relpos=relpos, options=cfg.attention)
    return dense_bias(m, q_seg.shape[1], k_seg.shape[1]) if m.impl == "xla" else m


def _relpos_table(cfg: ModelConfig, bidirectional: bool) -> Array | None:
    if cfg.position_embedding != "relative":
        return None
    return RelativePositionBias(cfg.relpos_buckets, cfg.relpos_max_distance, cfg.num_heads,
                                bidirectional=bidirectional, param_dtype=cfg.param_dtype,
                                name="relpos_bias")()  # [buckets, h] float32


def _embed(cfg: ModelConfig, embed: nn.Module, tokens: Array, positions: Array,
           deterministic: bool) -> Array:
    """Token embeddings (scaled for Marian) plus sinusoidal positions if configured."""
    x = embed(tokens)  # [b, l, e]
    if cfg.scale_embeddings:
        x = x * math.sqrt(cfg.emb_dim)
    if cfg.position_embedding == "sinusoidal":
        x = x + sinusoidal_positions(positions, cfg.emb_dim).astype(x.dtype)  # [b, l, e]
    x = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)
    return constrain(x, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED))


def _final(cfg: ModelConfig, x: Array, deterministic: bool) -> Array:
    """Pre-norm stacks end with a norm; post-norm layers are already normalised."""
    if cfg.norm_position == "pre":
        x = _norm(cfg, "final_norm")(x)
    return nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)


class Encoder(nn.Module):
    cfg: ModelConfig
    embed: nn.Module

    @nn.compact
    def __call__(self, tokens: Array, segment_ids: Array, positions: Array,
                 deterministic: bool, lang_ids: Array | None = None) -> Array:
        """Returns the encoded source [b, s, e]; ``lang_ids`` [b] or [b, s] routes the
        adapters (ignored without them)."""
        cfg = self.cfg
        lang_ids = (adapters.token_ids(lang_ids, *tokens.shape, "encoder_lang_ids")
                    if cfg.adapter.size else None)  # [b, s]; without adapters, ignored
        x = _embed(cfg, self.embed, tokens, positions, deterministic)
        # Bias positions are plain indices: with packing, cross-segment pairs are masked.
        bias = _masking(cfg, "encoder", segment_ids, segment_ids,
                        _relpos_table(cfg, bidirectional=True), bidirectional=True)
        x = _run_layers(cfg, EncoderLayer, cfg.num_encoder_layers, cfg.encoder_remat, (3,),
                        x, bias, deterministic, lang_ids)
        x = _final(cfg, x, deterministic)
        return constrain(x, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED))


class Decoder(nn.Module):
    cfg: ModelConfig
    embed: nn.Module

    @nn.compact
    def __call__(self, tokens: Array, encoded: Array, decoder_segment_ids: Array,
                 encoder_segment_ids: Array, positions: Array, deterministic: bool,
                 decode: bool = False, max_decode_len: int | None = None,
                 beam_slots: Array | None = None, lang_ids: Array | None = None) -> Array:
        """Returns float32 logits [b, t, vocab].

        In decode mode ``tokens`` is [b, 1], ``positions`` is the step's position [b, 1]
        and the self-attention bias spans the cache length ``max_decode_len``;
        ``encoded`` [b / r, s, e] and ``encoder_segment_ids`` may have one row per r
        adjacent decoder rows (the beams or samples of a source), which then share its
        cross-attention keys and values. A step
        attends exactly over the cache, with the decoder's window under ``local`` and with
        the same FAVOR+ features under ``performer``, so it equals the teacher-forced pass.

        ``beam_slots`` [g, r, T] (decode mode only) makes the r adjacent rows of each group
        share one self-attention cache (a :class:`SharedBeamStep`): row ``j`` reads
        position ``s`` from the slot ``beam_slots[:, j, s]`` (this step's own position
        must name ``j``). The cache is sized for it when the first (init) call has it too.

        ``lang_ids`` routes the adapters (ignored without them): [b] or [b, t]; in decode
        mode also [b / r], one per group of r adjacent rows (a source's beams or samples).
        """
        cfg = self.cfg
        lang_ids = (adapters.token_ids(lang_ids, *tokens.shape, "decoder_lang_ids",
                                       groups=decode)
                    if cfg.adapter.size else None)  # [b, t]; without adapters, ignored
        x = _embed(cfg, self.embed, tokens, positions, deterministic)
        if decode:
            max_decode_len = max_decode_len or tokens.shape[1]  # init sizes the cache
            # One query at the current position against the whole cache, which masks
            # the future itself.
            q_pos, k_pos = positions[0], jnp.arange(max_decode_len)
            self_bias = _decode_window(cfg, q_pos, k_pos)  # [1, 1, 1, T]
            cross_bias = mask_to_bias((encoder_segment_ids > 0)[:, None, None, :])  # [b/r,1,1,s]
            if cfg.position_embedding == "relative":
                self_bias = self_bias + RelativePositionBias(
                    cfg.relpos_buckets, cfg.relpos_max_distance, cfg.num_heads,
                    bidirectional=False, param_dtype=cfg.param_dtype,
                    name="relpos_bias")(q_pos, k_pos)  # [1, h, 1, T]
            a = cfg.attention
            performer = a.resolve("decoder", max_decode_len) == "performer"
            if beam_slots is not None:
                if performer:
                    raise ValueError("shared beam caches need softmax attention; a performer "
                                     "decoder reorders its cache (cache_reorder gather/one_hot)")
                self_bias = _slot_bias(self_bias, beam_slots)  # [g, h|1, r, T*r]
            elif performer:  # decode as it trained
                self_bias = PerformerStep(self_bias, a.performer_features, a.seed)
        else:
            self_bias = _masking(cfg, "decoder", decoder_segment_ids, decoder_segment_ids,
                                 _relpos_table(cfg, bidirectional=False), bidirectional=False)
            cross_bias = _masking(cfg, "cross", decoder_segment_ids, encoder_segment_ids, None,
                                  bidirectional=True)
        x = _run_layers(cfg, DecoderLayer, cfg.num_decoder_layers, cfg.decoder_remat, (5, 6),
                        x, encoded, self_bias, cross_bias, deterministic, decode, lang_ids)
        x = _final(cfg, x, deterministic)
        if cfg.rescale_logits:  # original T5 with tied embeddings
            x = x * (cfg.emb_dim ** -0.5)
        if cfg.tie_embeddings:
            logits = self.embed.attend(x)  # [b, t, v] float32
        else:
            w = weight(self, "logits_dense", normal(cfg.emb_dim ** -0.5),
                       (cfg.emb_dim, cfg.vocab_size), (axes.EMBED, axes.VOCAB), (1,), cfg.quant,
                       dtype_of(cfg.param_dtype))
            logits = dense("bte,ev->btv", x, w, dtype_of(cfg.dtype))  # [b, t, v] float32
        if cfg.final_logits_bias:
            logits = logits + bias_param(self, "final_logits_bias", (cfg.vocab_size,),
                                         (axes.VOCAB,), dtype_of(cfg.param_dtype))
        return constrain(logits, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_VOCAB))


def _slot_bias(bias: Array, beam_slots: Array) -> SharedBeamStep:
    """A shared beam cache's self-attention input: ``bias`` [1, h|1, 1, T] over positions,
    repeated for each of the r slots of a position, plus the mask of the slots each beam
    reads (keys in the cache's (position, slot) order)."""
    g, r, t = beam_slots.shape
    bias = bias[:, :, :1]  # one query position (the init pass has all; it only sizes caches)
    reads = beam_slots[:, :, :, None] == jnp.arange(r)[None, None, None, :]  # [g, r, T, r]
    slots = mask_to_bias(reads.reshape(g, 1, r, t * r))  # [g, 1, r(query), T * r(slot)]
    return SharedBeamStep(jnp.repeat(bias, r, axis=-1) + slots, group=r)


def _decode_window(cfg: ModelConfig, q_pos: Array, k_pos: Array) -> Array:
    """A decode step's self-attention mask over the cache [1, 1, 1, T]: everything (the
    cache masks the future itself), or with ``local`` decoder attention, its window."""
    a = cfg.attention
    if a.resolve("decoder", k_pos.shape[0]) != "local":
        return jnp.zeros((1, 1, 1, k_pos.shape[0]), jnp.float32)
    seen = (q_pos[:, None] - k_pos[None, :] <= a.window) | (k_pos[None, :] < a.global_tokens)
    return mask_to_bias(seen[None, None])  # [1, 1, 1, T]


def _positions(tokens: Array, positions: Array | None) -> Array:
    if positions is None:
        return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return positions


class EncoderDecoder(nn.Module):
    """The whole network; ``encode`` and ``decode`` are exposed for inference."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        # With tied embeddings the table is also the output layer: T5 and Marian
        # initialise it at 1/sqrt(d) so initial logits are O(1).
        std = cfg.emb_dim ** -0.5 if cfg.tie_embeddings and not cfg.rescale_logits else 1.0
        self.token_embed = Embed(cfg.vocab_size, cfg.emb_dim, init_std=std, dtype=cfg.dtype,
                                 param_dtype=cfg.param_dtype, quant=cfg.quant)
        self.encoder = Encoder(cfg, self.token_embed)
        self.decoder = Decoder(cfg, self.token_embed)

    def encode(self, tokens: Array, segment_ids: Array | None = None,
               positions: Array | None = None, deterministic: bool = True,
               lang_ids: Array | None = None) -> Array:
        """The encoded source [b, s, e]; ``lang_ids`` [b] or [b, s] routes the adapters."""
        if segment_ids is None:
            segment_ids = (tokens > 0).astype(jnp.int32)
        return self.encoder(tokens, segment_ids, _positions(tokens, positions), deterministic,
                            lang_ids)

    def decode(self, tokens: Array, encoded: Array, encoder_segment_ids: Array,
               decoder_segment_ids: Array | None = None, positions: Array | None = None,
               deterministic: bool = True, decode: bool = False,
               max_decode_len: int | None = None, beam_slots: Array | None = None,
               lang_ids: Array | None = None) -> Array:
        """Teacher-forced logits, or with ``decode=True`` one step at ``positions`` [b, 1]
        (``beam_slots``: :class:`Decoder`'s shared beam caches). ``lang_ids`` routes the
        adapters: [b] or [b, t]; in a decode step [b] or one per source group [b / r]."""
        if decoder_segment_ids is None:
            decoder_segment_ids = jnp.ones(tokens.shape, jnp.int32)
        return self.decoder(tokens, encoded, decoder_segment_ids, encoder_segment_ids,
                            _positions(tokens, positions), deterministic, decode, max_decode_len,
                            beam_slots, lang_ids)

    def __call__(self, batch: dict[str, Array], deterministic: bool = True) -> Array:
        """Teacher-forced logits [b, t, vocab] for a (possibly packed) batch; with adapters
        it needs the routing ids ``encoder_lang_ids`` and ``decoder_lang_ids``."""
        enc_seg = batch["encoder_segment_ids"]
        encoded = self.encode(batch["encoder_input_tokens"], enc_seg,
                              batch.get("encoder_positions"), deterministic,
                              batch.get("encoder_lang_ids"))
        return self.decode(batch["decoder_input_tokens"], encoded, enc_seg,
                           batch["decoder_segment_ids"], batch.get("decoder_positions"),
                           deterministic, lang_ids=batch.get("decoder_lang_ids"))


_LAYER = re.compile(r"layers_(\d+)$")


def stack_layers(params: PyTree) -> PyTree:
    """Unrolled parameters (``layers_0``, ``layers_1``...) -> the scanned layout, where
    each stack's ``layers`` subtree has a leading layer dimension."""
    if not isinstance(params, dict):
        return params
    numbered = {int(m.group(1)): k for k in params if (m := _LAYER.match(k))}
    out = {k: stack_layers(v) for k, v in params.items() if not _LAYER.match(k)}
    if numbered:
        if sorted(numbered) != list(range(len(numbered))):
            raise ValueError(f"layer indices are not 0..n-1: {sorted(numbered)}")
        layers = [params[numbered[i]] for i in range(len(numbered))]
        out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return out


def unstack_layers(params: PyTree) -> PyTree:
    """Inverse of :func:`stack_layers`."""
    if not isinstance(params, dict):
        return params
    out = {k: unstack_layers(v) for k, v in params.items() if k != "layers"}
    if "layers" in params:
        n = jax.tree.leaves(params["layers"])[0].shape[0]
        for i in range(n):
            out[f"layers_{i}"] = jax.tree.map(lambda x: x[i], params["layers"])
    return out
