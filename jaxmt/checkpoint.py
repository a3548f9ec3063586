"""Orbax checkpointing: async saves, keep-N, resume with fallback, params-only restores.

A checkpoint holds three items: ``params``, ``opt_state`` and ``meta`` (JSON: step,
data position, anything small). Orbax writes each step into a temporary directory
and renames it when complete, so a crash or ``kill -9`` never leaves a half-written
step visible; leftover temporary directories are removed by the next writer.
Restoring takes abstract arrays carrying the *target* shardings, so a checkpoint
restores onto any mesh. An imported model (``jaxmt convert``) has a params-only
checkpoint: ``params`` and ``meta``, no ``opt_state``.

A step can still go bad after it was written (a truncated or deleted file, garbage
bytes, a missing item): TensorStore checksums its chunks, so such a step fails to
restore rather than restoring wrong values. :meth:`Checkpointer.restore_latest` then
falls back to the newest readable step, with a warning naming the bad step and why.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sys
import time
from typing import Any, Callable, TypeVar

import jax
import orbax.checkpoint as ocp

PyTree = Any
T = TypeVar("T")
ITEMS = ("params", "opt_state", "meta")
UNREADABLE_DIR = "unreadable_checkpoints"  # beside checkpoints/: steps set aside, kept


class CheckpointError(ValueError):
    """A model directory's checkpoints cannot be read, or a save failed."""


def checkpoint_dir(model_dir: str) -> str:
    return os.path.join(os.path.abspath(model_dir), "checkpoints")


