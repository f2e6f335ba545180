"""Validation every ``cadence.eval_every`` steps (or at each epoch's end), and the best loss so far.

The best loss lives here, on the host; checkpoints store it in the state's ``best_loss`` and
the checkpoint hook, which plans a save at every evaluation step, keeps the best checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from workshop_dist.training import evaluation
from workshop_dist.training.engine import Engine
from workshop_dist.training.hooks import earliest, next_multiple
from workshop_dist.training.hooks.log import MetricSink


@dataclasses.dataclass(frozen=True)
class Best:
    """The lowest validation loss seen and its step (None: known only from a checkpoint)."""

    loss: float = float("inf")
    step: int | None = None


class EvaluateHook:
    """Evaluates on ``data`` at its steps; keeps every result (``history``) and the ``best`` one."""

    kind = "eval"

    def __init__(
        self, engine: Engine, data: Any, *, batch_size: int, every: int | None, sink: MetricSink, max_in_flight: int = 2
    ):
        self.engine, self.data, self.batch_size, self.every = engine, data, batch_size, every
        self.sink, self.max_in_flight = sink, max_in_flight
        self.epoch_length: int | None = None  # set by Trainer.fit when evaluating at each epoch's end
        self.history: list[dict[str, float]] = []
        self.best = Best()
        self.last_step: int | None = None

    def next_step(self, step: int) -> int | None:
        if self.data is None:
            return None
        return earliest(next_multiple(step, self.every), next_multiple(step, self.epoch_length))

    def __call__(self, info: Any) -> None:
        self.run(info.step, info.state)

    def run(self, step: int, state: Any) -> dict[str, float]:
        """Evaluate ``state`` as of ``step``: log ``val/*``, remember it, track the best loss."""
        metrics = evaluation.evaluate(self.engine, state, self.data, self.batch_size, self.max_in_flight)
        self.last_step = step
        self.history.append({"step": step, **metrics})
        self.sink.write(step, metrics, "val")
        if metrics["loss"] < self.best.loss:
            self.best = Best(metrics["loss"], step)
        return metrics

    def loss_at(self, step: int) -> float | None:
        """The validation loss of the evaluation at ``step``, if there was one."""
        return next((row["loss"] for row in reversed(self.history) if row["step"] == step), None)
