"""Pruning: gradual magnitude pruning while training, and one-shot pruning of a trained model.

- :func:`magnitude_pruning`: an optax transformation for Zhu & Gupta's (2017) gradual
  magnitude pruning (:class:`~jaxmt.config.PruneConfig`, ``TrainConfig.prune``). Chained
  after the optimizer (``jaxmt.train.trainer.make_optimizer``), it keeps one boolean mask
  per target matrix in the optimizer state and recomputes them on the cubic schedule;
  :func:`apply_masks`, after the update, leaves pruned weights exactly 0.
- :func:`magnitude_prune_params`: the same masks applied once (unstructured sparsity; the
  weights stay dense arrays with zeros, so size and speed do not change).
- :func:`prune_structured`: removes whole attention heads and MLP hidden units, so the model
  is physically smaller (``num_heads`` and ``mlp_dim`` shrink) and decodes faster.

Masks are per matrix: each layer's slice of a scanned (``layers``-stacked) weight is its own
matrix. No module here imports :mod:`jaxmt.train` (which imports this one).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmt.config import PRUNE_TARGETS, ModelConfig, PruneConfig
from jaxmt.modeling import param_tree
from jaxmt.modeling.network import stack_layers, unstack_layers

PyTree = Any
LAYERS = "layers"  # the scanned stack's name: its leaves have a leading layer axis


# ---------------------------------------------------------------- magnitude masks

def _stacked(path: str) -> bool:
    return LAYERS in path.split("/")


def magnitude_mask(w: jax.Array, sparsity, stacked: bool = False,
                   keep: jax.Array | None = None) -> jax.Array:
    """The mask (True = kept) that zeroes the ``floor(sparsity * n)`` smallest ``|w|`` of
    each n-entry matrix: ``w`` itself, or with ``stacked`` each slice ``w[i]`` (a scanned
    stack's layer).

    The count is exact: ties are broken by position (the earlier flat index goes first).
    ``keep`` (an earlier mask) ranks the entries it pruned first, so they stay pruned as
    long as the sparsity does not fall. ``sparsity`` may be a traced scalar.
    """
    rows = w.shape[0] if stacked else 1
    score = jnp.abs(w.astype(jnp.float32)).reshape(rows, -1)  # [rows, n]
    if keep is not None:
        score = jnp.where(keep.reshape(rows, -1), score, -1.0)
    n = score.shape[1]
    k = jnp.floor(jnp.asarray(sparsity, jnp.float32) * n).astype(jnp.int32)
    order = jnp.argsort(score, axis=1, stable=True)  # [rows, n] smallest first
    rank = jnp.argsort(order, axis=1)  # [rows, n] each entry's place in that order
    return (rank >= k).reshape(w.shape)


def target_paths(params: PyTree, patterns: Iterable[str] = PRUNE_TARGETS,
                 among: set[str] | None = None) -> set[str]:
    """The parameter paths that ``patterns`` (regexes, fullmatch) select, limited to
    ``among`` (e.g. the trained ones) when given.

    Raises:
      ValueError: they select none.
    """
    paths = param_tree.paths(params)
    chosen = param_tree.matching(paths, patterns)
    if among is not None:
        chosen &= among
    if not chosen:
        raise ValueError(f"PruneConfig.targets: {list(patterns)} match no "
                         f"{'trained ' if among is not None else ''}parameter; paths look "
                         f"like {sorted(paths)[:4]}")
    return chosen


def magnitude_prune_params(params: PyTree, sparsity: float,
                           targets: Iterable[str] = PRUNE_TARGETS) -> PyTree:
    """``params`` with the ``floor(sparsity * n)`` smallest-magnitude entries of each target
    matrix (paths ``targets`` matches) set to 0; the others as they were (the same arrays).
    One-shot unstructured pruning, with :func:`magnitude_pruning`'s masks."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    chosen = target_paths(params, targets)

    def prune(path, w):
        p = param_tree.path_str(path)
        if p not in chosen:
            return w
        return jnp.where(magnitude_mask(w, sparsity, _stacked(p)), w, jnp.zeros_like(w))
    return jax.tree_util.tree_map_with_path(prune, params)


# ---------------------------------------------------------------- gradual pruning (optax)

class PruneState(NamedTuple):
    """:func:`magnitude_pruning`'s state.

    Attributes:
      count: updates made so far (steps skipped for non-finite gradients keep the old
        state, so they do not count).
      masks: per target parameter a boolean array of its shape (True = kept), carrying
        the parameter's logical axis names, so it is sharded like it; ``optax.MaskedNode``
        for the others.
    """

    count: jax.Array
    masks: PyTree


def sparsity_at(cfg: PruneConfig, step, total_steps: int) -> jax.Array:
    """The sparsity the masks recomputed at update ``step`` (0-based) aim at (it holds
    until the next recomputation): 0 before ``start_step``,
    ``s * (1 - (1 - t)^3)`` with ``t = (step - start) / (end - start)`` on the ramp, ``s``
    after ``end_step`` (0: ``total_steps``)."""
    end = cfg.end_step or total_steps
    span = max(end - cfg.start_step, 1)
    t = jnp.clip((jnp.asarray(step, jnp.float32) - cfg.start_step) / span, 0.0, 1.0)
    return jnp.float32(cfg.sparsity) * (1.0 - (1.0 - t) ** 3)


def _map_targets(fn, masks: PyTree, *trees: PyTree, others: str = "tree") -> PyTree:
    """``fn(mask, *leaves)`` on the target leaves; elsewhere the first tree's leaf, or with
    ``others="mask"`` the mask tree's ``MaskedNode``."""
    def one(m, x, *rest):
        if isinstance(m, optax.MaskedNode):
            return m if others == "mask" else x
        return fn(m, x, *rest)
    return jax.tree.map(one, masks, *trees, is_leaf=lambda m: isinstance(m, optax.MaskedNode))


def magnitude_pruning(cfg: PruneConfig, total_steps: int, targets: set[str] | None = None,
                      among: set[str] | None = None) -> optax.GradientTransformation:
    """Gradual magnitude pruning (Zhu & Gupta 2017): the masks, as the last link of an
    optax chain; :func:`apply_masks` after ``optax.apply_updates`` zeroes the pruned weights
    (the split of jaxpruner's ``wrap_optax`` / ``post_gradient_update``).

    On update ``t`` (0-based) with ``start_step <= t <= end_step`` and ``t - start_step`` a
    multiple of ``every`` (and on ``end_step`` itself), each target's mask is recomputed on
    the current weights: exactly ``floor(s_t * n)`` entries per matrix pruned
    (:func:`sparsity_at`, :func:`magnitude_mask`), those already pruned first, so they stay
    pruned. Updates pass through unchanged, and :func:`apply_masks` turns the new weights
    into ``new_params * mask``: pruned weights become and stay exactly 0, and kept ones
    are bit for bit what the optimizer gives (masking the update instead, as
    ``where(mask, update, -params)``, would stop XLA from fusing ``params + lr * u`` into
    one multiply-add, and change the kept weights in the last bit). The learning rate may
    be applied before or after this link: the masks do not depend on the update.

    Args:
      cfg: the schedule and the targets (``cfg.targets``, regexes over parameter paths).
      total_steps: the run's steps (``end_step`` 0 means this).
      targets: the target paths, overriding ``cfg.targets``.
      among: the paths ``cfg.targets`` may select (e.g. the trained ones: a frozen
        parameter is never pruned); None: all.

    Raises (in ``init``):
      ValueError: no target parameter.
    """
    end = cfg.end_step or total_steps

    def init(params):
        chosen = targets if targets is not None else target_paths(params, cfg.targets, among)
        masks = jax.tree_util.tree_map_with_path(
            lambda p, x: (jnp.ones(x.shape, jnp.bool_) if param_tree.path_str(p) in chosen
                          else optax.MaskedNode()), params)
        return PruneState(count=jnp.zeros([], jnp.int32), masks=masks)

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("magnitude_pruning needs the parameters in update()")
        t = state.count
        due = (t >= cfg.start_step) & (t <= end) & (
            ((t - cfg.start_step) % cfg.every == 0) | (t == end))
        s = sparsity_at(cfg, t, total_steps)
        paths = jax.tree_util.tree_map_with_path(lambda p, _: param_tree.path_str(p), params)

        def recompute(masks):
            return _map_targets(lambda m, p, path: magnitude_mask(p, s, _stacked(path), m),
                                masks, params, paths, others="mask")

        masks = jax.lax.cond(due, recompute, lambda m: m, state.masks)
        return updates, PruneState(count=t + 1, masks=masks)

    return optax.GradientTransformation(init, update)


def apply_masks(params: PyTree, opt_state: PyTree) -> PyTree:
    """``params`` (after ``optax.apply_updates``) with the entries :func:`magnitude_pruning`'s
    masks prune set to 0, the rest untouched; ``params`` itself when ``opt_state`` holds
    no :class:`PruneState`."""
    state = opt_state if isinstance(opt_state, PruneState) else find_state(opt_state)
    if state is None:
        return params
    return _map_targets(lambda m, p: jnp.where(m, p, jnp.zeros_like(p)), state.masks, params)


def find_state(opt_state: PyTree) -> PruneState | None:
    """The :class:`PruneState` inside an optimizer state (e.g. a chain's), or None."""
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, PruneState))
             if isinstance(x, PruneState)]
    return found[0] if found else None


