"""Per-device memory of one training step, predicted without compiling anything.

The compiled step holds, per device (XLA's ``memory_analysis()``; :func:`compiled_bytes`):

* arguments: the train state (parameters, optimizer state, counters) and the batch,
  each leaf split by the mesh as the logical-axis rules say. Computed exactly from the
  Trainer's abstract state (``jax.eval_shape`` of its init: a trace, no compile) and the
  rule table, with TPU's tiled layouts padded where the target is a TPU.
* temporaries: gradients (laid out like the optimizer state), the activations saved for
  the backward pass, the float32 logits and their gradient, and scratch.

The saved activations come from the program itself: :func:`residual_kinds` traces
``jax.vjp`` of the loss (``jax.eval_shape``; no compile) for a small proxy model whose
every dimension has its own size, with the target's kernels (flash as the Pallas kernel on
TPU and GPU), and reads the residuals the remat policy keeps. Each
residual's shape, written in dimension letters (``bshd``: batch, length, heads, head
size), is then sized for the real model and the candidate's mesh. XLA does not keep
exactly those buffers (it fuses some away and adds backward scratch); the factors in
:data:`CALIBRATION` were fitted to ahead-of-time TPU compiles by
``benchmarks/planner_accuracy.py``, which reports the error on every configuration.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmt.config import PRECISIONS, ModelConfig
from jaxmt.kernels.common import tracing_for
from jaxmt.modeling.attention import runs_as
from jaxmt.modeling.model import EncoderDecoderModel
from jaxmt.plan.workload import Candidate, Workload
from jaxmt.sharding import axes
from jaxmt.sharding.partitioning import Partitioner, resolve_rules
from jaxmt.train.trainer import Trainer

# Each dimension of the proxy model gets a size no other dimension has, so a residual's
# shape names its dimensions. b: batch rows, s: source length, t: target length,
# e: embed, h: heads, d: head size, f: MLP units, v: vocabulary, r: relative-position
# buckets.
# The lengths are multiples of 8, which the TPU flash kernel's tiles keep; the GPU
# kernel pads lengths to powers of two and the head size to 16, named by the same
# letters (at real sizes, 512 and 64, the padding is none).
_PROXY = {"b": 3, "s": 24, "t": 48, "e": 40, "h": 5, "d": 6, "f": 56, "v": 136, "r": 11}
_LETTER = {size: letter for letter, size in _PROXY.items()} | {32: "s", 64: "t", 16: "d"}
# Which letters each mesh axis divides, for activations (axes.RULES: act_batch over the
# batch axes; act_heads, act_mlp and act_vocab over tensor).
_SPLIT_BY = {"b": axes.BATCH_MESH_AXES, "h": ("tensor",), "f": ("tensor",), "v": ("tensor",)}


def compiled_bytes(mem: Any) -> int:
    """Per-device bytes of a compiled step from its ``memory_analysis()``: arguments plus
    outputs not aliased to a donated argument plus temporaries (XLA's CPU backend
    reports ``peak_memory_in_bytes`` as the arguments alone, so it is not used)."""
    return int(mem.argument_size_in_bytes + mem.output_size_in_bytes
               - mem.alias_size_in_bytes + mem.temp_size_in_bytes)



def compiled_flops(compiled: Any) -> float | None:
    """XLA's ``cost_analysis()`` flops of a compiled step, per device (None where XLA
    gives none, as for GPU ahead-of-time compiles). A ``lax.scan`` body counts once."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None

# ---------------------------------------------------------------------------------------
# Arguments: the state and the batch, leaf by leaf.

