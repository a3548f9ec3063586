"""EncoderDecoderModel: the loss, scoring and decoding around the network (T5X's split).

The Module (:class:`jaxmt.network.EncoderDecoder`) only computes logits; this class
owns what a training or inference loop needs from it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxmt.config import ModelConfig
from jaxmt.network import EncoderDecoder

Array = jax.Array
PyTree = Any

BATCH_KEYS = ("encoder_input_tokens", "encoder_segment_ids", "encoder_positions",
              "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
              "decoder_segment_ids", "decoder_positions")


def cross_entropy(logits: Array, targets: Array, weights: Array, label_smoothing: float,
                  z_loss: float) -> tuple[Array, Array, Array]:
    """Token-level smoothed cross entropy in float32.

    Returns (summed loss, summed z-loss, summed unsmoothed NLL), each weighted by
    ``weights``; callers normalise by the number of target tokens.
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    # Subtract the entropy of the smoothed target so a perfect model scores 0.
    normalizer = -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low + 1e-20))
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [b, t]
    log_p = logits - log_z[..., None]
    nll = -jnp.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]  # [b, t]
    smooth = -jnp.mean(log_p, axis=-1) * vocab  # sum over vocab of -log p
    loss = confidence * nll + low * (smooth - nll) - normalizer
    zl = z_loss * jnp.square(log_z)
    return (jnp.sum((loss + zl) * weights), jnp.sum(zl * weights), jnp.sum(nll * weights))


class EncoderDecoderModel:
    """Loss, scoring and parameter initialisation for :class:`EncoderDecoder`."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.module = EncoderDecoder(cfg)

    def dummy_batch(self, batch: int, src_len: int, tgt_len: int) -> dict[str, Array]:
        shapes = {k: (batch, src_len if k.startswith("encoder") else tgt_len) for k in BATCH_KEYS}
        return {k: jnp.ones(s, jnp.int32) for k, s in shapes.items()}

    def init(self, rng: Array, batch: dict[str, Array]) -> PyTree:
        """Boxed parameters (``nn.LogicallyPartitioned`` leaves carry logical axes)."""
        return self.module.init(rng, batch, deterministic=True)["params"]

    def loss(self, params: PyTree, batch: dict[str, Array], *, dropout_rng: Array | None,
             label_smoothing: float = 0.0, z_loss: float = 0.0) -> tuple[Array, dict]:
        """Mean loss per target token and summed metrics."""
        deterministic = dropout_rng is None
        rngs = None if deterministic else {"dropout": dropout_rng}
        logits = self.module.apply({"params": params}, batch, deterministic=deterministic,
                                   rngs=rngs)
        weights = batch["decoder_loss_weights"].astype(jnp.float32)
        total, zl, nll = cross_entropy(logits, batch["decoder_target_tokens"], weights,
                                       label_smoothing, z_loss)
        ntok = jnp.maximum(jnp.sum(weights), 1.0)
        correct = jnp.sum((jnp.argmax(logits, -1) == batch["decoder_target_tokens"]) * weights)
        metrics = {"loss_sum": total, "nll_sum": nll, "z_loss_sum": zl, "tokens": jnp.sum(weights),
                   "correct": correct}
        return total / ntok, metrics

    def score(self, params: PyTree, batch: dict[str, Array]) -> Array:
        """Log-likelihood of each row's targets, [b]."""
        logits = self.module.apply({"params": params}, batch, deterministic=True)
        log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        tok = jnp.take_along_axis(log_p, batch["decoder_target_tokens"][..., None], -1)[..., 0]
        return jnp.sum(tok * batch["decoder_loss_weights"], axis=-1)