def sparsity(params: PyTree, state: PruneState) -> jax.Array:
    """The fraction of exact zeros over all of ``state``'s target parameters."""
    is_node = lambda m: isinstance(m, optax.MaskedNode)  # noqa: E731
    targets = jax.tree.leaves(jax.tree.map(lambda m, p: None if is_node(m) else p,
                                           state.masks, params, is_leaf=is_node))
    zeros = sum(jnp.sum(p == 0, dtype=jnp.int32).astype(jnp.float32) for p in targets)
    return zeros / max(sum(p.size for p in targets), 1)


# ---------------------------------------------------------------- structured pruning

ATTENTION = ("query", "key", "value", "out")
SHARED_BIAS = {"encoder": "attention", "decoder": "self_attention"}  # relpos_bias users


def kept_count(n: int, fraction: float, multiple_of: int = 1) -> int:
    """How many of ``n`` heads or units remain after removing ``fraction`` of them
    (rounded to the nearest count, then down to a multiple of ``multiple_of``); may be 0."""
    keep = n - math.floor(fraction * n + 0.5)
    return keep - keep % multiple_of


def _modules(tree: Mapping, prefix: str = ""):
    """(path, dict) of every attention block and MLP block of an unrolled tree."""
    for k, v in tree.items():
        if not isinstance(v, Mapping):
            continue
        path = f"{prefix}/{k}" if prefix else str(k)
        if all(w in v for w in ATTENTION) or ("wo" in v and "wi_0" in v):
            yield path, v
        else:
            yield from _modules(v, path)


