"""A wall-clock budget for training (``TrainConfig.max_minutes``).

The budget counts the train loop's wall time across resumes (checkpoints store it as
``train_seconds``), like fairseq's ``--stop-time-hours``. From the measured step rate it
estimates the step at which the budget will run out; the loop gives that estimate to the
train state as its learning-rate horizon (:func:`jaxmt.train.trainer.learning_rate`), so
the cosine decay ends where the run ends instead of being cut off half-way.

With several processes, every decision (the horizon, the stop) comes from process 0's
clock, broadcast at log steps: each process must apply the same learning rate and stop
at the same step.
"""

from __future__ import annotations

import time

import jax
import numpy as np


class WallClockBudget:
    """Time spent training, the expected last step, and whether to stop."""

    def __init__(self, minutes: float, steps: int, spent_before: float = 0.0):
        """Args:
          minutes: the budget, ``TrainConfig.max_minutes``; 0 means none.
          steps: ``TrainConfig.steps``, the last step in any case.
          spent_before: seconds spent by earlier runs of this model directory.
        """
        self.limit_s = 60.0 * minutes
        self.steps = steps
        self._before = spent_before
        self._t0 = time.perf_counter()
        self._origin: tuple[float, int] | None = None  # (time, step) after the first compile
        self._agreed = (self.spent(), 0.0)  # (spent, steps/s), as of the last sync

    @property
    def active(self) -> bool:
        return self.limit_s > 0

    def spent(self) -> float:
        """Seconds of training so far, this run's and earlier runs'."""
        return self._before + time.perf_counter() - self._t0

    def start_rate(self, done: int) -> None:
        """Starts the step-rate clock at step ``done``, once the first step (and its
        compile, which the rate must not include) has finished."""
        if self._origin is None:
            self._origin = (time.perf_counter(), done)

    def sync(self, done: int) -> None:
        """At a log step: measures the rate and agrees on it and on the time spent."""
        rate = 0.0
        if self._origin is not None and done > self._origin[1]:
            rate = (done - self._origin[1]) / max(time.perf_counter() - self._origin[0], 1e-9)
        values = np.array([self.spent(), rate], np.float64)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            values = np.asarray(multihost_utils.broadcast_one_to_all(values))
        self._agreed = (float(values[0]), float(values[1]))

    def horizon(self, done: int) -> int | None:
        """The step the budget is expected to end at (as of the last :meth:`sync`),
        clipped to ``[done + 1, steps]``; None without a budget or a measured rate."""
        spent, rate = self._agreed
        if not self.active or rate <= 0:
            return None
        expected = done + (self.limit_s - spent) * rate
        return int(min(max(round(expected), done + 1), self.steps))

    def over(self, synced: bool) -> bool:
        """Whether the budget is spent. One process checks its clock at every step;
        several decide at log steps (``synced``), on process 0's clock."""
        if not self.active:
            return False
        if jax.process_count() == 1:
            return self.spent() >= self.limit_s
        return synced and self._agreed[0] >= self.limit_s
