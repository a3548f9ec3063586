"""Building blocks: embeddings, norms, MLP, relative position bias.

Every parameter is created with a logical axis name per dimension
(``nn.with_logical_partitioning``) and key activations are constrained with
``act_*`` names, so the rules in :mod:`jaxmt.sharding.axes` decide the sharding.
Matmuls take inputs in the compute dtype and accumulate in float32. The projection
weights are made by :func:`weight` and applied by :func:`dense`, which under
``ModelConfig.quant`` store them as int8 with float32 per-output-channel scales
(:mod:`jaxmt.modeling.quantized`).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxmt.config import LoraConfig
from jaxmt.kernels.common import RelPos, bias_of
from jaxmt.modeling import quantized
from jaxmt.sharding import axes

Array = jax.Array


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def normal(std: float) -> Callable:
    return nn.initializers.normal(stddev=std)


def param(mod: nn.Module, name: str, init: Callable, shape: tuple[int, ...],
          names: tuple[str, ...], dtype) -> Array:
    """Creates a parameter annotated with one logical axis name per dimension."""
    assert len(shape) == len(names), (name, shape, names)
    return mod.param(name, nn.with_logical_partitioning(init, names), shape, dtype)


def constrain(x: Array, names: tuple[str, ...]) -> Array:
    """Applies the logical activation sharding (a no-op outside a mesh)."""
    return nn.with_logical_constraint(x, names)


def _split_eq(eq: str) -> tuple[str, str, str]:
    ins, out = eq.replace(" ", "").split("->")
    a, b = ins.split(",")
    return a, b, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum_f32acc(eq: str, x: Array, w: Array) -> Array:
    return jnp.einsum(eq, x, w, preferred_element_type=jnp.float32)


def _einsum_fwd(eq, x, w):
    return _einsum_f32acc(eq, x, w), (x, w)


def _dot_f32(s1: str, x1: Array, s2: str, x2: Array, out: str) -> Array:
    """f32-accumulated einsum with the operands ordered so that each one's free
    indices appear in the output in operand order. The CPU backend fails at run time
    on bf16 dots that need the opposite order (e.g. `bqhd,bhqk->bkhd`, while
    `bhqk,bqhd->bkhd` runs; stack notes)."""
    def first_free(sa, sb):
        free = [out.index(c) for c in sa if c in out and c not in sb]
        return min(free) if free else -1
    if first_free(s1, s2) > first_free(s2, s1):
        s1, x1, s2, x2 = s2, x2, s1, x1
    return jnp.einsum(f"{s1},{s2}->{out}", x1, x2, preferred_element_type=jnp.float32)


def _einsum_bwd(eq, res, g):
    # Both backward dots take operands in the forward dtype and accumulate in f32.
    # Autodiff would emit mixed f32 x bf16 dots, which the CPU runs on its slow fp32 path.
    x, w = res
    a, b, out = _split_eq(eq)
    gc = g.astype(x.dtype)
    dx = _dot_f32(out, gc, b, w, a)
    dw = _dot_f32(out, gc, a, x, b)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_einsum_f32acc.defvjp(_einsum_fwd, _einsum_bwd)


def mixed_einsum(eq: str, x: Array, w: Array, dtype) -> Array:
    """Two-operand einsum: operands cast to ``dtype``, float32 accumulation, float32 result.

    Every index of an operand must appear in the output or the other operand (true
    for all dense and attention contractions here), so the backward is two einsums.
    On CPU only bf16 operands with an f32 accumulator reach the native bf16 kernels;
    bf16-out dots silently run in fp32 (see stack notes).

    The result is named ``dot`` for the remat policies: JAX's own ``dots_saveable``
    cannot see a dot inside ``jnp.einsum``'s jit within a custom_vjp.
    """
    return checkpoint_name(_einsum_f32acc(eq, x.astype(dtype), w.astype(dtype)), "dot")


class Weight(NamedTuple):
    """A projection weight as :func:`weight` made it: float ``value`` (``scale`` None),
    or under quantization int8 ``value`` with float32 ``scale`` over its output dims."""

    value: Array
    scale: Array | None
    quant: str  # one of config.QUANT_MODES

    @property
    def shape(self) -> tuple[int, ...]:
        return self.value.shape


def weight(mod: nn.Module, name: str, init: Callable, shape: tuple[int, ...],
           names: tuple[str, ...], out_axes: tuple[int, ...], quant: str, dtype) -> Weight:
    """A projection weight ``name`` of ``shape`` (logical axes ``names``, ``dtype``).

    With ``quant`` "int8" or "w8a8" (a quantized model, which only decodes) ``name`` is
    int8 instead and ``{name}_scale`` holds float32 scales over the dims ``out_axes``
    (the output channels, with their logical axes, so the sharding rules apply). They
    are created as zeros and ones: :func:`jaxmt.compress.quantize.quantize_params` fills
    them from a float model.
    """
    if quant == "none":
        return Weight(param(mod, name, init, shape, names, dtype), None, quant)
    q = param(mod, name, nn.initializers.zeros, shape, names, jnp.int8)
    scale = param(mod, name + quantized.SCALE_SUFFIX, nn.initializers.ones,
                  tuple(shape[i] for i in out_axes), tuple(names[i] for i in out_axes),
                  jnp.float32)
    return Weight(q, scale, quant)


def dense(eq: str, x: Array, w: Weight, dtype) -> Array:
    """The projection ``einsum(eq, x, w)`` in float32 (``eq``: input first, weight second).

    Float weights: :func:`mixed_einsum`. "int8": the int8 weight is cast to ``dtype``
    (exact: |q| <= 127), multiplied in ``dtype`` with float32 accumulation, and the
    result scaled per output channel. "w8a8": ``x`` is quantized per token too and the
    dot runs int8 x int8 -> int32 (:func:`quantized.w8a8_einsum`).
    """
    if w.scale is None:
        return mixed_einsum(eq, x, w.value, dtype)
    if w.quant == "w8a8":
        return quantized.w8a8_einsum(eq, x, w.value, w.scale)
    return quantized.scaled_einsum(eq, mixed_einsum(eq, x, w.value, dtype), w.scale)


def lora_on(cfg: LoraConfig, target: str) -> bool:
    """Whether LoRA adapts ``target`` (one of :data:`jaxmt.config.LORA_TARGETS`)."""
    return cfg.rank > 0 and target in cfg.targets


def lora(mod: nn.Module, name: str, x: Array, eqs: tuple[str, str], w_shape: tuple[int, ...],
         w_names: tuple[str, ...], n_in: int, cfg: LoraConfig, dtype, param_dtype) -> Array:
    """LoRA's update (Hu et al. 2021) of the projection ``x W``: ``scale * (x A) B``, float32.

    Creates ``{name}_lora_a`` A [*in, r] (normal, std fan_in ** -0.5) and ``{name}_lora_b``
    B [r, *out] (zeros, so the model starts as the base) beside the weight ``name`` W
    [*in, *out], whose first ``n_in`` dimensions are contracted with ``x``. Both matmuls
    take ``dtype`` operands and accumulate in float32, like W's.

    Args:
      eqs: the two einsums: ``x`` with A (to [..., r]), then that with B (to W's output
        layout), e.g. ``("bte,er->btr", "btr,rhd->bthd")``.
      w_names: W's logical axes; A and B take them with ``lora_rank`` added.
      cfg: the rank and scale (the caller checks that ``name`` is a target).
    """
    a_shape, b_shape = (*w_shape[:n_in], cfg.rank), (cfg.rank, *w_shape[n_in:])
    fan_in = math.prod(w_shape[:n_in])
    a = param(mod, f"{name}_lora_a", normal(fan_in ** -0.5), a_shape,
              (*w_names[:n_in], axes.LORA_RANK), param_dtype)
    b = param(mod, f"{name}_lora_b", nn.initializers.zeros, b_shape,
              (axes.LORA_RANK, *w_names[n_in:]), param_dtype)
    xa = mixed_einsum(eqs[0], x, a, dtype)  # [..., r] float32
    return cfg.scale * mixed_einsum(eqs[1], xa, b, dtype)  # W's output layout, float32


class Embed(nn.Module):
    """Token embedding table [vocab, embed]; quantized, one scale per vocabulary row,
    which serves both the lookup and the tied output layer."""

    num_embeddings: int
    features: int
    init_std: float = 1.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    quant: str = "none"

    def setup(self):
        self.embedding = weight(self, "embedding", normal(self.init_std),
                                (self.num_embeddings, self.features), (axes.VOCAB, axes.EMBED),
                                (0,), self.quant, dtype_of(self.param_dtype))

    def __call__(self, ids: Array) -> Array:
        w = self.embedding
        x = jnp.take(w.value, ids, axis=0)  # [b, l, e]
        if w.scale is not None:
            x = x.astype(jnp.float32) * jnp.take(w.scale, ids, axis=0)[..., None]
        x = x.astype(dtype_of(self.dtype))
        return constrain(x, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED))

    def attend(self, x: Array) -> Array:
        """Tied output layer: float32 logits [b, l, vocab] = x @ embedding^T."""
        logits = dense("ble,ve->blv", x, self.embedding, dtype_of(self.dtype))  # [b, l, v]
        return constrain(logits, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_VOCAB))


def sinusoidal_positions(positions: Array, dim: int) -> Array:
    """Fixed sin/cos position embeddings [..., dim] in float32.

    Layout of Marian / fairseq: the first half is sin, the second half cos, both at
    frequencies 10000 ** (-2i / dim), so imported Marian models need no permutation.
    """
    half = dim // 2
    inv_freq = 1.0 / (10000.0 ** (2.0 * jnp.arange(half, dtype=jnp.float32) / dim))  # [half]
    angle = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., half]
    return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)


class Norm(nn.Module):
    """RMSNorm (T5: scale only, no mean subtraction) or LayerNorm (scale and bias).

    Statistics are computed in float32 whatever the compute dtype.
    """

    kind: str = "rms"  # rms | layer
    epsilon: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        pdt = dtype_of(self.param_dtype)
        scale = param(self, "scale", nn.initializers.ones, (x.shape[-1],), (axes.EMBED,), pdt)
        xf = x.astype(jnp.float32)
        if self.kind == "layer":
            xf = xf - jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
        y = xf * jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)
        if self.kind == "layer":
            bias = param(self, "bias", nn.initializers.zeros, (x.shape[-1],), (axes.EMBED,), pdt)
            y = y + bias.astype(jnp.float32)
        return y.astype(dtype_of(self.dtype))


# Keys are config.ACTIVATIONS. "gelu" is the tanh approximation (T5.1.1, HF gelu_new).
_ACTIVATIONS = {"gelu": lambda x: nn.gelu(x, approximate=True),
                "gelu_exact": lambda x: nn.gelu(x, approximate=False), "relu": nn.relu,
                "silu": nn.silu, "linear": lambda x: x}


def bias_param(mod: nn.Module, name: str, shape: tuple[int, ...], names: tuple[str, ...],
               dtype) -> Array:
    return param(mod, name, nn.initializers.zeros, shape, names, dtype)


class MlpBlock(nn.Module):
    """Feed-forward block: prod_i act_i(x W_i + b_i) then W_o (+ b_o).

    One activation is the classic MLP (ReLU in T5, swish in Marian); two make it
    gated (gated-GELU in T5.1.1). Biases only with ``use_bias``. ``lora`` adds LoRA
    updates to each W_i (target ``mlp_in``) and to W_o (``mlp_out``); ``quant`` makes
    the W int8 (:func:`weight`).
    """

    emb_dim: int
    mlp_dim: int
    activations: tuple[str, ...] = ("gelu", "linear")
    use_bias: bool = False
    dropout_rate: float = 0.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    lora: LoraConfig = LoraConfig()
    quant: str = "none"

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        dt, pdt = dtype_of(self.dtype), dtype_of(self.param_dtype)
        h = None
        for i, act in enumerate(self.activations):
            if act not in _ACTIVATIONS:
                raise ValueError(f"ModelConfig.mlp_activations: unknown activation {act!r}")
            w = weight(self, f"wi_{i}", normal(self.emb_dim ** -0.5),
                       (self.emb_dim, self.mlp_dim), (axes.EMBED, axes.MLP), (1,), self.quant,
                       pdt)
            y = dense("ble,em->blm", x, w, dt)  # [b, l, mlp] float32
            if lora_on(self.lora, "mlp_in"):
                y = y + lora(self, f"wi_{i}", x, ("ble,er->blr", "blr,rm->blm"),
                             w.shape, (axes.EMBED, axes.MLP), 1, self.lora, dt, pdt)  # [b, l, m]
            if self.use_bias:
                y = y + bias_param(self, f"wi_{i}_bias", (self.mlp_dim,), (axes.MLP,), pdt)
            # The activation runs in the compute dtype: what the backward keeps of the
            # widest activation is then bf16 under the bf16 policy, not float32.
            y = _ACTIVATIONS[act](y.astype(dt))
            h = y if h is None else h * y
        h = constrain(h.astype(dt), (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_MLP))
        h = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(h, deterministic=deterministic)
        wo = weight(self, "wo", normal(self.mlp_dim ** -0.5), (self.mlp_dim, self.emb_dim),
                    (axes.MLP, axes.EMBED), (1,), self.quant, pdt)
        out = dense("blm,me->ble", h, wo, dt)  # [b, l, e] float32
        if lora_on(self.lora, "mlp_out"):
            out = out + lora(self, "wo", h, ("blm,mr->blr", "blr,re->ble"), wo.shape,
                             (axes.MLP, axes.EMBED), 1, self.lora, dt, pdt)  # [b, l, e]
        if self.use_bias:
            out = out + bias_param(self, "wo_bias", (self.emb_dim,), (axes.EMBED,), pdt)
        out = out.astype(dt)
        return constrain(out, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED))


class RelativePositionBias(nn.Module):
    """Per-head learned bias from a [relpos_buckets, heads] table, shared across layers."""

    num_buckets: int
    max_distance: int
    num_heads: int
    bidirectional: bool
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, q_pos: Array | None = None, k_pos: Array | None = None) -> Array:
        """Returns bias [1, heads, q, k] in float32 for position vectors q_pos [q], k_pos [k];
        without positions, the float32 table [buckets, heads] itself (for the kernels
        that look the bias up per tile)."""
        table = param(self, "rel_embedding", normal(1.0),
                      (self.num_buckets, self.num_heads), (axes.RELPOS, axes.HEADS),
                      dtype_of(self.param_dtype))
        if q_pos is None:
            return table.astype(jnp.float32)
        rel = k_pos[None, :] - q_pos[:, None]  # [q, k]
        relpos = RelPos(self.num_buckets, self.max_distance, self.bidirectional)
        bias = bias_of(table.astype(jnp.float32), relpos, rel)  # [q, k, h]
        return jnp.transpose(bias, (2, 0, 1))[None]  # [1, h, q, k]