def _sq(x, axes_: tuple[int, ...]) -> np.ndarray:
    return np.sum(np.square(np.asarray(x, np.float64)), axis=axes_)


def _head_scores(block: Mapping, scores: Mapping | None) -> np.ndarray:
    """[heads]: the L2 norm of a head's q/k/v/out slices (and biases), or with per-weight
    ``scores`` their sum over the same slices."""
    def f(k, ax):
        if scores is None:
            return _sq(block[k], ax)
        return np.sum(np.asarray(scores[k], np.float64), axis=ax)
    total = sum(f(k, (0, 2)) for k in ("query", "key", "value"))  # [e, h, d] -> [h]
    total = total + f("out", (1, 2))  # [h, d, e] -> [h]
    for k in ("query_bias", "key_bias", "value_bias"):
        if k in block:
            total = total + f(k, (1,))  # [h, d] -> [h]
    return total if scores is not None else np.sqrt(total)


def _unit_scores(block: Mapping, scores: Mapping | None) -> np.ndarray:
    """[mlp]: the product of the L2 norms of a unit's ``wi_i`` columns (with their bias)
    and ``wo`` row, or with per-weight ``scores`` their sum over the same slices."""
    wis = sorted(k for k in block if k.startswith("wi_") and not k.endswith("_bias"))
    if scores is not None:
        s = sum(np.sum(np.asarray(scores[k], np.float64), axis=0) for k in wis)  # [e, m] -> [m]
        s = s + sum(np.asarray(scores[f"{k}_bias"], np.float64)
                    for k in wis if f"{k}_bias" in block)
        return s + np.sum(np.asarray(scores["wo"], np.float64), axis=1)  # [m, e] -> [m]
    out = np.sqrt(_sq(block["wo"], (1,)))  # [m, e] -> [m]
    for k in wis:
        sq = _sq(block[k], (0,))  # [e, m] -> [m]
        if f"{k}_bias" in block:
            sq = sq + np.square(np.asarray(block[f"{k}_bias"], np.float64))
        out = out * np.sqrt(sq)
    return out


def _top(scores: np.ndarray, keep: int) -> np.ndarray:
    """The indices of the ``keep`` highest scores (ties: the lower index), ascending."""
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[:keep])


