"""Where the time went, to ``WORKDIR/logs/run_events.jsonl`` (read by ``workshop-train --report``).

Writes each metric interval's training seconds (``train``) and every phase the clock recorded
(``compile``, ``eval`` with its validation loss, ``save``, ``restore``, ``sample``) with the
time it ended. Start and end events are the Trainer's (:meth:`RunLog.started`, :meth:`RunLog.ended`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from workshop_dist.runlog import KINDS, RunLog


class RunLogHook:
    """An observer: never due, it writes what each call's :class:`StepInfo` brings."""

    kind = "log"

    def __init__(self, runlog: RunLog, evaluation: Any = None, restored_tier: Callable[[], str | None] | None = None):
        """``restored_tier``: the checkpoint tier the last restore read (tiered checkpoints), for ``--report``."""
        self.runlog, self.evaluation, self.restored_tier = runlog, evaluation, restored_tier
        self._written = 0  # spans of the clock already written

    def next_step(self, step: int) -> None:
        return None

    def __call__(self, info: Any) -> None:
        del info

    def observe(self, info: Any) -> None:
        for interval in info.metrics:
            self.runlog.timed("train", interval.lap.train_seconds, interval.last_step)
        self.write_spans(info.clock)

    def write_spans(self, clock: Any) -> None:
        """The clock's phases not written yet (also those outside the loop: restores, the final save)."""
        spans = clock.spans[self._written :]
        self._written += len(spans)
        for span in spans:
            if span.kind in KINDS:
                loss = self.evaluation.loss_at(span.step) if span.kind == "eval" and self.evaluation else None
                tier = self.restored_tier() if span.kind == "restore" and self.restored_tier else None
                self.runlog.timed(span.kind, span.seconds, span.step, val_loss=loss, at=span.ended, tier=tier)
