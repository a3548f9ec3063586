"""Int8 arithmetic for post-training quantization (``ModelConfig.quant``).

Symmetric round-to-nearest absmax quantization to 127 levels each side: ``x ~ q * s``
with ``q = round(x / s)`` in [-127, 127] and ``s = max|x| / 127`` over the reduced axes.
Weights are quantized once, offline (:mod:`jaxmt.compress.quantize`), with one float32
scale per output channel; under ``w8a8`` activations are quantized per token (per row
of the contracted input) on the fly, and the dot runs int8 x int8 -> int32.

Pure array code with no parameters: the layers create the int8 weights and their scales
and call :func:`scaled_einsum` / :func:`w8a8_einsum` through
:func:`jaxmt.modeling.layers.dense`.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array
LEVELS = 127
SCALE_SUFFIX = "_scale"  # a quantized weight `w` keeps its name; its scale is `w_scale`


def absmax_int8(x: Array, reduce_axes: Sequence[int], keepdims: bool = False
                ) -> tuple[Array, Array]:
    """``x`` as int8 values and float32 scales over the axes not in ``reduce_axes``.

    Returns:
      ``(q, scale)``: ``q`` int8 of ``x``'s shape, ``scale`` float32 with the reduced
      axes dropped (or kept as size 1 with ``keepdims``), so ``x ~ q * scale``. An
      all-zero slice gets scale 1 (its values stay 0).
    """
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=tuple(reduce_axes), keepdims=True)
    scale = jnp.where(amax > 0, amax / LEVELS, 1.0)
    q = jnp.clip(jnp.round(xf / scale), -LEVELS, LEVELS).astype(jnp.int8)
    return q, scale if keepdims else jnp.squeeze(scale, tuple(reduce_axes))


def _split(eq: str) -> tuple[str, str, str]:
    ins, out = eq.replace(" ", "").split("->")
    x, w = ins.split(",")
    return x, w, out


def _along(s: Array, letters: str, out: str) -> Array:
    """``s`` (dims named by ``letters``, all of them in ``out``) laid out to broadcast
    against an array with dims ``out`` (size 1 where ``s`` has no dim)."""
    order = [c for c in out if c in letters]
    s = jnp.transpose(s, [letters.index(c) for c in order])
    return s.reshape([s.shape[order.index(c)] if c in letters else 1 for c in out])


def scale_letters(eq: str) -> str:
    """The weight's output dims of a projection ``x,w->out``: those ``x`` lacks, in the
    weight's order; they index its per-channel scale (e.g. ``bte,ehd->bthd``: ``hd``)."""
    x, w, out = _split(eq)
    free = "".join(c for c in w if c not in x)
    if any(c in x and c in out for c in w):  # a batch dim shared by x and w
        raise ValueError(f"{eq}: not a projection (the weight has batch dims)")
    return free


def scaled_einsum(eq: str, y: Array, scale: Array) -> Array:
    """``y`` (the float32 result of ``eq`` with the int8 weight) times the weight's
    per-output-channel ``scale``: exact rescaling, since no output channel mixes
    two scales."""
    return y * _along(scale, scale_letters(eq), _split(eq)[2])


def w8a8_einsum(eq: str, x: Array, q: Array, scale: Array) -> Array:
    """``einsum(eq, x, q * scale)`` in float32, with ``x`` quantized per token.

    ``x`` gets one scale per row of its contracted dims (one per token for a projection
    ``bte,e...``); the int8 x int8 dot accumulates exactly in int32 (up to ~130k terms
    of 127 * 127), then both scales are applied to the float32 result.
    """
    xs, _, out = _split(eq)
    w_free = scale_letters(eq)
    reduce = [i for i, c in enumerate(xs) if c not in out]  # x's contracted dims
    qx, sx = absmax_int8(x, reduce)  # sx: x's free dims, in x's order
    y = jnp.einsum(eq, qx, q, preferred_element_type=jnp.int32).astype(jnp.float32)
    x_free = "".join(c for c in xs if c in out)
    return y * _along(sx, x_free, out) * _along(scale, w_free, out)