def _get(tree: Mapping, path: str):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def plan_structured(params: PyTree, cfg: ModelConfig, fraction: float,
                    importance: PyTree | None = None, multiple_of: int = 1
                    ) -> dict[str, np.ndarray]:
    """Which heads and MLP units :func:`prune_structured` keeps.

    Every attention block keeps the same number of heads and every MLP the same number of
    units (``num_heads`` and ``mlp_dim`` are global), chosen by importance per block,
    except that self-attention blocks sharing a stack's relative position table (T5's
    encoder self-attention, decoder self-attention) keep one set of heads, ranked by their
    importance summed over that stack's layers, since the table has one column per head.
    Cross-attention (no table) and Marian-style models choose per layer.

    Args:
      params: unboxed parameters, unrolled or scanned as ``cfg.scan_layers`` says.
      cfg: the model's config.
      fraction: the share of heads and of units to remove, in [0, 1).
      importance: per-weight scores shaped like ``params`` (e.g. first-order Taylor
        ``|w * dL/dw|`` summed over a few batches, :func:`taylor_importance`); a head's or
        unit's importance is the sum over its slices. None: weight norms (a head: the L2
        norm of its q/k/v/out slices; a unit: the product of its ``wi_i`` column and
        ``wo`` row norms).
      multiple_of: round the kept counts down to a multiple of this (e.g. the ``tensor``
        mesh axis, or 8 for accelerator-friendly shapes).

    Returns:
      ``{block path (unrolled, e.g. "encoder/layers_0/attention"): kept indices}``,
      ascending, plus ``"<stack>/relpos_bias"`` for each shared table.

    Raises:
      ValueError: LoRA factors or a quantized model (merge or prune first), a fraction
        out of range, or one that would leave no head or unit.
    """
    if cfg.lora.rank:
        raise ValueError("structured pruning needs the LoRA factors merged into the weights: "
                         "run `jaxmt export --merge_lora` first and prune its output")
    if getattr(cfg, "quant", "none") != "none":
        raise ValueError(f"ModelConfig.quant={cfg.quant!r}: prune the float model, then "
                         "quantize the pruned one")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"structured fraction must be in [0, 1), got {fraction!r}")
    heads = kept_count(cfg.num_heads, fraction, multiple_of)
    units = kept_count(cfg.mlp_dim, fraction, multiple_of)
    for what, n, keep in (("num_heads", cfg.num_heads, heads), ("mlp_dim", cfg.mlp_dim, units)):
        if keep < 1:
            raise ValueError(f"removing {fraction:g} of ModelConfig.{what}={n} (kept counts "
                             f"a multiple of {multiple_of}) would leave none; use a smaller "
                             "fraction")
    unrolled = unstack_layers(params) if cfg.scan_layers else params
    scores = None if importance is None else (
        unstack_layers(importance) if cfg.scan_layers else importance)
    plan, shared = {}, {}
    for path, block in _modules(unrolled):
        s = None if scores is None else _get(scores, path)
        if "wo" in block:
            plan[path] = _top(_unit_scores(block, s), units)
            continue
        stack, *_, name = path.split("/")
        if SHARED_BIAS.get(stack) == name and "relpos_bias" in unrolled[stack]:
            shared.setdefault(stack, []).append((path, _head_scores(block, s)))
        else:
            plan[path] = _top(_head_scores(block, s), heads)
    for stack, blocks in shared.items():
        keep = _top(sum(sc for _, sc in blocks), heads)
        plan[f"{stack}/relpos_bias"] = keep
        plan.update({path: keep for path, _ in blocks})
    return plan


def taylor_importance(params: PyTree, grads: Iterable[PyTree]) -> PyTree:
    """First-order Taylor scores ``sum_b |w * dL_b/dw|`` over gradient trees (one per
    batch), shaped like ``params``: an ``importance`` for :func:`prune_structured`."""
    total = None
    for g in grads:
        s = jax.tree.map(lambda w, d: np.abs(np.asarray(w, np.float64) * np.asarray(d)), params, g)
        total = s if total is None else jax.tree.map(np.add, total, s)
    if total is None:
        raise ValueError("taylor_importance needs at least one gradient tree")
    return total


