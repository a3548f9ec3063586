"""The training loop: steps, metrics (TensorBoard, progress bar), checkpoints.

:func:`train_loop` drives a :class:`jaxmt.train.trainer.Trainer` over a batch
iterator; :func:`jaxmt.train.run.train` builds both from the run's configs.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterator

import jax
import numpy as np

from jaxmt.checkpoint import CheckpointError, Checkpointer
from jaxmt.train import loss_scale as scaling
from jaxmt.train.budget import WallClockBudget
from jaxmt.train.preemption import StopSignals
from jaxmt.train.trainer import Trainer, TrainState


class MetricWriter:
    """TensorBoard event files under ``model_dir/train`` (process 0 only)."""

    def __init__(self, model_dir: str):
        self._writer = None
        self._warned = False
        if jax.process_index() == 0:
            # tensorboardX imports torch when it is installed (2 s per run start) only to
            # accept torch tensors; jaxmt logs floats, so hide torch from that import.
            hide = "torch" not in sys.modules
            if hide:
                sys.modules["torch"] = None
            try:
                from tensorboardX import SummaryWriter
            finally:
                if hide:
                    del sys.modules["torch"]
            self._writer = SummaryWriter(os.path.join(model_dir, "train"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer is None:
            return
        try:
            for k, v in values.items():
                self._writer.add_scalar(k, v, step)
            self._writer.flush()
        except OSError as e:  # e.g. a full disk: the next checkpoint save reports it
            if not self._warned:
                print(f"warning: step {step}: could not write TensorBoard events "
                      f"({e}); training goes on", file=sys.stderr, flush=True)
                self._warned = True

    def close(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except OSError:
                pass  # already warned about in scalars()


def checkpoint_meta(state: TrainState, meta: dict | None, step: int) -> dict:
    """The JSON item of a checkpoint: ``meta``, the step, and the loss scale if any."""
    out = dict(meta or {}, step=step)
    if state.loss_scale is not None:
        out["loss_scale"] = scaling.to_json(state.loss_scale)
    return out


class NonFiniteError(ValueError):
    """Too many consecutive steps had a non-finite loss or gradients: a diverged run
    (a ValueError, like other bad settings: the CLI reports it in one line)."""


def train_loop(trainer: Trainer, batches: Iterator[dict[str, np.ndarray]], model_dir: str,
               ckpt: Checkpointer, state: TrainState, start_step: int,
               meta: dict | None = None, progress: bool = True,
               data_position: dict | None = None,
               train_seconds: float = 0.0) -> tuple[TrainState, dict]:
    """Runs from ``start_step`` to ``trainer.cfg.steps``; returns final state and metrics.

    With ``TrainConfig.max_minutes`` (:class:`~jaxmt.train.budget.WallClockBudget`), it
    stops earlier when the budget is spent (``train_seconds`` were spent by earlier runs),
    saves that step and sets ``metrics["budget_spent_at"]``; at each log step it moves the
    learning rate's horizon to the step the budget is expected to end at.

    ``data_position`` is the position of ``batches`` at ``start_step`` (a
    :func:`jaxmt.data.pipeline.position_record`). Every checkpoint then stores it as
    ``meta["data"]``, advanced by the batches taken since (one per step), so a resumed
    run restarts the stream where this one stopped.

    On SIGTERM or SIGINT (:class:`~jaxmt.train.preemption.StopSignals`) the loop saves
    the step it has reached, waits for the save and returns early, with
    ``metrics["stopped_by"]`` and ``metrics["stopped_at"]`` set.

    Raises:
      NonFiniteError: ``TrainConfig.max_nonfinite_steps`` steps in a row were skipped
        for a non-finite loss or gradients. Each skipped step kept the parameters.
      CheckpointError: a save failed, or the parameters are no longer finite (such a
        checkpoint is never written).
    """
    from tqdm import tqdm

    cfg = trainer.cfg
    step_fn = trainer.step_fn()
    rng = jax.random.PRNGKey(cfg.seed + 1)
    writer = MetricWriter(model_dir)
    budget = WallClockBudget(cfg.max_minutes, cfg.steps, train_seconds)
    horizon = int(state.lr_horizon) if state.lr_horizon is not None else cfg.steps
    bar = tqdm(total=horizon if budget.active else cfg.steps, initial=start_step, desc="train",
               unit="step", disable=not progress or jax.process_index() != 0, dynamic_ncols=True)
    last = {}
    t0, tok_acc, steps_acc = time.perf_counter(), 0, 0
    src_slots = tgt_slots = 0  # token slots of the steps since the last log (for fill)
    skipped_total = 0  # steps skipped for a non-finite loss or gradients in this run
    nonfinite = []  # the current run of consecutive skipped steps
    pending = []
    saved = start_step

    def save(done: int) -> None:
        if not trainer.params_finite(state.params):  # never write a diverged model
            raise CheckpointError(
                f"step {done}: the parameters are not finite, so no checkpoint was written; "
                f"the last good checkpoint is {_last_good(ckpt)}")
        step_meta = dict(meta or {}, train_seconds=round(budget.spent(), 3),
                         lr_horizon=horizon)
        if data_position is not None:
            step_meta = dict(step_meta, data=dict(
                data_position, batches=data_position["batches"] + done - start_step))
        ckpt.save(done, trainer.checkpoint_params(state.params), state.opt_state,
                  checkpoint_meta(state, step_meta, done))

    try:
        with StopSignals() as signals:
            for step in range(start_step, cfg.steps):
                local = next(batches)
                # Bucketed batches change shape from step to step: the global rows are this
                # host's times the process count (every host gets the same shape each step).
                rows = local["encoder_input_tokens"].shape[0] * jax.process_count()
                batch = trainer.partitioner.shard_batch(local, rows)
                # Token slots of each step's global batch, for the non-padding share (fill).
                src_slots += int(np.prod(batch["encoder_input_tokens"].shape))
                tgt_slots += int(np.prod(batch["decoder_target_tokens"].shape))
                state, metrics = step_fn(state, batch, rng)
                if step == start_step and budget.active:  # the compile is over: time steps
                    jax.block_until_ready(metrics["loss"])
                    budget.start_rate(step + 1)
                if pending:  # keep one step in flight, so the bar's steps/s and ETA are real
                    _count_nonfinite(pending[-1], step - 1, nonfinite, cfg, ckpt)
                pending.append(metrics)
                bar.update(1)
                steps_acc += 1
                done = step + 1
                log_now = done % cfg.log_every == 0 or done == cfg.steps
                if log_now:
                    host = [jax.device_get(m) for m in pending]  # one sync per log interval
                    _count_nonfinite(host[-1], step, nonfinite, cfg, ckpt)
                    pending = []
                    dt = time.perf_counter() - t0
                    tok_acc = sum(float(m["tokens"]) + float(m["source_tokens"]) for m in host)
                    ntok = sum(float(m["tokens"]) for m in host)
                    skipped = sum(int(m["skipped"]) for m in host)
                    skipped_total += skipped
                    last = {"loss": sum(float(m["loss_sum"]) for m in host) / max(ntok, 1.0),
                            "nll": sum(float(m["nll_sum"]) for m in host) / max(ntok, 1.0),
                            "accuracy": sum(float(m["correct"]) for m in host) / max(ntok, 1.0),
                            "grad_norm": float(host[-1]["grad_norm"]),
                            "learning_rate": float(host[-1]["learning_rate"]),
                            "tokens_per_s": tok_acc / dt, "steps_per_s": steps_acc / dt,
                            # Share of non-padding tokens: source tokens, loss-weighted targets.
                            "src_fill": sum(float(m["source_tokens"]) for m in host)
                            / max(src_slots, 1),
                            "tgt_fill": ntok / max(tgt_slots, 1),
                            # Batch shapes compiled so far (one with packing; <= buckets).
                            "compiled_shapes": trainer.compiled_shapes(),
                            # Non-finite loss or gradients: in this interval, and in this run.
                            "skipped_steps": skipped, "skipped_steps_total": skipped_total}
                    src_slots = tgt_slots = 0
                    postfix = dict(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}",
                                   lr=f"{last['learning_rate']:.2e}",
                                   fill=f"{last['src_fill']:.2f}/{last['tgt_fill']:.2f}",
                                   skipped=skipped_total)
                    for key in ("ce", "kd", "kd_covered"):  # distillation's terms
                        if f"{key}_sum" in host[-1]:
                            last[key] = sum(float(m[f"{key}_sum"]) for m in host) / max(ntok, 1.0)
                    if "kd" in last:
                        postfix.update(ce=f"{last['ce']:.3f}", kd=f"{last['kd']:.3f}")
                    if "sparsity" in host[-1]:  # magnitude pruning: zeros among the targets
                        last["sparsity"] = float(host[-1]["sparsity"])
                        postfix.update(sparsity=f"{last['sparsity']:.3f}")
                    if trainer.loss_scaling:
                        last["loss_scale"] = float(host[-1]["loss_scale"])
                        postfix.update(scale=f"{last['loss_scale']:g}")
                    if budget.active:
                        budget.sync(done)
                        new = budget.horizon(done)
                        if new is not None and new != horizon:
                            horizon = new
                            state = trainer.with_lr_horizon(state, horizon)
                            bar.total = horizon  # the bar's ETA is the budget's end
                        last.update(train_minutes=budget.spent() / 60, lr_horizon=horizon)
                    writer.scalars(done, last)
                    bar.set_postfix(**postfix)
                    t0, steps_acc = time.perf_counter(), 0
                if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                    save(done)
                    saved = done
                if done < cfg.steps and budget.over(synced=log_now):
                    if saved != done:
                        save(done)
                    bar.close()
                    print(f"stopped at step {done}: TrainConfig.max_minutes="
                          f"{cfg.max_minutes:g} spent; saved checkpoint step {done} in "
                          f"{ckpt.directory}", flush=True)
                    last = dict(last, budget_spent_at=done,
                                train_minutes=budget.spent() / 60)
                    break
                if done < cfg.steps and signals.should_stop(done, synced=log_now):
                    if saved != done:
                        save(done)
                    t_save = time.perf_counter()
                    ckpt.wait()
                    waited = time.perf_counter() - t_save
                    bar.close()
                    where = f"checkpoint step {done} in {ckpt.directory}"
                    print(f"{signals.received}: stopped at step {done}; saved {where} "
                          f"(waited {waited:.1f}s); rerun the same command to resume",
                          file=sys.stderr, flush=True)
                    if waited > cfg.preemption_grace_s:
                        print(f"warning: the save took {waited:.0f}s, over "
                              f"TrainConfig.preemption_grace_s={cfg.preemption_grace_s:g}; a "
                              "preempted machine may be gone before it ends", file=sys.stderr,
                              flush=True)
                    last = dict(last, stopped_by=signals.received, stopped_at=done)
                    break
    finally:  # on an error too: end the bar's line before the error is printed
        bar.close()
        writer.close()
    ckpt.wait()
    return state, last


def _last_good(ckpt: Checkpointer) -> str:
    step = ckpt.latest_step()
    return f"step {step} in {ckpt.directory}" if step is not None else "none (no checkpoint yet)"


def _count_nonfinite(metrics: dict, step: int, run: list, cfg, ckpt: Checkpointer) -> None:
    """Tracks consecutive skipped steps (``step`` is 0-based); too many is an error."""
    if not int(metrics["skipped"]):
        run.clear()
        return
    run.append(step)
    if len(run) >= cfg.max_nonfinite_steps:
        raise NonFiniteError(
            f"steps {run[0] + 1}-{run[-1] + 1}: the loss or gradients were not finite "
            f"{len(run)} times in a row (TrainConfig.max_nonfinite_steps="
            f"{cfg.max_nonfinite_steps}); the parameters are those of step {run[0]}, and the "
            f"last good checkpoint is {_last_good(ckpt)}. Lower the learning rate, raise "
            "warmup_steps or use precision='bf16' or 'fp32', then resume")
