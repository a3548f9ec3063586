"""Parameter-efficient fine-tuning: language adapters and LoRA.

- Adapters (Bapna & Firat 2019): after every encoder and decoder layer, a residual
  bottleneck ``x + up(relu(down(layernorm(x))))``, one per routing key of
  :class:`~jaxmt.config.AdapterConfig`, chosen per token by the batch's routing ids
  (``encoder_lang_ids`` / ``decoder_lang_ids``, :data:`jaxmt.data.packing.LANG_KEYS`).
- LoRA (Hu et al. 2021): the low-rank update ``scale * (x A) B`` added to the output of
  the projections :class:`~jaxmt.config.LoraConfig` targets. The update itself is
  :func:`jaxmt.modeling.layers.lora` (the attention and MLP layers apply it, and layers
  cannot import this module, which builds on them); :func:`merge_lora` folds it into
  the weights for inference.

:func:`is_added_param` tells these parameters from the base model's, so a fine-tuning
run can freeze the base.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmt.config import LoraConfig, ModelConfig
from jaxmt.modeling.layers import constrain, dtype_of, mixed_einsum, normal, param
from jaxmt.sharding import axes

Array = jax.Array
PyTree = Any

LORA_A, LORA_B = "_lora_a", "_lora_b"  # suffixes of a LoRA pair's names, after the weight's


def is_added_param(path: str) -> bool:
    """Whether the parameter at ``path`` ("decoder/layers_0/adapter/up") belongs to an
    adapter or a LoRA pair rather than to the base model."""
    parts = path.split("/")
    return "adapter" in parts or parts[-1].endswith((LORA_A, LORA_B))


def token_ids(ids: Array | None, rows: int, length: int, key: str,
              groups: bool = False) -> Array:
    """Routing ids [rows, length] int32 from per-token ids [rows, length] or per-row ids
    [rows] (the same id for every token of a row).

    Args:
      ids: the routing ids: indices into ``AdapterConfig.langs``, -1 for no adapter.
      rows, length: the activations' batch and length.
      key: the batch key the ids come from, for the error messages.
      groups: also take [rows / r] ids, one per group of r adjacent rows (a decode step's
        beams or samples of one source).

    Raises:
      ValueError: ``ids`` is None (the model has adapters) or has another shape.
    """
    if ids is None:
        raise ValueError(f"ModelConfig.adapter.size > 0: the adapters route each token by "
                         f"'{key}' (an index into AdapterConfig.langs per row or token, -1 "
                         f"for none), which is missing; add it to the batch or pass lang_ids")
    ids = jnp.asarray(ids, jnp.int32)
    n = ids.shape[0] if ids.ndim else 0
    if ids.ndim == 2 and ids.shape == (rows, length):
        return ids
    if ids.ndim == 1 and n and (n == rows or (groups and rows % n == 0)):
        return jnp.broadcast_to(jnp.repeat(ids, rows // n)[:, None], (rows, length))
    want = f"[{rows}] or [{rows}, {length}]" + (" or one per group of rows" if groups else "")
    raise ValueError(f"'{key}': routing ids must be {want}, got shape {tuple(ids.shape)}")


class Adapter(nn.Module):
    """``L`` residual bottleneck adapters; each token goes through the one its id names.

    The projections are computed densely over all ``L`` routing keys and the token's
    own is selected with a one-hot, so an adapter costs ``L`` times one adapter: fine for
    a handful of languages, not for hundreds. A token with id -1 (or any id outside
    ``[0, L)``) comes out as its input exactly. ``up`` starts at zero, so a new adapter
    is the identity.

    Attributes:
      num_langs: L, the routing keys.
      size: the bottleneck width m.
      epsilon: the LayerNorm's epsilon (statistics in float32).
    """

    num_langs: int
    size: int
    epsilon: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: Array, lang_ids: Array) -> Array:
        """``x`` [b, t, e] with each token's adapter added; ``lang_ids`` [b, t] int."""
        dt, pdt = dtype_of(self.dtype), dtype_of(self.param_dtype)
        n, e, m = self.num_langs, x.shape[-1], self.size
        ones, zeros = nn.initializers.ones, nn.initializers.zeros
        le, lm = (axes.ADAPTER_LANGS, axes.EMBED), (axes.ADAPTER_LANGS, axes.ADAPTER_MLP)
        scale = param(self, "scale", ones, (n, e), le, pdt)
        bias = param(self, "bias", zeros, (n, e), le, pdt)
        down = param(self, "down", normal(e ** -0.5), (n, e, m),
                     (axes.ADAPTER_LANGS, axes.EMBED, axes.ADAPTER_MLP), pdt)
        down_bias = param(self, "down_bias", zeros, (n, m), lm, pdt)
        up = param(self, "up", zeros, (n, m, e), (axes.ADAPTER_LANGS, axes.ADAPTER_MLP, axes.EMBED),
                   pdt)
        up_bias = param(self, "up_bias", zeros, (n, e), le, pdt)

        on = (lang_ids >= 0) & (lang_ids < n)  # [b, t]
        route = jax.nn.one_hot(lang_ids, n, dtype=jnp.float32)  # [b, t, L]; zeros off [0, L)
        idx = jnp.clip(lang_ids, 0, n - 1)  # per-token vectors by gather: exact, no matmul
        pick = lambda p: jnp.take(p, idx, axis=0).astype(jnp.float32)  # noqa: E731 [b, t, e]
        xf = x.astype(jnp.float32)
        xf = xf - jnp.mean(xf, axis=-1, keepdims=True)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.epsilon)
        y = y * pick(scale) + pick(bias)  # [b, t, e] float32
        h = mixed_einsum("bte,lem->btlm", y, down, dt)  # [b, t, L, m] float32
        h = nn.relu(h + down_bias.astype(jnp.float32)) * route[..., None]  # own key only
        out = mixed_einsum("btlm,lme->bte", h, up, dt) + pick(up_bias)  # [b, t, e] float32
        # Selected, not just weighted by the one-hot: a token without an adapter is x
        # bit for bit (x + 0 would turn -0.0 into 0.0).
        out = jnp.where(on[..., None], x + out.astype(dt), x)
        return constrain(out, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED))