def _reason(e: BaseException) -> str:
    """An exception as one short line (TensorStore's messages run to pages)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` with jaxmt's three items.

    Args:
      model_dir: the model directory; checkpoints live in ``model_dir/checkpoints``.
      keep: how many of the newest steps to keep.
      async_save: save in a background thread (training); the next save or
        :meth:`wait` waits for it.
      read_only: inference: create nothing and write nothing (an error when there is
        no ``checkpoints`` directory).
    """

    def __init__(self, model_dir: str, keep: int = 2, async_save: bool = True,
                 read_only: bool = False):
        self.directory = checkpoint_dir(model_dir)
        self.read_only = read_only
        self._in_flight: int | None = None  # the step an unfinished save writes
        if read_only and not os.path.isdir(self.directory):
            raise FileNotFoundError(f"{self.directory}: no checkpoints there; train the model "
                                    "first (`jaxmt train`) or pass another --model_dir")
        # Orbax warns that a read-only directory is read-only on every open.
        quiet = lambda r: not str(r.msg).startswith("Given directory is read only")
        logging.getLogger("absl").addFilter(quiet)
        try:
            self.manager = self._open(keep, async_save)
        finally:
            logging.getLogger("absl").removeFilter(quiet)

    def _open(self, keep: int, async_save: bool) -> ocp.CheckpointManager:
        read_only = self.read_only
        return ocp.CheckpointManager(
            self.directory, item_names=ITEMS,
            # Read-only: Orbax warns unless the saving options are unset too.
            options=ocp.CheckpointManagerOptions(
                max_to_keep=None if read_only else keep, create=not read_only,
                read_only=read_only, save_interval_steps=0 if read_only else 1,
                enable_async_checkpointing=async_save and not read_only,
                cleanup_tmp_directories=not read_only))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every committed step, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def save(self, step: int, params: PyTree, opt_state: PyTree, meta: dict) -> None:
        self._save(step, ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta)))

    def save_params(self, step: int, params: PyTree, meta: dict) -> None:
        """Parameters and meta only: a model for inference, e.g. an imported checkpoint."""
        self._save(step, ocp.args.Composite(
            params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)))

    def _save(self, step: int, args: ocp.args.Composite) -> None:
        # An async save's failure (e.g. a full disk) surfaces when it is waited for.
        self.wait()
        with self._save_errors(step):
            self.manager.save(step, args=args)
        self._in_flight = step

    @contextlib.contextmanager
    def _save_errors(self, step: int):
        """Any failure to save becomes a CheckpointError that says what is still safe."""
        try:
            yield
        except Exception as e:
            # TensorStore reports ENOSPC as RESOURCE_EXHAUSTED with the OS error code.
            full = (isinstance(e, OSError) and e.errno == errno.ENOSPC) or any(
                m in str(e) for m in ("No space left", "os_error_code='28'", "RESOURCE_EXHAUSTED"))
            self._in_flight = None
            if jax.process_index() == 0:  # free the space the failed step took
                for name in os.listdir(self.directory):
                    if name.startswith(f"{step}.orbax-checkpoint-tmp"):
                        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
            good = ", ".join(map(str, self.all_steps())) or "none"
            raise CheckpointError(
                f"saving checkpoint step {step} in {self.directory} "
                f"failed: {'the disk is full' if full else _reason(e)}; the committed steps "
                f"({good}) are intact: free space or fix the cause, then rerun to resume "
                "from the newest") from e

    def restore(self, step: int, abstract_params: PyTree, abstract_opt_state: PyTree
                ) -> tuple[PyTree, PyTree, dict]:
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            opt_state=ocp.args.StandardRestore(abstract_opt_state),
            meta=ocp.args.JsonRestore()))
        meta = dict(out["meta"])
        _check_meta(self.directory, step, meta)
        return out["params"], out["opt_state"], meta

    def restore_params(self, step: int, abstract_params: PyTree) -> PyTree:
        """Only the parameters (inference does not need the optimizer state)."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore()))
        _check_meta(self.directory, step, dict(out["meta"]))
        return out["params"]

    def restore_latest(self, restore_fn: Callable[[int], T]) -> tuple[int, T] | None:
        """``(step, restore_fn(step))`` for the newest step that restores.

        A step that fails (a truncated, missing or garbled file, a missing item) is
        reported on stderr with the reason, and the next older step is tried.

        Returns:
          None when there is no committed step at all.

        Raises:
          CheckpointError: steps exist but none restores; lists each step's reason.
            Never a silent start from scratch over existing checkpoints.
        """
        steps = self.all_steps()
        failed = []
        for i, step in enumerate(steps):
            try:
                return step, restore_fn(step)
            except Exception as e:  # TensorStore raises bare Exceptions too
                failed.append((step, _reason(e)))
                then = f"falling back to step {steps[i + 1]}" if i + 1 < len(steps) else ""
                print(f"warning: checkpoint step {step} in {self.directory} is unreadable "
                      f"({failed[-1][1]}){'; ' + then if then else ''}", file=sys.stderr,
                      flush=True)
        if not failed:
            return None
        raise CheckpointError(
            f"{self.directory}: no readable checkpoint: " + "; ".join(
                f"step {s}: {r}" for s, r in failed) + ". Restore the files from a backup, or "
            "move the checkpoints directory away to start again")

    def restore_latest_params(self, abstract_params: PyTree) -> tuple[int, PyTree]:
        """The newest readable step's parameters (see :meth:`restore_latest`)."""
        found = self.restore_latest(lambda s: self.restore_params(s, abstract_params))
        if found is None:
            raise CheckpointError(f"{self.directory}: no checkpoint there; train the model "
                                  "first (`jaxmt train`) or pass another --model_dir")
        return found

    def set_aside(self, steps: list[int]) -> str:
        """Moves unreadable ``steps`` out of ``checkpoints/`` (kept, never deleted), so a
        resumed run can save those step numbers again. Process 0 moves; all reload."""
        model_dir = os.path.dirname(self.directory)
        dest = os.path.join(model_dir, UNREADABLE_DIR)
        if jax.process_index() == 0 and steps:
            os.makedirs(dest, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for s in steps:
                shutil.move(os.path.join(self.directory, str(s)),
                            os.path.join(dest, f"{s}-{stamp}"))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("jaxmt:set_aside")
        self.manager.reload()
        return dest

    def wait(self) -> None:
        """Waits for an async save; its failure raises a :class:`CheckpointError`."""
        if self._in_flight is None:
            return
        with self._save_errors(self._in_flight):
            self.manager.wait_until_finished()
        self._in_flight = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


def _check_meta(directory: str, step: int, meta: dict) -> None:
    if meta.get("step", step) != step:
        raise CheckpointError(f"{directory}/{step}: its meta says step {meta.get('step')!r}")


def save_params(model_dir: str, params: PyTree, meta: dict) -> None:
    """Writes a params-only checkpoint at step ``meta["step"]`` and waits for it."""
    ckpt = Checkpointer(model_dir, keep=1, async_save=False)
    ckpt.save_params(int(meta["step"]), params, meta)
    ckpt.close()


def abstract_like(tree: PyTree, shardings: PyTree) -> PyTree:
    """ShapeDtypeStructs carrying the given shardings, as Orbax restore targets."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
