"""Orbax checkpointing: async saves, keep-N, resume, and params-only restores.

A checkpoint holds three items: ``params``, ``opt_state`` and ``meta`` (JSON: step,
data position, anything small). Orbax writes each step into a temporary directory
and renames it when complete, so a crash never leaves a half-written step visible.
Restoring takes abstract arrays carrying the *target* shardings, so a checkpoint
restores onto any mesh. An imported model (``jaxmt convert``) has a params-only
checkpoint: ``params`` and ``meta``, no ``opt_state``.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

PyTree = Any
ITEMS = ("params", "opt_state", "meta")


def checkpoint_dir(model_dir: str) -> str:
    return os.path.join(os.path.abspath(model_dir), "checkpoints")


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` with jaxmt's three items."""

    def __init__(self, model_dir: str, keep: int = 2, async_save: bool = True):
        self.directory = checkpoint_dir(model_dir)
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=ITEMS,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=async_save))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params: PyTree, opt_state: PyTree, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta)))

    def save_params(self, step: int, params: PyTree, meta: dict) -> None:
        """Parameters and meta only: a model for inference, e.g. an imported checkpoint."""
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)))

    def restore(self, step: int, abstract_params: PyTree, abstract_opt_state: PyTree
                ) -> tuple[PyTree, PyTree, dict]:
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            opt_state=ocp.args.StandardRestore(abstract_opt_state),
            meta=ocp.args.JsonRestore()))
        return out["params"], out["opt_state"], dict(out["meta"])

    def restore_params(self, step: int, abstract_params: PyTree) -> PyTree:
        """Only the parameters (inference does not need the optimizer state)."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params)))
        return out["params"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def save_params(model_dir: str, params: PyTree, meta: dict) -> None:
    """Writes a params-only checkpoint at step ``meta["step"]`` and waits for it."""
    ckpt = Checkpointer(model_dir, keep=1, async_save=False)
    ckpt.save_params(int(meta["step"]), params, meta)
    ckpt.close()


def abstract_like(tree: PyTree, shardings: PyTree) -> PyTree:
    """ShapeDtypeStructs carrying the given shardings, as Orbax restore targets."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
