"""Training metrics: kept on the device, read one log interval late, timed without pauses.

The device is never waited on per step: each call's metrics (``[n, len(names)]``) stay on the
device, an interval's are stacked and copied to the host asynchronously, and read while the
next steps run. Time spent in evaluation, sampling and checkpoint saves is paused out of
``step_time``, ``examples_per_second`` and ``mfu`` and reported on its own
(``eval_time``, ``checkpoint_time``, ``sample_time`` seconds per interval).
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

Rows = list[dict[str, float]]


class StepMetrics:
    """Per-step metric rows and per-interval summaries of the training loop."""

    def __init__(self, *, batch_size: int, peak_flops: float | None, max_in_flight: int):
        self.batch_size = batch_size
        self.peak_flops = peak_flops  # of the whole mesh, or None (unknown device)
        self.max_in_flight = max_in_flight
        self.names: list[str] = []
        self.flops_per_step: float | None = None
        self.rows: Rows = []  # every step's metrics read so far (``Trainer.train_metrics``)
        self._pending: list[jax.Array] = []  # [n, m] per call, not yet read
        self._queued: collections.deque[jax.Array] = collections.deque()
        self._in_flight: tuple[int, jax.Array] | None = None  # (last step, stacked metrics) being read
        self._start = (0, time.perf_counter())
        self._paused: dict[str, float] = collections.defaultdict(float)
        self.waited = {"data_wait_time": 0.0, "device_wait_time": 0.0}
        self.on_time: Callable[[str, float], None] | None = None  # (kind, seconds): the run log

    @property
    def unread(self) -> int:
        """Steps whose metrics are still on the device."""
        pending = sum(int(m.shape[0]) for m in self._pending)
        return pending + (int(self._in_flight[1].shape[0]) if self._in_flight else 0)

    @property
    def interval_started(self) -> float:
        return self._start[1]

    def restart_interval(self, step: int) -> None:
        self._start = (step, time.perf_counter())
        self._paused.clear()

    def add(self, metrics: jax.Array) -> None:
        """One call's metrics; waits for the call ``max_in_flight`` back (bounded async dispatch)."""
        self._pending.append(metrics)
        self._queued.append(metrics)
        if len(self._queued) > self.max_in_flight:
            with self.waiting("device_wait_time"):
                self._queued.popleft().block_until_ready()

    def bound_queue(self, marker: jax.Array) -> None:
        """Keep the queue bounded for non-training calls too (evaluation batches)."""
        self._queued.append(marker)
        if len(self._queued) > self.max_in_flight:
            self._queued.popleft().block_until_ready()

    def waiting(self, kind: str) -> contextlib.AbstractContextManager[None]:
        """Time inside is the loop waiting (``data_wait_time``, ``device_wait_time``), reported per step."""
        return _timed(lambda seconds: self.waited.__setitem__(kind, self.waited[kind] + seconds))

    def paused(self, kind: str) -> contextlib.AbstractContextManager[None]:
        """Time inside is not training time (``eval``, ``checkpoint``, ``sample``)."""
        return _timed(lambda seconds: self.add_pause(kind, seconds))

    def add_pause(self, kind: str, seconds: float) -> None:
        self._paused[kind] += seconds
        if self.on_time is not None:
            self.on_time(kind, seconds)

    def start_read(self, step: int) -> None:
        """Start copying this interval's metrics to the host (read at the next call)."""
        if not self._pending:
            return
        stacked = jnp.concatenate(self._pending)  # one transfer per interval
        stacked.copy_to_host_async()
        self._in_flight, self._pending = (step, stacked), []

    def finish_read(self) -> tuple[int, Rows, dict[str, float]] | None:
        """The interval being read: (last step, its rows, its summary), or None."""
        if self._in_flight is None:
            return None
        step, stacked = self._in_flight
        self._in_flight = None
        host = np.asarray(jax.device_get(stacked))
        first = step - len(host) + 1
        rows = [{"step": first + i, **dict(zip(self.names, map(float, values), strict=True))} for i, values in enumerate(host)]
        self.rows.extend(rows)
        start_step, start_time = self._start
        now = time.perf_counter()
        steps = max(step - start_step, 1)
        paused = sum(self._paused.values())
        elapsed = max(now - start_time - paused, 1e-9)
        if self.on_time is not None:
            self.on_time("train", elapsed)
        summary = average(rows)
        summary["step_time"] = elapsed / steps
        summary["examples_per_second"] = steps * self.batch_size / elapsed
        for kind, seconds in self.waited.items():
            summary[kind] = seconds / steps
        for kind, seconds in self._paused.items():
            summary[f"{kind}_time"] = seconds
        if self.flops_per_step and self.peak_flops:
            summary["mfu"] = self.flops_per_step / summary["step_time"] / self.peak_flops
        self.waited = dict.fromkeys(self.waited, 0.0)
        self._start = (step, now)
        self._paused.clear()
        return step, rows, summary

    def flush(self, step: int, write: Callable[[int, Rows, dict[str, float]], None]) -> None:
        """Read everything still on the device (before a save, an evaluation, the epoch's end)."""
        for _ in range(2):
            done = self.finish_read()
            if done is not None:
                write(*done)
            if self._pending:
                self.start_read(step)

    def reset(self) -> None:
        """Forget unread metrics (after a restore)."""
        self._pending, self._in_flight = [], None


@contextlib.contextmanager
def _timed(record: Callable[[float], None]) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        record(time.perf_counter() - start)


def average(rows: Iterable[Mapping[str, float]]) -> dict[str, float]:
    rows = list(rows)
    if not rows:
        return {}
    keys = [key for key in rows[0] if key != "step"]
    return {key: float(np.mean([row[key] for row in rows])) for key in keys}
