"""Dynamic loss scaling for float16 training.

float16 has 5 exponent bits: gradients below about 6e-8 flush to zero and values
above 65504 become inf. Multiplying the loss by a large scale before
differentiating lifts small gradients into range; dividing the gradients by the
same scale afterwards restores their value. The scale adapts online with the usual
defaults (Flax's ``DynamicScale``, PyTorch's ``GradScaler``): halve it and skip the
update when any gradient is not finite, double it after ``growth_interval``
consecutive finite steps, never below 1.

bfloat16 has float32's exponent range and needs none of this, so only the "fp16"
precision policy uses it (see :data:`jaxmt.config.PRECISIONS`).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any

GROWTH_FACTOR = 2.0
BACKOFF_FACTOR = 0.5
MIN_SCALE = 1.0


@flax.struct.dataclass
class LossScaleState:
    """The dynamic loss scale, a pair of replicated scalars.

    Attributes:
      scale: float32, the factor the loss is multiplied by before differentiation.
      good_steps: int32, consecutive finite steps since the scale last changed.
    """

    scale: jax.Array
    good_steps: jax.Array


def init_loss_scale(scale: float, good_steps: int = 0) -> LossScaleState:
    """A loss-scale state with the given scale and good-step count."""
    return LossScaleState(scale=jnp.asarray(scale, jnp.float32),
                          good_steps=jnp.asarray(good_steps, jnp.int32))


def all_finite(tree: PyTree) -> jax.Array:
    """True (a scalar bool) when every element of every leaf is finite.

    Judged from the global L2 norm (in float32), which is inf or NaN whenever any
    element is; it is also inf when finite values square past float32's range (norm
    above about 1.8e19), a step worth skipping too. The train step computes this same
    norm for clipping and metrics, and XLA computes it once. An ``isfinite`` reduction
    per leaf instead made XLA copy a chain over all leaves into every parameter's
    select: a 6+6-layer step then compiled in 35 s on CPU, against 12 s this way and
    10-11 s without loss scaling.
    """
    return jnp.isfinite(optax.global_norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree)))


def scaled_value_and_grad(fun: Callable[[PyTree], tuple[jax.Array, Any]], params: PyTree,
                          ls: LossScaleState) -> tuple[tuple[jax.Array, Any], PyTree, jax.Array]:
    """``jax.value_and_grad(fun, has_aux=True)`` with the loss scaled by ``ls.scale``.

    Args:
      fun: ``params -> (scalar float32 loss, aux)``.
      params: the differentiation argument.
      ls: the current loss scale.

    Returns:
      ``((loss, aux), grads, finite)``: the unscaled loss, gradients divided back by
      the scale, and whether all of them are finite.
    """
    def scaled(p):
        loss, aux = fun(p)
        return loss * ls.scale, (loss, aux)

    (_, (loss, aux)), grads = jax.value_and_grad(scaled, has_aux=True)(params)
    # Multiplying by the reciprocal is exact for power-of-two scales (the default's
    # doublings and halvings all are).
    inv = 1.0 / ls.scale
    grads = jax.tree.map(lambda g: (g * inv).astype(g.dtype), grads)
    return (loss, aux), grads, all_finite(grads)


def update_loss_scale(ls: LossScaleState, finite: jax.Array, growth_interval: int
                      ) -> LossScaleState:
    """The next scale: halve on overflow (not below 1), double after enough good steps.

    Args:
      ls: the scale used for this step.
      finite: whether this step's gradients were all finite.
      growth_interval: consecutive finite steps after which the scale doubles.
    """
    good = ls.good_steps + 1
    grow = good >= growth_interval
    grown = ls.scale * GROWTH_FACTOR
    # Never grow into inf: an infinite scale would overflow every later step too.
    grown = jnp.where(jnp.isfinite(grown), grown, ls.scale)
    on_finite = LossScaleState(scale=jnp.where(grow, grown, ls.scale),
                               good_steps=jnp.where(grow, 0, good).astype(jnp.int32))
    on_overflow = LossScaleState(scale=jnp.maximum(ls.scale * BACKOFF_FACTOR, MIN_SCALE),
                                 good_steps=jnp.zeros_like(ls.good_steps))
    return select_tree(finite, on_finite, on_overflow)


def select_tree(pred: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
    """Leaf-wise ``jnp.where(pred, a, b)`` over two trees of the same structure."""
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def to_json(ls: LossScaleState) -> dict:
    """Plain numbers for a checkpoint's JSON metadata (exact: the scale is a power of 2,
    and JSON floats round-trip float32 values).

    Reads this process's copy, so it works for replicated arrays on any host.
    """
    def host(x):
        return np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x)
    return {"scale": float(host(ls.scale)), "good_steps": int(host(ls.good_steps))}


def from_json(d: dict) -> tuple[float, int]:
    """Inverse of :func:`to_json`: ``(scale, good_steps)``."""
    return float(d["scale"]), int(d["good_steps"])