def apply_plan(params: PyTree, cfg: ModelConfig, plan: dict[str, np.ndarray]
               ) -> tuple[PyTree, ModelConfig]:
    """``params`` with only the planned heads and units (host numpy arrays), and ``cfg``
    with the smaller ``num_heads`` and ``mlp_dim``."""
    unrolled = unstack_layers(params) if cfg.scan_layers else params
    heads = units = None

    def walk(node, prefix):
        nonlocal heads, units
        if not isinstance(node, Mapping):
            return np.asarray(node)
        out = {}
        keep = plan.get(prefix)
        for k, v in node.items():
            path = f"{prefix}/{k}" if prefix else str(k)
            if keep is None or isinstance(v, Mapping):
                out[k] = walk(v, path)
                continue
            v = np.asarray(v)
            if k in ("query", "key", "value"):  # [e, h, d]
                v = v[:, keep]
            elif k in ("out", "query_bias", "key_bias", "value_bias", "wo") or (
                    k.startswith("wi_") and k.endswith("_bias")):  # [h, ...] / [m, ...] / [m]
                v = v[keep]
            elif k.startswith("wi_"):  # [e, m]
                v = v[:, keep]
            elif k == "rel_embedding":  # [buckets, h]
                v = v[:, keep]
            elif k not in ("out_bias", "wo_bias"):  # [e]: untouched
                raise ValueError(f"structured pruning: no rule for parameter {path}")
            out[k] = v
        if keep is not None:
            if "wo" in node:
                units = len(keep)
            else:
                heads = len(keep)
        return out

    new = walk(unrolled, "")
    if cfg.scan_layers:
        new = jax.tree.map(np.asarray, stack_layers(new))
    return new, dataclasses.replace(cfg, num_heads=heads or cfg.num_heads,
                                    mlp_dim=units or cfg.mlp_dim)


def prune_structured(params: PyTree, model_cfg: ModelConfig, fraction: float,
                     importance: PyTree | None = None, multiple_of: int = 1
                     ) -> tuple[PyTree, ModelConfig]:
    """Removes ``fraction`` of the attention heads and of the MLP hidden units of every
    layer, by importance, and returns the physically smaller model: ``(params, cfg)`` with
    ``num_heads`` and ``mlp_dim`` reduced (params as host numpy arrays, in the input's
    layout). The relative position tables lose the removed heads' columns, gated MLPs drop
    the same units from every ``wi_i``, and biases are sliced with their weights; adapters,
    norms and embeddings are kept. See :func:`plan_structured` for the choice and the
    arguments. The result computes what the full model computes with the removed heads'
    ``out`` rows and the removed units' ``wo`` rows set to zero.
    """
    plan = plan_structured(params, model_cfg, fraction, importance, multiple_of)
    return apply_plan(params, model_cfg, plan)


# ---------------------------------------------------------------- a model directory

def prune_model(model_dir: str, out_dir: str, sparsity: float | None = None,
                structured: float | None = None, multiple_of: int = 1) -> dict:
    """Writes ``model_dir``'s model pruned to the new directory ``out_dir`` (`jaxmt prune`):
    with ``sparsity``, the smallest weights of every target matrix zeroed
    (:func:`magnitude_prune_params`; the same shapes, so the same size and speed); with
    ``structured``, that fraction of heads and MLP units removed (:func:`prune_structured`).
    LoRA factors are merged first; ``model_dir`` is only read.

    Returns:
      A summary: parameter counts, heads and MLP units before and after, and the zeros'
      share among the target weights.
    """
    from jaxmt.inference.export import write_model
    from jaxmt.inference.translator import Translator

    if (sparsity is None) == (structured is None):
        raise ValueError("give exactly one of sparsity and structured")
    tr = Translator.from_pretrained(model_dir, merge_lora=True)
    cfg = tr.model.cfg
    params = tr.params
    count = lambda tree: sum(int(x.size) for x in jax.tree.leaves(tree))  # noqa: E731
    summary = {"params_before": count(params), "num_heads_before": cfg.num_heads,
               "mlp_dim_before": cfg.mlp_dim}
    if structured is not None:
        params, cfg = prune_structured(jax.device_get(params), cfg, structured,
                                       multiple_of=multiple_of)
        how = {"structured": structured, "multiple_of": multiple_of}
    else:
        params = jax.device_get(magnitude_prune_params(params, sparsity))
        how = {"sparsity": sparsity}
    chosen = target_paths(params)
    flat = {param_tree.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    zeros = sum(int(np.sum(np.asarray(flat[p]) == 0)) for p in chosen)
    write_model(model_dir, out_dir, cfg, params,
                {"pruned_from": os.path.abspath(model_dir), "prune": how})
    return dict(summary, params_after=count(params), num_heads_after=cfg.num_heads,
                mlp_dim_after=cfg.mlp_dim,
                target_sparsity=zeros / max(sum(flat[p].size for p in chosen), 1))