def adapter(cfg: ModelConfig) -> Adapter:
    """The adapter a layer of ``cfg`` adds after itself (submodule ``adapter``)."""
    return Adapter(num_langs=len(cfg.adapter.langs), size=cfg.adapter.size,
                   epsilon=cfg.norm_epsilon, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                   name="adapter")


def _merged(w, a, b, scale: float):
    """``w + scale * a @ b`` in float32, cast to ``w``'s dtype. ``a`` [..., *in, r] and
    ``b`` [..., r, *out] may share leading axes with ``w`` [..., *in, *out] (scanned
    layers)."""
    lead = a.ndim + b.ndim - 2 - w.ndim
    if lead < 0 or a.shape[:lead] != b.shape[:lead] or a.shape[-1] != b.shape[lead]:
        raise ValueError(f"merge_lora: A {a.shape} and B {b.shape} do not factor W {w.shape}")
    r = a.shape[-1]
    a2 = a.reshape(a.shape[:lead] + (-1, r))  # [..., in, r]
    b2 = b.reshape(b.shape[:lead] + (r, -1))  # [..., r, out]
    if isinstance(w, jax.Array):
        delta = jnp.matmul(a2.astype(jnp.float32), b2.astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)  # [..., in, out]
        return (w.astype(jnp.float32) + scale * delta.reshape(w.shape)).astype(w.dtype)
    delta = np.matmul(np.asarray(a2, np.float32), np.asarray(b2, np.float32))  # [..., in, out]
    return (np.asarray(w, np.float32) + np.float32(scale) * delta.reshape(w.shape)).astype(
        w.dtype)


def merge_lora(params: PyTree, cfg: ModelConfig) -> tuple[PyTree, ModelConfig]:
    """Folds every LoRA pair into its weight: ``W + scale * A @ B``.

    Args:
      params: unboxed parameters with LoRA pairs (``{weight}_lora_a``/``_lora_b`` beside
        each adapted weight), unrolled (``layers_0``...) or scanned (``layers`` with a
        leading layer axis); host numpy or jax arrays.
      cfg: the model's config; ``cfg.lora.scale`` scales the updates.

    Returns:
      ``(params, cfg)``: the parameters without the pairs, each adapted weight replaced
      by its merged value (computed in float32, in the weight's dtype), and ``cfg`` with
      ``lora=LoraConfig()``: the model computes the same without the low-rank path.
    """
    scale = cfg.lora.scale

    def merge(node):
        if not isinstance(node, Mapping):
            return node
        out = {k: merge(v) for k, v in node.items() if not k.endswith((LORA_A, LORA_B))}
        for k in node:
            if k.endswith(LORA_A):
                w = k[:-len(LORA_A)]
                if w not in node or w + LORA_B not in node:
                    raise ValueError(f"merge_lora: {k} without {w} and {w + LORA_B} beside it")
                out[w] = _merged(node[w], node[k], node[w + LORA_B], scale)
        return out

    return merge(params), dataclasses.replace(cfg, lora=LoraConfig())
