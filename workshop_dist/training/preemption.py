"""Preemption: turn SIGTERM/SIGINT into a save-and-exit at a step boundary all processes agree on.

Single process: a Python signal handler sets a flag, checked at each step boundary.
Several processes: JAX's preemption sync manager (started by ``jax.distributed.initialize``)
catches SIGTERM and picks the same step on every host; SIGINT is turned into SIGTERM so it
takes the same path. A second signal while the save runs changes nothing: the flag is
already set and the save completes.
"""

from __future__ import annotations

import logging
import os
import signal
import types

import jax

log = logging.getLogger("workshop_dist")
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later" - rerun the same command to resume


class Preempted(Exception):
    """Raised by the trainer after the preemption checkpoint is safely on disk."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"preempted by {signal_name} at step {step}; checkpoint saved")
        self.step = step
        self.signal_name = signal_name


class PreemptionWatcher:
    """Install with :meth:`install`; ask :meth:`reached` at every step boundary (same step on all hosts)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}
        self._multiprocess = False

    def install(self) -> PreemptionWatcher:
        self._multiprocess = jax.process_count() > 1
        signals = [signal.SIGINT] if self._multiprocess else [signal.SIGTERM, signal.SIGINT]
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is None:
            log.warning("Received %s: will save a checkpoint at the next step and exit.", name)
        self.signal_name = self.signal_name or name
        if self._multiprocess:
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's sync manager listens for SIGTERM

    def reached(self, step: int) -> bool:
        """True at the step where this run must save and stop."""
        if self._multiprocess:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.signal_name = self.signal_name or "SIGTERM"
                return True
            return False
        return self.signal_name is not None
