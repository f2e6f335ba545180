"""Training metrics to the trackers, the console and ``Trainer.train_metrics``; the NaN policy.

The loop reads metrics every ``cadence.log_every`` steps (one interval late) and, before any
hook runs, up to that hook's step; the rows are checked for NaN as soon as they arrive, and
written averaged over each ``log_every`` interval (and the rest at the end of training) with its timing: ``step_time``, ``examples_per_second`` and ``mfu`` count training
time only, ``eval_time``, ``checkpoint_time``, ``sample_time``, ``compile_time`` (seconds of the
interval spent outside steps) and ``data_wait_time`` / ``device_wait_time`` (per step) say
where the rest went.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import numpy as np

from workshop_dist.config import WorkshopError
from workshop_dist.metrics import Logger, MetricsLogger, ProgressBar, is_primary

LogCallback = Callable[[int, dict[str, float], str], None]
PHASE_METRICS = {"save": "checkpoint_time"}  # clock phase -> metric name (default: <phase>_time)


class NonFiniteLossError(WorkshopError):
    """The loss or gradient became NaN/Inf; the last good checkpoint is left untouched."""

    exit_code = 3


def average(rows: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """The mean of each metric over ``rows`` (their ``step`` left out)."""
    rows = list(rows)
    if not rows:
        return {}
    keys = [key for key in rows[0] if key != "step"]
    return {key: float(np.mean([row[key] for row in rows])) for key in keys}


class MetricSink:
    """Where a step's metrics go: the trackers, the user's callback, and the console (or progress bar)."""

    def __init__(
        self,
        metrics_logger: MetricsLogger,
        logger: Logger,
        *,
        callback: LogCallback | None = None,
        progress_bar: bool = False,
        total_steps: int | None = None,
        epoch_of: Callable[[int], int] = lambda step: 0,
    ):
        self.metrics_logger, self.logger, self.callback = metrics_logger, logger, callback
        self.progress_bar, self.total_steps, self.epoch_of = progress_bar, total_steps, epoch_of
        self._bar: ProgressBar | None = None

    def write(self, step: int, metrics: dict[str, float], prefix: str) -> None:
        self.metrics_logger.log_metrics(step, metrics, prefix)
        if self.callback is not None:
            self.callback(step, metrics, prefix)
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k in ("loss", "learning_rate", "examples_per_second", "fid", "fd"))
        on_bar = prefix == "train" and self.progress_bar and is_primary()
        if on_bar:
            if self._bar is None:
                self._bar = ProgressBar(self.total_steps, initial=step)
            self._bar.update(step, self.epoch_of(step), metrics)
        self.logger.info("%s step %d: %s", prefix, step, shown, console=not on_bar)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class LogHook:
    """Writes each metric interval as it reaches the host; keeps every step's row (``rows``)."""

    kind = "log"

    def __init__(
        self,
        sink: MetricSink,
        *,
        batch_size: int,
        flops_per_step: float | None,
        peak_flops: float | None,
        nan_policy: Literal["stop", "skip"],
        every: int,
    ):
        self.sink, self.batch_size, self.nan_policy, self.every = sink, batch_size, nan_policy, every
        self.flops_per_step, self.peak_flops = flops_per_step, peak_flops  # peak of the whole mesh, or None
        self.rows: list[dict[str, float]] = []
        self._unwritten: list[Any] = []  # intervals read before a hook's step, written at the next log step

    def next_step(self, step: int) -> None:
        return None  # the loop reads metrics every cadence.log_every steps; observe() writes them

    def __call__(self, info: Any) -> None:
        del info

    def observe(self, info: Any) -> None:
        for interval in info.metrics:
            self.rows.extend(interval.rows)
            self.check_finite(interval.rows)
            self._unwritten.append(interval)
            if interval.last_step % self.every == 0:
                self._write()
        if info.last and self._unwritten:
            self._write()

    def _write(self) -> None:
        intervals, self._unwritten = self._unwritten, []
        self.sink.write(intervals[-1].last_step, self.summary(intervals), "train")

    def summary(self, intervals: list[Any]) -> dict[str, float]:
        """Averages of the intervals' rows, and their timing (training time only: phases excluded)."""
        rows = [row for interval in intervals for row in interval.rows]
        steps, train_seconds = len(rows), sum(interval.lap.train_seconds for interval in intervals)
        summary = average(rows)
        summary["step_time"] = train_seconds / steps
        summary["examples_per_second"] = steps * self.batch_size / train_seconds
        for kind in intervals[0].lap.waits:
            summary[f"{kind}_time"] = sum(interval.lap.waits[kind] for interval in intervals) / steps
        for interval in intervals:
            for kind, seconds in interval.lap.phases.items():
                if kind != "log":
                    name = PHASE_METRICS.get(kind, f"{kind}_time")
                    summary[name] = summary.get(name, 0.0) + seconds
        if self.flops_per_step and self.peak_flops:
            summary["mfu"] = self.flops_per_step / summary["step_time"] / self.peak_flops
        return summary

    def check_finite(self, rows: Iterable[Mapping[str, float]]) -> None:
        bad = [row for row in rows if row.get("nonfinite", 0) > 0]
        if not bad:
            return
        row = bad[0]
        culprit = next((k for k, v in row.items() if not np.isfinite(v)), "grad_norm")
        if self.nan_policy == "stop":
            raise NonFiniteLossError(
                f"Non-finite {culprit} ({row[culprit]}) at step {int(row['step'])}: training stopped and the last "
                "checkpoint was left untouched. Lower the learning rate, add gradient clipping "
                "(training.optimizer.gradient_clip_norm), or set training.nan_policy=skip to skip such updates."
            )
        self.sink.logger.warning("Skipped %d update(s) with non-finite %s (first at step %d).", len(bad), culprit, int(row["step"]))
