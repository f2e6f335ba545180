"""The run's one clock: wall time split into phases, so step time counts only the steps.

Every timed thing goes through one :class:`Clock`: the training loop measures its intervals
with :meth:`Clock.lap`, times each hook it runs as a phase (``eval``, ``save``, ``sample``,
...) and records the first call's compilation; the trainer times restores and explicit saves
the same way. A lap's ``train_seconds`` is its wall time minus every phase inside it, so
evaluation, sampling, checkpoint and compile time never reach ``step_time``, examples/s or
MFU; the phases themselves are kept as :class:`Span` s, which the run-log hook writes to
``run_events.jsonl`` (``--report``). Waits (``data_wait``, ``device_wait``) are inside training
time and only counted.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
from collections.abc import Iterator

WAITS = ("data_wait", "device_wait")  # part of training time, reported per step


@dataclasses.dataclass(frozen=True)
class Span:
    """One phase: ``seconds`` of ``kind`` ending at ``step``; ``ended`` is the Unix time it ended."""

    kind: str
    seconds: float
    step: int
    ended: float


@dataclasses.dataclass(frozen=True)
class Lap:
    """One interval of the loop: training seconds, and the seconds of each phase and wait inside it."""

    train_seconds: float
    phases: dict[str, float]
    waits: dict[str, float]


class Clock:
    """Phases, waits and laps on one monotonic timer (``time.perf_counter``)."""

    def __init__(self, *, train_seconds: float = 0.0):
        self.created = time.perf_counter()
        self.train_seconds = train_seconds  # training time of the run so far (restored from checkpoints)
        self.spans: list[Span] = []
        self.compiled = False  # the first training call (compilation included) is done
        self._totals: dict[str, float] = collections.defaultdict(float)
        self._mark = (self.created, {})

    @staticmethod
    def now() -> float:
        return time.perf_counter()

    def add(self, kind: str, seconds: float) -> None:
        """Count ``seconds`` of a wait (inside training time); the hot path's cheap call."""
        self._totals[kind] += seconds

    def record(self, kind: str, seconds: float, step: int) -> None:
        """A phase of ``seconds`` (not training time) that ended now at ``step``."""
        self._totals[kind] += seconds
        self.spans.append(Span(kind, seconds, step, time.time()))

    @contextlib.contextmanager
    def phase(self, kind: str, step: int) -> Iterator[None]:
        """``with clock.phase("eval", step): ...``: the block's time is a phase (also when it raises)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.record(kind, time.perf_counter() - start, step)

    def first_call_done(self, step: int) -> None:
        """The first training call (compilation included) ended now: a ``compile`` phase from the interval's start."""
        self.record("compile", time.perf_counter() - self._mark[0], step)
        self.compiled = True

    def restart(self) -> None:
        """Start a new interval now: time since the last lap (between training calls) is not training."""
        self._mark = (time.perf_counter(), dict(self._totals))

    def lap(self) -> Lap:
        """The interval since the last lap or restart; the next one starts now."""
        now = time.perf_counter()
        start, before = self._mark
        deltas = {kind: total - before.get(kind, 0.0) for kind, total in self._totals.items()}
        phases = {kind: s for kind, s in deltas.items() if kind not in WAITS and s > 0}
        waits = {kind: deltas.get(kind, 0.0) for kind in WAITS}
        train = max(now - start - sum(phases.values()), 1e-9)
        self.train_seconds += train
        self._mark = (now, dict(self._totals))
        return Lap(train, phases, waits)
