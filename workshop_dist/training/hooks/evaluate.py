"""Validation every ``cadence.eval_every`` steps (or at each epoch's end), and the run's best metric.

The best value of ``checkpoint.best_metric`` (``val/loss`` by default; ``val/fid`` from the FID
hook, or any ``val/*`` metric, lowest or highest by ``best_mode``) lives in a :class:`Best`
shared by the hooks that produce metrics; checkpoints store it in the state's ``best_loss`` and
the checkpoint hook, which plans a save after every evaluation, keeps the best checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from workshop_dist.config import WorkshopError
from workshop_dist.training import evaluation
from workshop_dist.training.engine import Engine
from workshop_dist.training.hooks import earliest, next_multiple
from workshop_dist.training.hooks.log import MetricSink


class Best:
    """The best value of the run's best metric so far, and its step (None: known only from a checkpoint)."""

    def __init__(self, metric: str = "val/loss", mode: str = "min"):
        self.metric, self.mode = metric, mode
        self.step: int | None = None
        self.loss = self.worst  # the name of the original API (Trainer.best_loss), whatever the metric

    @property
    def worst(self) -> float:
        return math.inf if self.mode == "min" else -math.inf

    def reset(self, value: float, step: int | None = None) -> None:
        """Take ``value`` (say from a checkpoint's ``best_loss``); NaN or the other infinity: nothing yet."""
        self.loss = value if math.isfinite(value) else self.worst
        self.step = step

    def offer(self, step: int, metrics: Mapping[str, float]) -> bool:
        """Take ``metrics[self.metric]`` at ``step`` if it is better; whether it was."""
        if self.metric not in metrics:
            return False
        value = float(metrics[self.metric])
        if math.isnan(value):
            raise WorkshopError(f"{self.metric} is NaN at step {step}: it cannot pick the best checkpoint.")
        better = value < self.loss if self.mode == "min" else value > self.loss
        if better:
            self.loss, self.step = value, step
        return better

    def check(self, produced: set[str]) -> None:
        """A best metric no hook logs is an error naming those that are."""
        if self.metric not in produced:
            raise WorkshopError(
                f"training.checkpoint.best_metric={self.metric} is not a logged validation metric; this run logs "
                f"{', '.join(sorted(produced))} (val/fid or val/fd need eval.fid_every)"
            )


class EvaluateHook:
    """Evaluates on ``data`` at its steps; keeps every result (``history``) and offers it to ``best``."""

    kind = "eval"

    def __init__(
        self, engine: Engine, data: Any, *, batch_size: int, every: int | None, sink: MetricSink, max_in_flight: int = 2,
        best: Best | None = None,
    ):
        self.engine, self.data, self.batch_size, self.every = engine, data, batch_size, every
        self.sink, self.max_in_flight = sink, max_in_flight
        self.epoch_length: int | None = None  # set by Trainer.fit when evaluating at each epoch's end
        self.history: list[dict[str, float]] = []
        self.best = best or Best()
        self.last_step: int | None = None
        self.extra_metrics: set[str] = set()  # what other hooks log under val/ (the FID hook's val/fid)

    def next_step(self, step: int) -> int | None:
        if self.data is None:
            return None
        return earliest(next_multiple(step, self.every), next_multiple(step, self.epoch_length))

    def __call__(self, info: Any) -> None:
        self.run(info.step, info.state)

    def run(self, step: int, state: Any) -> dict[str, float]:
        """Evaluate ``state`` as of ``step``: log ``val/*``, remember it, offer it to the best metric."""
        metrics = evaluation.evaluate(self.engine, state, self.data, self.batch_size, self.max_in_flight)
        if not self.history:
            self.best.check({f"val/{name}" for name in metrics} | self.extra_metrics)
        self.last_step = step
        self.history.append({"step": step, **metrics})
        self.sink.write(step, metrics, "val")
        self.best.offer(step, {f"val/{name}": value for name, value in metrics.items()})
        return metrics

    def loss_at(self, step: int) -> float | None:
        """The validation loss of the evaluation at ``step``, if there was one."""
        return next((row["loss"] for row in reversed(self.history) if row["step"] == step), None)
