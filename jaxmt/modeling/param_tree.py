"""Parameter trees addressed by path: ``"encoder/layers_0/attention/query"``.

What freezing (``TrainConfig.trainable``), trainable-only checkpoints and loading a base
under new adapters need: the paths of a tree, the part of it some paths select, and a
part put back in place.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import jax

PyTree = Any


def path_str(path) -> str:
    """A tree path as ``"encoder/layers_0/attention/query"``: dict keys only, so a
    parameter has the same path boxed (``nn.LogicallyPartitioned``) or not."""
    return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def paths(tree: PyTree) -> set[str]:
    return {path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def subset(tree: PyTree, keep: set[str]) -> PyTree:
    """The nested dict ``tree`` restricted to the leaves whose path is in ``keep``
    (empty dicts dropped)."""
    def walk(node, prefix):
        if not isinstance(node, dict):
            return node if prefix in keep else None
        out = {}
        for k, v in node.items():
            sub = walk(v, f"{prefix}/{k}" if prefix else str(k))
            if sub is not None and not (isinstance(sub, dict) and not sub):
                out[k] = sub
        return out
    return walk(tree, "")


def overlay(tree: PyTree, part: PyTree) -> PyTree:
    """``tree`` with the leaves of the nested dict ``part`` put in their places."""
    if not isinstance(part, dict):
        return part
    out = dict(tree)
    for k, v in part.items():
        if k not in out:
            raise KeyError(f"parameter {k!r} is not in the model")
        out[k] = overlay(out[k], v)
    return out


def matching(all_paths: Iterable[str], patterns: Iterable[str]) -> set[str]:
    """The paths that one of the regular expressions ``patterns`` matches whole."""
    regs = [re.compile(p) for p in patterns]
    return {p for p in all_paths if any(r.fullmatch(p) for r in regs)}


def trainable_paths(all_paths: set[str], train_cfg, model_cfg) -> set[str]:
    """The parameter paths that train (of a :class:`~jaxmt.config.TrainConfig` and
    :class:`~jaxmt.config.ModelConfig`): those ``TrainConfig.trainable`` matches; by
    default all, or with adapters or LoRA only theirs (the base stays frozen).

    Raises:
      ValueError: the patterns match no parameter (with a few paths to choose from).
    """
    if train_cfg.trainable:
        chosen = matching(all_paths, train_cfg.trainable)
        if not chosen:
            raise ValueError(f"TrainConfig.trainable: {list(train_cfg.trainable)} match no "
                             f"parameter path; paths look like {sorted(all_paths)[:4]}")
        return chosen
    if model_cfg.adapter.size or model_cfg.lora.rank:
        from jaxmt.modeling.adapters import is_added_param
        return {p for p in all_paths if is_added_param(p)}
    return set(all_paths)


def assemble(abstract: PyTree, *parts: PyTree) -> PyTree:
    """The full tree ``abstract`` describes, from ``parts`` that together hold every leaf
    (later parts win): e.g. a frozen base's parameters and the trained ones over it.

    Raises:
      ValueError: a leaf no part holds, named.
    """
    out = abstract
    for part in parts:
        out = overlay(out, part)
    missing = [path_str(p) for p, x in jax.tree_util.tree_flatten_with_path(out)[0]
               if isinstance(x, jax.ShapeDtypeStruct)]
    if missing:
        raise ValueError(f"parameters neither in the base nor in the checkpoint: {missing[:4]}")
    return out

