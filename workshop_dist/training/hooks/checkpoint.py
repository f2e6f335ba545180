"""Checkpoints: every ``cadence.save_every`` steps, after each evaluation that improves the best metric,
and on preemption (SIGTERM/SIGINT: all processes agree on a step, save, wait until it is on disk, exit 75).

Saves are async (Orbax): the loop waits only while the arrays are copied off the devices. The
preemption check runs at every call boundary (``next_step`` answers "now" once all processes
reached the agreed step), so the save lands at once even with ``steps_per_call`` > 1.
"""

from __future__ import annotations

import logging
from typing import Any

from workshop_dist.training import checkpointing
from workshop_dist.training.hooks import earliest, next_multiple
from workshop_dist.training.preemption import Preempted, PreemptionWatcher

log = logging.getLogger("workshop_dist")


class CheckpointHook:
    """Saves the state into ``checkpoints`` (None: no checkpoint directory; preemption still stops the run)."""

    kind = "save"

    def __init__(
        self,
        checkpoints: checkpointing.Checkpoints | None,
        contents: checkpointing.Contents,
        *,
        every: int,
        evaluation: Any,
        preemption: PreemptionWatcher | None,
        scores: list[Any] = (),
    ):
        """``evaluation`` and ``scores`` (the FID hook) produce the best metric: a save follows each of their runs."""
        self.checkpoints, self.contents, self.every = checkpoints, contents, every
        self.evaluation, self.preemption, self.scores = evaluation, preemption, list(scores)
        self.best = evaluation.best
        self.last_step: int | None = None  # of the last save to the workdir (the persistent tier)
        self.last_local_step: int | None = None  # of the last save at all (a persistent save writes both tiers)
        self._asked: tuple[int, bool] | None = None  # (step, preempted): the sync point is asked once per step

    def preempted(self, step: int) -> bool:
        if self.preemption is None:
            return False
        if self._asked is None or self._asked[0] != step:
            self._asked = (step, self.preemption.reached(step))
        return self._asked[1]

    def next_step(self, step: int) -> int | None:
        if self.preempted(step):
            return step  # now
        if self.checkpoints is None:
            return None
        local = self.checkpoints.local_every
        return earliest(next_multiple(step, self.every), self.evaluation.next_step(step),  # best saves follow evaluations
                        *(score.next_step(step) for score in self.scores), next_multiple(step, local))

    def __call__(self, info: Any) -> None:
        step, preempted = info.step, self.preempted(info.step)
        improved = self.best.step == step
        if self.checkpoints is not None and (preempted or improved or step % self.every == 0):
            self.save(step, info.state, info.clock.train_seconds, best_value=self.best.loss if improved else None)
        elif self.checkpoints is not None and self.checkpoints.local_every and step % self.checkpoints.local_every == 0:
            self.save(step, info.state, info.clock.train_seconds, persistent=False)  # the local tier only
        if preempted:
            if self.checkpoints is not None:
                self.checkpoints.manager.wait()
            log.info("Checkpoint for step %d is on disk; exiting for preemption.", step)
            raise Preempted(step, self.preemption.signal_name or "signal")

    def save(
        self, step: int, state: Any, train_seconds: float, *, best_value: float | None = None, persistent: bool = True
    ) -> Any:
        """An async save of ``state`` at ``step`` (once per step); ``best_value``: a new best metric value;
        ``persistent=False``: to the local tier only."""
        path = self.checkpoints.directory / str(step)
        if (self.last_step if persistent else self.last_local_step) != step:
            path = checkpointing.save(
                self.checkpoints, step, state, self.contents, best_loss=self.best.loss,
                train_seconds=train_seconds, best_value=best_value, persistent=persistent,
            )
            self.last_local_step = step
            if persistent:
                self.last_step = step
        return path