def _tiled_bytes(shape: tuple[int, ...], itemsize: int) -> int:
    """Bytes of an array in TPU HBM: its two minor dimensions padded to whole tiles of
    128 lanes by 8 rows of 32-bit words (16 rows for 16-bit types, 32 for 8-bit). XLA
    picks an argument's layout, so the two minor dimensions are the pair that pads
    least; a vector is padded to whole 128-element rows."""
    if not shape:
        return 4
    rows = 8 * max(1, 4 // itemsize)
    pad = lambda n, m: -(-n // m) * m
    total = math.prod(shape)
    if len(shape) == 1:
        return pad(shape[0], 128) * itemsize
    best = None
    for i, lanes in enumerate(shape):
        for j, sub in enumerate(shape):
            if i != j:
                n = total // (lanes * sub) * pad(lanes, 128) * pad(sub, rows)
                best = n if best is None else min(best, n)
    return best * itemsize


@dataclasses.dataclass(frozen=True)
class _Leaf:
    shape: tuple[int, ...]
    itemsize: int
    names: tuple  # logical axis names per dimension (None: unnamed)
    group: str  # params | opt_state | other
    trained: bool = False  # a parameter that gets a gradient


@functools.lru_cache(maxsize=16)
def _state_leaves(model: ModelConfig, train, src_len: int, tgt_len: int
                  ) -> tuple[_Leaf, ...]:
    """The train state's leaves with their logical names: a Trainer on one device traces
    the init (``jax.eval_shape``), which no mesh changes."""
    one = Partitioner(devices=jax.devices()[:1])
    train = dataclasses.replace(train, batch_size=1, num_microbatches=1)
    trainer = Trainer(model, train, one, src_len, tgt_len)
    specs = jax.tree_util.tree_flatten_with_path(
        trainer.logical_specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
    shapes = jax.tree.leaves(trainer.abstract_state)
    trained_paths = {jax.tree_util.keystr(p) for p, _ in
                     jax.tree_util.tree_flatten_with_path(trainer.trained(
                         trainer.abstract_state.params))[0]}
    out = []
    for (path, spec), x in zip(specs, shapes):
        group = getattr(path[0], "name", "other")
        group = group if group in ("params", "opt_state") else "other"
        names = tuple(spec) + (None,) * (len(x.shape) - len(spec))
        trained = group == "params" and jax.tree_util.keystr(path[1:]) in trained_paths
        out.append(_Leaf(tuple(x.shape), x.dtype.itemsize, names, group, trained))
    return tuple(out)


def _shard_shape(shape: tuple[int, ...], names: tuple, rules: tuple, sizes: dict) -> tuple:
    mesh_axes = nn.logical_to_mesh_axes(names, rules)
    out = []
    for dim, ax in zip(shape, tuple(mesh_axes) + (None,) * len(shape)):
        n = 1 if ax is None else math.prod(sizes[a] for a in ((ax,) if isinstance(ax, str) else ax))
        out.append(-(-dim // n))
    return tuple(out)


def state_bytes(w: Workload, c: Candidate, kind: str = "cpu") -> dict[str, int]:
    """Per-device bytes of the parameters, optimizer state and other state leaves, and
    three parameter-sized terms of the temporaries: ``grads`` (laid out like the
    optimizer state, in the parameters' dtype), ``grads_gathered`` (the same, whole over
    ``fsdp``: what a device holds before a reduce-scatter) and ``weights_copy`` (the
    weights in the compute dtype, whole over ``fsdp``: gathered or cast copies; 0 when
    the step can use the parameters as they are)."""
    return dict(_state_bytes(_state_key(c.model_config(w.model)), w.train, w.src_len,
                             w.tgt_len, tuple(c.sizes.items()), c.shard_params, kind))


@functools.lru_cache(maxsize=1024)
def _state_bytes(model: ModelConfig, train, src_len: int, tgt_len: int, sizes: tuple,
                 shard_params: bool, kind: str) -> dict[str, int]:
    """:func:`state_bytes`, cached: a plan's candidates share a few meshes."""
    sizes = dict(sizes)
    leaves = _state_leaves(model, train, src_len, tgt_len)
    rules = resolve_rules(axes.RULES, sizes)
    param_rules = resolve_rules(axes.RULES, sizes, drop=() if shard_params else ("fsdp",))
    whole = resolve_rules(axes.RULES, sizes, drop=("fsdp",))
    compute, param = PRECISIONS[model.precision]
    # XLA's CPU backend gathers weights in float32 and casts after (a TPU compile moves
    # the cast before the collective).
    compute_size = 4 if kind == "cpu" else np.dtype(compute).itemsize
    copies = (sizes["fsdp"] > 1 and shard_params) or compute != param
    nbytes = _tiled_bytes if kind == "tpu" else (lambda s, i: math.prod(s) * i)
    out = collections.Counter()
    for leaf in leaves:
        use = param_rules if leaf.group == "params" else rules
        out[leaf.group] += nbytes(_shard_shape(leaf.shape, leaf.names, use, sizes), leaf.itemsize)
        if leaf.group == "params":
            gathered = _shard_shape(leaf.shape, leaf.names, whole, sizes)
            if copies and len(leaf.shape) >= 2:
                out["weights_copy"] += nbytes(gathered, compute_size)
            if leaf.trained:
                out["grads"] += nbytes(_shard_shape(leaf.shape, leaf.names, rules, sizes),
                                       leaf.itemsize)
                out["grads_gathered"] += nbytes(gathered, leaf.itemsize)
    return dict(out)


def _state_key(model: ModelConfig) -> ModelConfig:
    """The model with what does not change the state's shapes set to defaults (one init
    trace serves every remat policy and attention implementation)."""
    att = dataclasses.replace(model.attention, encoder="xla", decoder="xla", cross="xla")
    return dataclasses.replace(model, encoder_remat="none", decoder_remat="none",
                               attention=att)


def batch_bytes(w: Workload, c: Candidate, kind: str = "cpu") -> int:
    """Per-device bytes of the step's int32 batch arrays (rows over the batch axes)."""
    dp = math.prod(c.sizes[a] for a in axes.BATCH_MESH_AXES)
    keys = EncoderDecoderModel(w.model).batch_keys
    rows = -(-w.batch // dp)
    nbytes = _tiled_bytes if kind == "tpu" else (lambda s, i: math.prod(s) * i)
    return sum(nbytes((rows, w.src_len if k.startswith("encoder") else w.tgt_len), 4)
               for k in keys)


# ---------------------------------------------------------------------------------------
# Saved activations: the residuals of jax.vjp, traced for a proxy model.

def proxy_model(model: ModelConfig, sizes: dict) -> ModelConfig:
    """``model`` with each dimension a letter names set to ``sizes[letter]`` (the batch
    and lengths aside: they are the step's), without dropout."""
    return dataclasses.replace(
        model, vocab_size=sizes["v"], emb_dim=sizes["e"], num_heads=sizes["h"],
        head_dim=sizes["d"], mlp_dim=sizes["f"], relpos_buckets=sizes["r"], dropout_rate=0.0)


def dimension_sizes(w: Workload, c: Candidate) -> dict[str, float]:
    """The real size of each dimension letter for ``w`` under ``c`` (``b``: the rows of
    one microbatch)."""
    m = c.model_config(w.model)
    return {"b": w.batch / c.num_microbatches, "s": w.src_len, "t": w.tgt_len,
            "e": m.emb_dim, "h": m.num_heads, "d": m.head_dim, "f": m.mlp_dim,
            "v": m.vocab_size, "r": m.relpos_buckets}


def _proxy(model: ModelConfig, enc_layers: int, dec_layers: int) -> ModelConfig:
    return dataclasses.replace(proxy_model(model, _PROXY), num_encoder_layers=enc_layers,
                               num_decoder_layers=dec_layers, scan_layers=False)


@functools.lru_cache(maxsize=256)
def _kinds(model: ModelConfig, enc_layers: int, dec_layers: int, platform: str
           ) -> collections.Counter:
    """Residuals of the loss's vjp for the proxy, traced for ``platform`` (its kernels):
    ``{(letters, itemsize): count}``. Residuals that are parameters (no batch dimension)
    are keyed with a leading ``w:``."""
    cfg = _proxy(model, enc_layers, dec_layers)
    m = EncoderDecoderModel(cfg)
    params = _param_shapes(_state_key(cfg))
    batch = jax.eval_shape(lambda: m.dummy_batch(_PROXY["b"], _PROXY["s"], _PROXY["t"]))
    batch = dict(batch, decoder_loss_weights=jax.ShapeDtypeStruct(
        batch["decoder_target_tokens"].shape, jnp.int32))

    def vjp(p, b):
        return jax.vjp(lambda p: m.loss(p, b, dropout_rng=None)[0], p)[1]

    out = collections.Counter()
    with tracing_for(platform):
        residuals = jax.eval_shape(vjp, params, batch)
    for r in jax.tree.leaves(residuals):
        letters = "".join(_LETTER.get(n, "?") for n in r.shape)
        key = letters if "b" in letters else "w:" + letters
        out[(key, np.dtype(r.dtype).itemsize)] += 1
    return out


@functools.lru_cache(maxsize=64)
def _param_shapes(model: ModelConfig):
    """The parameters' shapes, one init trace per :func:`_state_key` (the remat policies
    and attention implementations that :func:`_kinds` varies share them)."""
    return EncoderDecoderModel(model).param_shapes()


def residual_kinds(model: ModelConfig, platform: str) -> dict[str, collections.Counter]:
    """Saved residuals per encoder layer, per decoder layer and outside the layers
    (``fixed``), with the kernels of ``platform`` ("cpu", "gpu" or "tpu"). A stack's
    per-layer residuals depend on its own remat policy only, so they come from proxies
    with that policy on both stacks (1+1, 2+1 and 1+2 layers, cached per policy);
    ``fixed`` from the 1+1 proxy with the model's two policies."""
    both = lambda p: dataclasses.replace(model, encoder_remat=p, decoder_remat=p)
    enc_m, dec_m = both(model.encoder_remat), both(model.decoder_remat)
    enc = _kinds(enc_m, 2, 1, platform) - _kinds(enc_m, 1, 1, platform)
    dec = _kinds(dec_m, 1, 2, platform) - _kinds(dec_m, 1, 1, platform)
    fixed = _kinds(model, 1, 1, platform) - enc - dec
    return {"encoder": enc, "decoder": dec, "fixed": fixed}


def _size(letters: str, itemsize: int, dims: dict, div: dict) -> float:
    return itemsize * math.prod(dims[c] / div.get(c, 1) for c in letters if c != "?")


def _term(key: str, itemsize: int) -> str | None:
    """Which temporaries' term a residual belongs to (None: not counted)."""
    if key.startswith("w:"):  # no batch dimension: parameters and their copies (the
        return None  # weights_copy term), position tables
    if key == "btv":
        return None  # the float32 logits: the "logits" term
    lengths = sum(key.count(c) for c in "st")
    if lengths >= 2:
        return "act_scores"
    # Float32 residuals (norm statistics, softmax sums, the residual stream) are mostly
    # cheap element-wise results that XLA's fusions recompute; 16-bit ones are matmul
    # outputs it keeps: separate terms.
    return "act_wide" if itemsize >= 4 else "act_layers"


def activation_terms(w: Workload, c: Candidate, kind: str = "cpu") -> dict[str, float]:
    """Residual bytes per device by term, for one microbatch: ``act_layers`` (16-bit
    [batch, length, ...] tensors), ``act_wide`` (float32 ones), ``act_scores`` ([batch,
    heads, length, length] ones), ``act_working`` (one layer's with no remat: what the
    backward pass rebuilds, whatever the policy saved) and ``act_offload`` (what the
    stacks with ``offload`` send to host: XLA stages it in device memory). On CPU, 16-bit
    residuals count as float32: XLA's CPU backend upcasts bf16 work."""
    m = c.model_config(w.model)
    sizes = c.sizes
    dims = dimension_sizes(w, c)
    div = {k: math.prod(sizes[a] for a in v) for k, v in _SPLIT_BY.items()}
    layers = {"encoder": m.num_encoder_layers, "decoder": m.num_decoder_layers, "fixed": 1}

    def by_term(policy: str | None) -> dict[str, collections.Counter]:
        """Per-stack bytes by term for one layer, with ``policy`` on both stacks (None:
        the candidate's own)."""
        model = m if policy is None else dataclasses.replace(
            m, encoder_remat=policy, decoder_remat=policy)
        out = {}
        for where, counter in residual_kinds(_residual_key(model, kind), kind).items():
            out[where] = collections.Counter()
            for (key, itemsize), n in counter.items():
                if term := _term(key, itemsize):
                    out[where][term] += n * _size(key, _held(itemsize, kind), dims, div)
        return out

    out = collections.Counter()
    for where, terms in by_term(None).items():
        for term, nbytes in terms.items():
            out[term] += layers[where] * nbytes
    none = by_term("none")
    out["act_working"] = max(sum(none[where].values()) for where in ("encoder", "decoder"))
    remat = {"encoder": m.encoder_remat, "decoder": m.decoder_remat}
    if "offload" in remat.values():
        dots = by_term("dots_saveable")
        out["act_offload"] = sum(layers[where] * sum(dots[where].values())
                                 for where, policy in remat.items() if policy == "offload")
    return {t: out.get(t, 0.0) for t in ACT_TERMS}


def _held(itemsize: int, kind: str) -> int:
    """Bytes per element as the target holds it: XLA's CPU backend upcasts 16-bit work."""
    return max(itemsize, 4) if kind == "cpu" else itemsize


def _residual_key(model: ModelConfig, platform: str) -> ModelConfig:
    """The model with what the proxy replaces set to defaults (a cache key). ``offload``
    is traced as ``full``: what it saves goes to host memory, not the device's. On a
    platform without the Pallas kernel, ``flash`` traces as ``blockwise`` (what
    :func:`jaxmt.modeling.attention.attend` runs there), so the two share a key."""
    full = lambda p: "full" if p == "offload" else p
    att = model.attention
    run = lambda impl: runs_as(impl, att, platform)
    att = dataclasses.replace(att, encoder=run(att.encoder), decoder=run(att.decoder),
                              cross=run(att.cross))
    return dataclasses.replace(_proxy(model, 1, 1), num_encoder_layers=1, num_decoder_layers=1,
                               encoder_remat=full(model.encoder_remat),
                               decoder_remat=full(model.decoder_remat), attention=att)


# ---------------------------------------------------------------------------------------
# The estimate.

# The temporaries' terms, each scaled by its factor in the calibration.
ACT_TERMS = ("act_layers", "act_wide", "act_scores", "act_working", "act_offload")
TEMP_PARTS = ("grads", "grads_gathered", "weights_copy", *ACT_TERMS, "logits")
UNIT = {k: 1.0 for k in TEMP_PARTS}
# Fitted to ahead-of-time compiles by ``benchmarks/planner_accuracy.py --fit`` (non-negative
# least squares of the relative error), per group: the TPU groups on ``--set main`` (runs'
# sizes, the plans ``jaxmt plan`` recommended among them; flash compiled as the Pallas TPU
# kernel), ``cpu`` on ``--set small``. XLA's CPU backend upcasts bf16 work and makes no
# reduce-scatters; a scanned TPU stack keeps what the loop carries, an unrolled one lets
# fusions recompute element-wise residuals but keeps gathered gradients. A 0 means the
# term did not help the fit (its bytes went to correlated terms), not that XLA keeps none.
CALIBRATION = {
    "tpu_scan": {"grads": 1.358, "grads_gathered": 0.0, "weights_copy": 0.211,
                 "act_layers": 1.858, "act_wide": 1.06, "act_scores": 1.083,
                 "act_working": 0.255, "act_offload": 0.377, "logits": 0.694},
    "tpu_unrolled": {"grads": 3.242, "grads_gathered": 2.194, "weights_copy": 0.0,
                     "act_layers": 0.722, "act_wide": 0.116, "act_scores": 1.832,
                     "act_working": 0.0, "act_offload": 0.235, "logits": 0.745},
    "cpu": {"grads": 0.86, "grads_gathered": 0.66, "weights_copy": 0.0, "act_layers": 2.331,
            "act_wide": 0.974, "act_scores": 0.0, "act_working": 0.0, "act_offload": 0.0,
            "logits": 0.0},
}


def calibration_group(kind: str, scan_layers: bool) -> str:
    """Which fitted factors apply: ``tpu_scan``, ``tpu_unrolled`` or ``cpu``. GPUs take
    the TPU factors (no GPU compile was available to fit: bf16 native, reduce-scatters,
    fusions as on TPU), which :mod:`jaxmt.plan.verify` says are unverified."""
    if kind == "cpu":
        return "cpu"
    return "tpu_scan" if scan_layers else "tpu_unrolled"


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Predicted bytes per device. ``total`` is what :func:`compiled_bytes` measures;
    ``grads`` to ``weights`` are the temporaries, the rest the step's arguments."""

    params: int
    opt_state: int
    other: int  # counters, loss scale, the batch
    grads: int
    grads_gathered: int
    weights_copy: int
    act_layers: int
    act_wide: int
    act_scores: int
    act_working: int
    act_offload: int
    logits: int

    @property
    def activations(self) -> int:
        """Saved activations, the backward pass's working set and the weights' gathered
        or cast copies."""
        return (self.act_layers + self.act_wide + self.act_scores + self.act_working
                + self.act_offload + self.weights_copy)

    @property
    def arguments(self) -> int:
        """What the step takes in: parameters, optimizer state, counters, batch."""
        return self.params + self.opt_state + self.other

    @property
    def total(self) -> int:
        return self.arguments + sum(self.temp_parts().values())

    def parts(self) -> dict[str, int]:
        """The breakdown shown to users (tables, plots, JSON)."""
        return {"params": self.params, "grads": self.grads + self.grads_gathered,
                "opt_state": self.opt_state, "activations": self.activations,
                "logits": self.logits, "other": self.other}

    def temp_parts(self) -> dict[str, int]:
        """The temporaries by calibrated term (:data:`TEMP_PARTS`)."""
        return {k: getattr(self, k) for k in TEMP_PARTS}


def predict_memory(w: Workload, c: Candidate, kind: str = "cpu",
                   calibration: dict | None = None) -> MemoryEstimate:
    """Predicted per-device bytes of ``w``'s training step under ``c``; no compiles.

    Args:
      kind: the target's kind, "cpu", "tpu" (arrays padded to tiled layouts) or "gpu".
      calibration: factors per temporaries' term (default :data:`CALIBRATION`'s).
    """
    k = calibration or CALIBRATION[calibration_group(kind, c.scan_layers)]
    st = state_bytes(w, c, kind)
    m = c.model_config(w.model)
    sizes = c.sizes
    dp = math.prod(sizes[a] for a in axes.BATCH_MESH_AXES)
    rows = w.batch / c.num_microbatches / dp
    logits = 4 * rows * w.tgt_len * m.vocab_size / sizes["tensor"]
    # Microbatches add a float32 gradient sum beside each microbatch's gradients.
    grads = st.get("grads", 0) * (2 if c.num_microbatches > 1 else 1)
    acts = activation_terms(w, c, kind)
    return MemoryEstimate(
        params=int(st.get("params", 0)), opt_state=int(st.get("opt_state", 0)),
        other=int(st.get("other", 0) + batch_bytes(w, c, kind)),
        grads=int(k["grads"] * grads),
        grads_gathered=int(k["grads_gathered"] * st.get("grads_gathered", 0)),
        weights_copy=int(k["weights_copy"] * st.get("weights_copy", 0)),
        act_layers=int(k["act_layers"] * acts["act_layers"]),
        act_wide=int(k["act_wide"] * acts["act_wide"]),
        act_scores=int(k["act_scores"] * acts["act_scores"]),
        act_working=int(k["act_working"] * acts["act_working"]),
        act_offload=int(k["act_offload"] * acts["act_offload"]),
        logits=int(k["logits"] * logits))
