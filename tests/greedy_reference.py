"""Greedy decoding without a KV cache, the reference cached decoding is checked against
(tests/test_decoding.py, tests/test_architectures.py; not collected by pytest)."""

from __future__ import annotations

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
