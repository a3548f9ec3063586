"""Greedy decoding without a KV cache, the reference cached decoding is checked against
(tests/test_decoding.py, tests/test_architectures.py), and the tiny random model the
decoding tests share (not collected by pytest)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmt.modeling.decoding import EOS_ID


def full_recompute_greedy(model, params, enc: np.ndarray, steps: int) -> np.ndarray:
    """``[b, steps]`` greedy tokens, rerunning the teacher-forced network at every step;
    0 after a row's EOS.

    The prefix is padded to ``steps`` (one shape, one compile): the decoder is causal,
    so position i's logits ignore the not-yet-decoded zeros after it.
    """
    b = enc.shape[0]
    out = np.zeros((b, steps), np.int32)
    enc_seg = (enc > 0).astype(np.int32)
    finished = np.zeros(b, bool)
    logits_of = jax.jit(lambda dec_in: model.logits(params, dict(
        encoder_input_tokens=enc, encoder_segment_ids=enc_seg, decoder_input_tokens=dec_in,
        decoder_segment_ids=jnp.ones_like(dec_in))))
    for i in range(steps):
        dec_in = np.concatenate([np.zeros((b, 1), np.int32), out[:, :steps - 1]], 1)
        nxt = np.asarray(jnp.argmax(logits_of(dec_in)[:, i], -1))
        out[:, i] = np.where(finished, 0, nxt)
        finished |= nxt == EOS_ID
    return out


def tiny_decode_setup(cfg, rows: int):
    """``(model, params, enc)``: ``cfg``'s model with seeded random parameters and
    ``rows`` random 9-token sources ending in EOS, row 1 a shorter, padded one."""
    from jaxmt.modeling.model import EncoderDecoderModel

    model = EncoderDecoderModel(cfg)
    params = nn.unbox(model.init(jax.random.PRNGKey(7), model.dummy_batch(1, 8, 8)))
    rng = np.random.default_rng(0)
    enc = rng.integers(3, cfg.vocab_size, (rows, 9)).astype(np.int32)
    enc[:, -1] = EOS_ID
    enc[1, 5:] = 0  # a shorter source
    enc[1, 4] = EOS_ID
    return model, params, enc
