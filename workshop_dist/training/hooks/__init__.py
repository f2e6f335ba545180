"""The training loop's periodic actions, one small file each (the protocol: :mod:`workshop_dist.training.loop`).

=========================  =================================================================
``log.LogHook``            training metrics to the trackers, the console and ``train_metrics``; the NaN policy
``evaluate.EvaluateHook``  validation every ``cadence.eval_every`` steps (or at each epoch's end); the best loss
``samples.SamplesHook``    a sample grid at each evaluation (``WORKDIR/samples/step_<N>.png``, TensorBoard)
``checkpoint.CheckpointHook``  periodic, best and preemption checkpoints (save, wait, exit)
``profile.ProfileHook``    a ``jax.profiler`` trace of ``cadence.profile_steps``
``runlog.RunLogHook``      where the time went, to ``WORKDIR/logs/run_events.jsonl`` (``--report``)
``Every``                  the easy form of a user hook: ``Every(fn, 100)`` calls ``fn(info)`` every 100 steps
=========================  =================================================================

A hook of your own is any object with ``next_step(step)`` and ``__call__(info)``; add it with
``Trainer.add_hook(hook)``, or a function with ``Trainer.add_hook(fn, every=N)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def next_multiple(step: int, every: int | None) -> int | None:
    """The first multiple of ``every`` after ``step`` (None when ``every`` is None or 0)."""
    return (step // every + 1) * every if every else None


def earliest(*steps: int | None) -> int | None:
    """The smallest of the given steps that are not None (None if all are)."""
    known = [step for step in steps if step is not None]
    return min(known) if known else None


class Every:
    """Calls ``fn(info)`` at every multiple of ``every`` steps (a :class:`~workshop_dist.training.loop.StepInfo`).

    ``kind`` names the clock phase its time counts as (kept out of step time).
    """

    def __init__(self, fn: Callable[[Any], None], every: int, *, kind: str = "hook"):
        if every < 1:
            raise ValueError(f"every must be a positive number of steps, got {every}")
        self.fn, self.every, self.kind = fn, every, kind

    def next_step(self, step: int) -> int | None:
        return next_multiple(step, self.every)

    def __call__(self, info: Any) -> None:
        self.fn(info)
