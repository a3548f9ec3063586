"""Stopping cleanly on SIGTERM (preemption) or SIGINT (Ctrl-C): save, then exit 0.

Preemptible TPU and GPU machines get SIGTERM some seconds before they are taken
away. :class:`StopSignals` turns the first SIGTERM or SIGINT into a request that the
training loop checks after every step: it saves a checkpoint at the step it has
reached, waits for the save and returns, so a rerun resumes exactly there.

One process installs its own handlers. With several processes (``jax.distributed``)
SIGTERM belongs to JAX's preemption service, which agrees on one step for all
processes (``multihost_utils.reached_preemption_sync_point``, as Orbax and MaxText
use it); a SIGINT on any process is agreed at the loop's log interval instead, where
the processes sync anyway.
"""

from __future__ import annotations

import signal
import sys
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils


class StopSignals:
    """A context manager: the first SIGTERM/SIGINT asks the loop to save and stop.

    A second SIGINT stops at once (``KeyboardInterrupt``), for a user who does not
    want to wait for the save. Handlers are restored on exit.
    """

    def __init__(self):
        self.received: str | None = None  # the signal's name, once one arrived here
        self._old: dict[int, object] = {}
        self._multi = False

    def __enter__(self) -> StopSignals:
        self._multi = jax.process_count() > 1
        if threading.current_thread() is not threading.main_thread():
            return self  # Python delivers signals to the main thread only
        sigs = [signal.SIGINT] if self._multi else [signal.SIGTERM, signal.SIGINT]
        for sig in sigs:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: do not wait for the save
        self.received = name
        print(f"\n{name} received: saving a checkpoint after the current step"
              f"{' (Ctrl-C again to stop without saving)' if signum == signal.SIGINT else ''}",
              file=sys.stderr, flush=True)

    def should_stop(self, step: int, synced: bool) -> bool:
        """Whether to save and stop after ``step`` (the steps done so far).

        Args:
          step: the loop's step count; with several processes every process must call
            this at every step with the same counts.
          synced: this is a step where the processes sync anyway (the log interval):
            a SIGINT seen by any process is agreed here.
        """
        if not self._multi:
            return self.received is not None
        if multihost_utils.reached_preemption_sync_point(step):
            self.received = self.received or "SIGTERM"
            return True
        if synced:
            flags = multihost_utils.process_allgather(np.int32(self.received is not None))
            if np.any(flags):
                self.received = self.received or "SIGINT"
                return True
        return False
