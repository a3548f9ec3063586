"""The encoder-decoder network (T5.1.1 / mT5 style): pre-norm RMSNorm, shared relative
position bias per stack, gated-GELU MLP, untied output layer.

Packed inputs are supported through segment ids: tokens attend only within their
segment. This module is pure computation; losses and decoding live in
:mod:`jaxmt.model` and :mod:`jaxmt.decoding`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmt import axes
from jaxmt.attention import MultiHeadAttention, mask_to_bias
from jaxmt.config import ModelConfig
from jaxmt.layers import (Embed, MlpBlock, RelativePositionBias, RMSNorm, constrain, dtype_of,
                          mixed_einsum, normal, param)

Array = jax.Array


def _attn(cfg: ModelConfig, name: str) -> MultiHeadAttention:
    return MultiHeadAttention(num_heads=cfg.num_heads, head_dim=cfg.head_dim, emb_dim=cfg.emb_dim,
                              dropout_rate=cfg.dropout_rate, dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype, name=name)


def _mlp(cfg: ModelConfig) -> MlpBlock:
    return MlpBlock(emb_dim=cfg.emb_dim, mlp_dim=cfg.mlp_dim, activations=cfg.mlp_activations,
                    dropout_rate=cfg.dropout_rate, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                    name="mlp")


def _norm(cfg: ModelConfig, name: str) -> RMSNorm:
    return RMSNorm(dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)


class EncoderLayer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array, bias: Array, deterministic: bool) -> Array:
        drop = nn.Dropout(self.cfg.dropout_rate, broadcast_dims=(-2,))
        y = _norm(self.cfg, "pre_attention_norm")(x)
        y = _attn(self.cfg, "attention")(y, y, bias, deterministic)
        x = x + drop(y, deterministic=deterministic)
        y = _norm(self.cfg, "pre_mlp_norm")(x)
        y = _mlp(self.cfg)(y, deterministic)
        return x + drop(y, deterministic=deterministic)


class DecoderLayer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array, encoded: Array, self_bias: Array, cross_bias: Array,
                 deterministic: bool, decode: bool) -> Array:
        drop = nn.Dropout(self.cfg.dropout_rate, broadcast_dims=(-2,))
        y = _norm(self.cfg, "pre_self_attention_norm")(x)
        y = _attn(self.cfg, "self_attention")(y, y, self_bias, deterministic, decode=decode)
        x = x + drop(y, deterministic=deterministic)
        y = _norm(self.cfg, "pre_cross_attention_norm")(x)
        y = _attn(self.cfg, "encoder_decoder_attention")(y, encoded, cross_bias, deterministic)
        x = x + drop(y, deterministic=deterministic)
        y = _norm(self.cfg, "pre_mlp_norm")(x)
        y = _mlp(self.cfg)(y, deterministic)
        return x + drop(y, deterministic=deterministic)


def segment_mask(q_seg: Array, k_seg: Array) -> Array:
    """[b, q], [b, k] segment ids (0 = padding) -> boolean [b, 1, q, k]."""
    m = (q_seg[:, :, None] == k_seg[:, None, :]) & (q_seg[:, :, None] > 0) & (k_seg[:, None, :] > 0)
    return m[:, None]


class Encoder(nn.Module):
    cfg: ModelConfig
    embed: nn.Module

    @nn.compact
    def __call__(self, tokens: Array, segment_ids: Array, deterministic: bool) -> Array:
        cfg = self.cfg
        x = self.embed(tokens)  # [b, s, e]
        x = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)
        pos = jnp.arange(tokens.shape[1])
        relpos = RelativePositionBias(cfg.relpos_buckets, cfg.relpos_max_distance, cfg.num_heads,
                                      bidirectional=True, param_dtype=cfg.param_dtype,
                                      name="relpos_bias")(pos, pos)  # [1, h, s, s]
        bias = relpos + mask_to_bias(segment_mask(segment_ids, segment_ids))  # [b, h, s, s]
        for i in range(cfg.num_encoder_layers):
            x = EncoderLayer(cfg, name=f"layers_{i}")(x, bias, deterministic)
        x = _norm(cfg, "final_norm")(x)
        x = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)
        return constrain(x, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED))


class Decoder(nn.Module):
    cfg: ModelConfig
    embed: nn.Module

    @nn.compact
    def __call__(self, tokens: Array, encoded: Array, decoder_segment_ids: Array,
                 encoder_segment_ids: Array, deterministic: bool, decode: bool = False,
                 decode_position: Array | None = None, max_decode_len: int | None = None
                 ) -> Array:
        """Returns float32 logits [b, t, vocab].

        In decode mode ``tokens`` is [b, 1] at ``decode_position`` and the self-attention
        bias spans the cache length ``max_decode_len``.
        """
        cfg = self.cfg
        x = self.embed(tokens)  # [b, t, e]
        x = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)
        relpos = RelativePositionBias(cfg.relpos_buckets, cfg.relpos_max_distance, cfg.num_heads,
                                      bidirectional=False, param_dtype=cfg.param_dtype,
                                      name="relpos_bias")
        enc_valid = encoder_segment_ids
        if decode and decode_position is not None:
            # One query at decode_position against the whole cache; the cache masks the future.
            self_bias = relpos(decode_position[None], jnp.arange(max_decode_len))  # [1, h, 1, T]
            cross_mask = (enc_valid > 0)[:, None, None, :]  # [b, 1, 1, s]
        else:
            pos = jnp.arange(tokens.shape[1])
            causal = (pos[None, :] <= pos[:, None])[None, None]  # [1, 1, t, t]
            self_mask = segment_mask(decoder_segment_ids, decoder_segment_ids) & causal
            self_bias = relpos(pos, pos) + mask_to_bias(self_mask)  # [b, h, t, t]
            cross_mask = segment_mask(decoder_segment_ids, encoder_segment_ids)  # [b, 1, t, s]
        cross_bias = mask_to_bias(cross_mask)
        for i in range(cfg.num_decoder_layers):
            x = DecoderLayer(cfg, name=f"layers_{i}")(x, encoded, self_bias, cross_bias,
                                                      deterministic, decode)
        x = _norm(cfg, "final_norm")(x)
        x = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)
        w = param(self, "logits_dense", normal(cfg.emb_dim ** -0.5), (cfg.emb_dim, cfg.vocab_size),
                  (axes.EMBED, axes.VOCAB), dtype_of(cfg.param_dtype))
        logits = mixed_einsum("bte,ev->btv", x, w, dtype_of(cfg.dtype))  # [b, t, v] float32
        return constrain(logits, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_VOCAB))


class EncoderDecoder(nn.Module):
    """The whole network; ``encode`` and ``decode`` are exposed for inference."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.token_embed = Embed(cfg.vocab_size, cfg.emb_dim, dtype=cfg.dtype,
                                 param_dtype=cfg.param_dtype)
        self.encoder = Encoder(cfg, self.token_embed)
        self.decoder = Decoder(cfg, self.token_embed)

    def encode(self, tokens: Array, segment_ids: Array | None = None,
               deterministic: bool = True) -> Array:
        if segment_ids is None:
            segment_ids = (tokens > 0).astype(jnp.int32)
        return self.encoder(tokens, segment_ids, deterministic)

    def decode(self, tokens: Array, encoded: Array, encoder_segment_ids: Array,
               decoder_segment_ids: Array | None = None, deterministic: bool = True,
               decode: bool = False, decode_position: Array | None = None,
               max_decode_len: int | None = None) -> Array:
        if decoder_segment_ids is None:
            decoder_segment_ids = jnp.ones(tokens.shape, jnp.int32)
        return self.decoder(tokens, encoded, decoder_segment_ids, encoder_segment_ids,
                            deterministic, decode, decode_position, max_decode_len)

    def __call__(self, batch: dict[str, Array], deterministic: bool = True) -> Array:
        """Teacher-forced logits [b, t, vocab] for a (possibly packed) batch."""
        enc_seg = batch["encoder_segment_ids"]
        encoded = self.encode(batch["encoder_input_tokens"], enc_seg, deterministic)
        return self.decode(batch["decoder_input_tokens"], encoded, enc_seg,
                           batch["decoder_segment_ids"], deterministic)
