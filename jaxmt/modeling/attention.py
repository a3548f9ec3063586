"""Multi-head attention with T5 conventions, an autoregressive KV cache, and a choice
of attention implementation.

T5 folds the 1/sqrt(head_dim) scale into the query initialisation, so scores are
not scaled here (this keeps imported T5 weights exact; Marian's scale is folded into
its query weights at import). Scores, masking and the softmax run in float32. The
output is named ``attention_out`` for the ``save_attention_out`` remat policy.

The layer takes either a dense additive bias [b, 1|h, q, k] (the ``xla`` reference
path, and every decode step) or a :class:`Masking`: segment ids plus the relative
position table, from which :func:`attend` runs one of the memory-efficient or
approximate implementations in :mod:`jaxmt.kernels` without ever building [q, k].
A decode step of a ``performer`` decoder gets its dense bias wrapped in a
:class:`PerformerStep`, so it attends over the cache with FAVOR+ as training did.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from jaxmt.config import AttentionConfig, LoraConfig
from jaxmt.kernels.bigbird_attention import bigbird_attention
from jaxmt.kernels.blockwise_attention import blockwise_attention
from jaxmt.kernels.common import BlockSizes, RelPos, bias_of, target_platform
from jaxmt.kernels.dot_product import dot_product_attention
from jaxmt.kernels.flash_attention import flash_attention
from jaxmt.kernels.local_attention import local_attention
from jaxmt.kernels.performer_attention import performer_attention, performer_cached
from jaxmt.modeling.layers import (Weight, bias_param, constrain, dense, dtype_of, lora, lora_on,
                                   mixed_einsum, normal, weight)
from jaxmt.sharding import axes

Array = jax.Array
NEG_INF = -1e10


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def softmax_to(scores: Array, dtype) -> Array:
    """Float32 softmax over the last axis, returned in ``dtype``.

    The backward keeps only the ``dtype`` probabilities (which the next matmul keeps
    anyway) and computes the gradient in float32 from them. Autodiff would also keep
    the float32 probabilities: under bf16 that made attention's saved activations
    larger than under fp32.
    """
    return jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(dtype)


def _softmax_fwd(scores, dtype):
    probs = softmax_to(scores, dtype)
    return probs, probs


def _softmax_bwd(dtype, probs, g):
    p, g = probs.astype(jnp.float32), g.astype(jnp.float32)
    return (p * (g - jnp.sum(g * p, axis=-1, keepdims=True)),)


softmax_to.defvjp(_softmax_fwd, _softmax_bwd)


def mask_to_bias(mask: Array) -> Array:
    """Boolean mask [b, 1|h, q, k] -> additive float32 bias."""
    return jnp.where(mask, 0.0, NEG_INF).astype(jnp.float32)


@flax.struct.dataclass
class Masking:
    """What the non-``xla`` implementations take instead of a dense bias.

    Arrays are pytree leaves (so ``nn.scan`` broadcasts them and remat traces them);
    the implementation choice and options are static.
    """

    q_segment_ids: Array  # [b, q] int, 0 = padding
    kv_segment_ids: Array  # [b, k] int
    bias_table: Array | None  # [relpos_buckets, heads] float32 relative position table
    impl: str = flax.struct.field(pytree_node=False, default="flash")
    causal: bool = flax.struct.field(pytree_node=False, default=False)
    relpos: RelPos | None = flax.struct.field(pytree_node=False, default=None)
    options: AttentionConfig = flax.struct.field(pytree_node=False, default=AttentionConfig())


def dense_bias(m: Masking, q_len: int, k_len: int) -> Array:
    """The [b, h|1, q, k] additive bias ``m`` stands for (what ``xla`` adds to scores)."""
    q_seg, k_seg = m.q_segment_ids, m.kv_segment_ids
    mask = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] > 0)  # [b, q, k]
    if m.causal:
        mask = mask & (jnp.arange(k_len)[None, :] <= jnp.arange(q_len)[:, None])[None]
    bias = mask_to_bias(mask[:, None])  # [b, 1, q, k]
    if m.bias_table is not None:
        rel = jnp.arange(k_len)[None, :] - jnp.arange(q_len)[:, None]  # [q, k]
        per_pair = bias_of(m.bias_table, m.relpos, rel)  # [q, k, h]
        bias = bias + jnp.transpose(per_pair, (2, 0, 1))[None]  # [1, h, q, k]
    return bias


def dense_attention(q: Array, k: Array, v: Array, bias: Array | None, dt,
                    dropout=None) -> Array:
    """The ``xla`` path: scores [b, h, q, k] materialised, float32 softmax, output [b, q, h, d]."""
    scores = mixed_einsum("bqhd,bkhd->bhqk", q, k, dt)  # [b, h, q, k] float32
    if bias is not None:
        scores = scores + bias
    probs = softmax_to(scores, dt)  # [b, h, q, k]
    if dropout is not None:
        probs = dropout(probs)
    return mixed_einsum("bhqk,bkhd->bqhd", probs, v, dt)  # [b, q, h, d]


@flax.struct.dataclass
class PerformerStep:
    """A decode step's self-attention input when the decoder trained with ``performer``:
    the dense bias over the cache plus the FAVOR+ options (static)."""

    bias: Array  # [b|1, h|1, 1, T] additive float32: window/mask and relative position bias
    num_features: int = flax.struct.field(pytree_node=False, default=256)
    seed: int = flax.struct.field(pytree_node=False, default=0)


@flax.struct.dataclass
class SharedBeamStep:
    """A decode step's self-attention input when the beams of a source share one cache.

    Rows come in groups of ``group`` adjacent beams. Their cache is one [g, h, T * group, d]
    block per source: each beam writes its token's keys/values into its own slot, and
    reads its history through the mask, which lets query beam ``j`` see slot ``i`` at
    position ``s`` where its ancestor at ``s`` wrote. Beam search then reorders a small
    table of slots instead of moving the cache after the beams every step.
    """

    bias: Array  # [g, h|1, group, T * group] additive float32: slots, window, position bias
    group: int = flax.struct.field(pytree_node=False, default=1)


def _splits(mesh, names, size: int) -> bool:
    """Whether ``size`` divides evenly over the mesh axes ``names`` (None: not split)."""
    names = () if names is None else (names,) if isinstance(names, str) else tuple(names)
    n = 1
    for name in names:
        n *= mesh.shape[name]
    return size % n == 0


def _flash_sharded(q, k, v, m: Masking, block: BlockSizes | None) -> Array:
    """The Pallas kernel per device: pallas_call does not partition itself, so under a
    mesh it runs in a shard_map over the batch and head shards (length is never split)."""
    interpret = m.options.flash_interpret
    run = functools.partial(flash_attention, relpos=m.relpos, causal=m.causal, block_sizes=block,
                            backend="gpu" if interpret else None, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return run(q, k, v, bias_table=m.bias_table, q_segment_ids=m.q_segment_ids,
                   kv_segment_ids=m.kv_segment_ids)
    batch, _, heads, _ = nn.logical_to_mesh_axes(
        (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_HEADS, axes.ACT_KV))
    if not (_splits(mesh, batch, q.shape[0]) and _splits(mesh, heads, q.shape[2])):
        # A shape the mesh cannot split, as in the one-row batch the Trainer's init traces
        # (never run): the kernel over whole arrays, which XLA would gather for.
        return run(q, k, v, bias_table=m.bias_table, q_segment_ids=m.q_segment_ids,
                   kv_segment_ids=m.kv_segment_ids)
    qkv, seg = P(batch, None, heads, None), P(batch, None)
    table = None if m.bias_table is None else P(None, heads)
    body = lambda q, k, v, t, qs, ks: run(q, k, v, bias_table=t, q_segment_ids=qs,  # noqa: E731
                                          kv_segment_ids=ks)
    return jax.shard_map(body, mesh=mesh, in_specs=(qkv, qkv, qkv, table, seg, seg),
                         out_specs=qkv, check_vma=False)(
        q, k, v, m.bias_table, m.q_segment_ids, m.kv_segment_ids)


def runs_as(impl: str, options: AttentionConfig, platform: str | None = None) -> str:
    """The implementation :func:`attend` runs for ``impl`` on ``platform`` (default: the
    platform traced for, :func:`jaxmt.kernels.common.target_platform`): Pallas compiles
    only for GPU/TPU, so elsewhere ``flash`` runs as ``blockwise`` (same maths, same
    memory order) unless ``options.flash_interpret``."""
    platform = platform or target_platform()
    if impl == "flash" and platform not in ("gpu", "tpu") and not options.flash_interpret:
        return "blockwise"
    return impl


def attend(q: Array, k: Array, v: Array, m: Masking) -> Array:
    """Attention output [b, q, h, d] of q [b, q, h, d] over k, v [b, k, h, d] with ``m.impl``.

    Scores are unscaled (T5). Query rows that see no key (padding) come out as zeros.
    """
    o = m.options
    common = dict(bias_table=m.bias_table, relpos=m.relpos, q_segment_ids=m.q_segment_ids,
                  kv_segment_ids=m.kv_segment_ids)
    impl = runs_as(m.impl, o)
    block = BlockSizes(o.block_size, o.block_size) if o.block_size else None  # 0: per backend
    if impl == "xla":
        bias = dense_bias(m, q.shape[1], k.shape[1])  # [b, h|1, q, k]
        return dense_attention(q, k, v, bias, q.dtype).astype(q.dtype)
    if impl == "flash":
        return _flash_sharded(q, k, v, m, block)  # None: the kernel's per-backend tiles
    if impl == "blockwise":
        return blockwise_attention(q, k, v, **common, causal=m.causal, block_sizes=block)
    if impl == "dot_product":  # cuDNN where it can take the call, else XLA (logged)
        bias = dense_bias(m, q.shape[1], k.shape[1])  # [b, h|1, q, k]
        out = dot_product_attention(q, k, v, bias)
        seen = (m.q_segment_ids > 0)[:, :, None, None]  # padding rows -> 0, as the others
        return jnp.where(seen, out, 0).astype(q.dtype)
    if impl == "local":
        return local_attention(q, k, v, **common, causal=m.causal, window=o.window,
                               global_tokens=o.global_tokens)
    if impl == "bigbird":
        return bigbird_attention(q, k, v, **common, block_size=o.bigbird_block,
                                 global_blocks=o.bigbird_global_blocks,
                                 random_blocks=o.bigbird_random_blocks, seed=o.seed)
    if impl == "performer":
        return performer_attention(q, k, v, **common, causal=m.causal,
                                   num_features=o.performer_features, seed=o.seed)
    raise ValueError(f"attend: unknown implementation {impl!r}")


class MultiHeadAttention(nn.Module):
    """Attention over ``kv_input`` from ``q_input``; with ``decode=True`` a one-token step.

    A decode step keeps keys and values head-major, [b, h, T, d], the layout of the
    batched score and context dots, so no step transposes them. Self-attention
    (``cache=True``) keeps ``cached_key``/``cached_value`` [b, h, max_len, d] and
    ``cache_index`` in the ``cache`` collection; the first call (during ``init`` with
    the full-length target) only sizes the cache. Cross-attention (``cache=False``)
    projects ``kv_input`` straight into that layout every step: the projection does
    not depend on the step, so XLA hoists it out of the decode loop. Its ``kv_input``
    may have one row per group of ``r`` adjacent query rows (the beams or samples of a
    source row): keys and values are then computed and read once per group.

    ``lora`` adds LoRA updates to the projections it targets (``query``, ``key``,
    ``value``, ``out``), in decode steps too. ``quant`` makes the four projection
    weights int8 with per-output-channel scales (:func:`~jaxmt.modeling.layers.weight`).
    """

    num_heads: int
    head_dim: int
    emb_dim: int
    use_bias: bool = False
    dropout_rate: float = 0.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    lora: LoraConfig = LoraConfig()
    quant: str = "none"

    @nn.compact
    def __call__(self, q_input: Array, kv_input: Array, bias: Array | None,
                 deterministic: bool, decode: bool = False, cache: bool = True) -> Array:
        """Args:
            q_input: [b, q, e] queries.
            kv_input: [b, k, e] keys/values source; in a cross-attention decode step
              [b / r, k, e] for groups of r adjacent query rows.
            bias: additive float32 bias broadcastable to [b, h, q, k] (mask and position
              bias together), or None. In a self-attention decode step it must cover the
              whole cache length k = max_len (positions past the current index are
              masked here) and a :class:`PerformerStep` attends over the cache with
              FAVOR+; in a cross-attention step its batch is kv_input's.
              A :class:`Masking` instead runs its implementation (not in decode mode).
            deterministic: disables dropout (decode steps never drop).
            decode: one-token autoregressive step.
            cache: with ``decode``, append this step's keys/values to the cache and attend
              over it (self-attention); False attends over ``kv_input`` (cross-attention).
        """
        dt, pdt = dtype_of(self.dtype), dtype_of(self.param_dtype)
        e, h, d = self.emb_dim, self.num_heads, self.head_dim
        ehd, qt = (axes.EMBED, axes.HEADS, axes.KV), self.quant
        wq = weight(self, "query", normal((e * d) ** -0.5), (e, h, d), ehd, (1, 2), qt, pdt)
        wk = weight(self, "key", normal(e ** -0.5), (e, h, d), ehd, (1, 2), qt, pdt)
        wv = weight(self, "value", normal(e ** -0.5), (e, h, d), ehd, (1, 2), qt, pdt)
        wo = weight(self, "out", normal((h * d) ** -0.5), (h, d, e),
                    (axes.HEADS, axes.KV, axes.EMBED), (2,), qt, pdt)

        def project(x, w, name, head_major=False):
            """[b, t, e] -> [b, t, h, d], or head-major [b, h, t, d], in the compute dtype."""
            if head_major:
                y = dense("bte,ehd->bhtd", x, w, dt)  # [b, h, t, d] float32
                names = (axes.ACT_BATCH, axes.ACT_HEADS, axes.ACT_KV_LENGTH, axes.ACT_KV)
            else:
                y = dense("bte,ehd->bthd", x, w, dt)  # [b, t, h, d] float32
                names = (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_HEADS, axes.ACT_KV)
            if lora_on(self.lora, name):
                eqs = ("bte,er->btr", "btr,rhd->bhtd" if head_major else "btr,rhd->bthd")
                y = y + lora(self, name, x, eqs, w.shape, (axes.EMBED, axes.HEADS, axes.KV), 1,
                             self.lora, dt, pdt)  # y's layout, float32
            if self.use_bias:
                b = bias_param(self, f"{name}_bias", (h, d), (axes.HEADS, axes.KV), pdt)
                y = y + (b[:, None] if head_major else b)
            return constrain(y.astype(dt), names)

        if decode:
            if isinstance(bias, Masking):
                raise ValueError("decode steps take a dense bias, not a Masking")
            ctx = self._decode_step(q_input, kv_input, bias, cache, project, wq, wk, wv)
            if ctx is None:  # init pass: the cache is sized, the output is never read
                return jnp.zeros(q_input.shape, dt)
        else:
            if isinstance(bias, (PerformerStep, SharedBeamStep)):
                raise ValueError(f"a {type(bias).__name__} is a decode-step input")
            q = project(q_input, wq, "query")
            k, v = project(kv_input, wk, "key"), project(kv_input, wv, "value")
            if isinstance(bias, Masking):  # no attention-probability dropout off the xla path
                ctx = attend(q, k, v, bias)  # [b, q, h, d]
            else:
                drop = functools.partial(nn.Dropout(self.dropout_rate), deterministic=deterministic)
                ctx = dense_attention(q, k, v, bias, dt, drop)  # [b, q, h, d]
            ctx = constrain(ctx.astype(dt), (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_HEADS,
                                             axes.ACT_KV))
        out = dense("bqhd,hde->bqe", ctx, wo, dt)  # [b, q, e] float32 (q = 1: decode)
        if lora_on(self.lora, "out"):
            out = out + lora(self, "out", ctx, ("bqhd,hdr->bqr", "bqr,re->bqe"), wo.shape,
                             (axes.HEADS, axes.KV, axes.EMBED), 2, self.lora, dt, pdt)  # [b, q, e]
        if self.use_bias:
            out = out + bias_param(self, "out_bias", (e,), (axes.EMBED,), pdt)
        out = checkpoint_name(out.astype(dt), "attention_out")
        return constrain(out, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED))

    def _decode_step(self, q_input: Array, kv_input: Array, bias, cache: bool, project,
                     wq: Weight, wk: Weight, wv: Weight) -> Array | None:
        """The context [b, 1, h, d] of one query per row over head-major keys/values
        [g, h, T, d], where each of the g key/value rows serves r = b / g adjacent
        query rows; None in the init pass."""
        dt = dtype_of(self.dtype)
        favor = bias if isinstance(bias, PerformerStep) else None
        group = bias.group if isinstance(bias, SharedBeamStep) else 1
        bias = bias.bias if isinstance(bias, (PerformerStep, SharedBeamStep)) else bias
        if cache:
            k, v = project(q_input, wk, "key", True), project(q_input, wv, "value", True)
            kv = self._update_cache(k, v, group)  # [b / group, h, T * group, d] each
            if kv is None:
                return None
            k, v, visible = kv
            bias = visible if bias is None else bias + visible
        else:
            if self.is_initializing():
                return None
            k, v = project(kv_input, wk, "key", True), project(kv_input, wv, "value", True)
        rows, (g, h, _, d) = q_input.shape[0], k.shape
        if q_input.shape[1] != 1 or rows % g:
            raise ValueError(f"decode step: one query token per row and rows {rows} a multiple "
                             f"of the key/value rows {g}, got queries {q_input.shape[:2]}")
        q = project(q_input, wq, "query")  # [b, 1, h, d]
        if favor is not None:  # the teacher-forced causal Performer's weights, over the cache
            ctx = performer_cached(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), bias,
                                   num_features=favor.num_features, seed=favor.seed)
        else:
            # Queries [b, 1, h, d] -> [g, h, r, d] (a small transpose: one token per row).
            q = q.reshape(g, rows // g, h, d).transpose(0, 2, 1, 3)
            scores = mixed_einsum("ghrd,ghtd->ghrt", q, k, dt)  # [g, h, r, T] float32
            if bias is not None:  # [g|1, h|1, 1, T]
                scores = scores + bias
            probs = softmax_to(scores, dt)  # [g, h, r, T]
            ctx = mixed_einsum("ghrt,ghtd->ghrd", probs, v, dt)  # [g, h, r, d] float32
            ctx = ctx.transpose(0, 2, 1, 3).reshape(rows, 1, h, d)  # [b, 1, h, d]
        return constrain(ctx.astype(dt), (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_HEADS,
                                          axes.ACT_KV))

    def _update_cache(self, k: Array, v: Array, group: int = 1
                      ) -> tuple[Array, Array, Array] | None:
        """Writes this step's head-major k/v [b, h, 1, d] at ``cache_index``; returns the
        whole cache [b, h, T, d] twice and its causal bias [1, 1, 1, T]; None in the init
        pass, which sizes the cache from the full-length input [b, h, T, d].

        With ``group`` r > 1 (a :class:`SharedBeamStep`'s slots) the cache is
        [b / r, h, T * r, d], position-major: the r rows of a group write their slots of
        position ``i`` as one contiguous block, and the cache is used as it is stored (a
        reshape between the write and the read made XLA copy the whole cache twice a step).
        """
        if group > 1:  # [b, h, t, d] -> [b / r, h, t * r, d]: (position, slot) pairs
            b, h, t, d = k.shape
            k, v = (x.reshape(b // group, group, h, t, d).transpose(0, 2, 3, 1, 4)
                    .reshape(b // group, h, t * group, d) for x in (k, v))
        initialized = self.has_variable("cache", "cached_key")
        ck = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cv = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        idx = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if not initialized:
            return None
        if ck.value.shape[0] != k.shape[0]:
            raise ValueError(f"decode step: the cache {ck.value.shape} was sized for another "
                             f"grouping of rows than this step's keys {k.shape}")
        i = idx.value
        ck.value = jax.lax.dynamic_update_slice(ck.value, k, (0, 0, i * group, 0))
        cv.value = jax.lax.dynamic_update_slice(cv.value, v, (0, 0, i * group, 0))
        idx.value = i + 1
        t = ck.value.shape[2] // group
        visible = jnp.repeat(jnp.arange(t) <= i, group)[None, None, None, :]  # [1, 1, 1, T*r]
        return ck.value, cv.value, mask_to_bias(visible)
