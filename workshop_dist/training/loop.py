"""The training loop: the one place that owns the step counter, the device-metric queue and the clock.

:func:`train` runs calls of up to ``steps_per_call`` steps. Before each call it asks every hook
for ``next_step(step)`` and never runs a call past any answer, so every action lands on the
step it asked for whatever ``steps_per_call`` is. After each call it hands the due hooks one
frozen :class:`StepInfo`; hooks read the state and write files, they never assign to the loop.

**Hooks.** A hook is any object with two methods (see :mod:`workshop_dist.training.hooks` for
the built-in ones and ``Trainer.add_hook(fn, every=N)`` for the easy form)::

    next_step(step: int) -> int | None
        The next step (> step) at which the hook must run, or None (not before the end).
        Asked after every call (keep it cheap and pure); answering ``step`` itself means
        "now" (e.g. a preemption notice arrived): the hook runs before any further step.
    __call__(info: StepInfo) -> None
        Runs at that step. All metrics up to ``info.step`` have been read first (a host sync,
        so a hook due every step slows training), so ``info.metrics`` is complete.

and may have:

    observe(info: StepInfo) -> None
        Called after every call, due or not, with whatever metric intervals reached the host
        (read one interval late, so this never waits for the device). Must be cheap.
    kind: str
        The clock phase its ``__call__`` time counts as (default ``"hook"``): ``eval``, ``save``,
        ``sample``, ``profile``, ... Phases are kept out of step time, examples/s and MFU.

Order matters: hooks run in the order given (the NaN policy of the logging hook runs before
any evaluation or checkpoint at the same step). ``info.state`` is valid until the next call
donates its buffers: copy what you keep (``jax.tree.map(jnp.copy, ...)``).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from workshop_dist.training.clock import Clock, Lap
from workshop_dist.training.state import TrainingState

log = logging.getLogger("workshop_dist")


class Hook(Protocol):
    def next_step(self, step: int) -> int | None: ...

    def __call__(self, info: StepInfo) -> None: ...


@dataclasses.dataclass(frozen=True)
class Interval:
    """Metrics of consecutive steps, read from the device together, and the time they took."""

    rows: tuple[dict[str, float], ...]  # one per step: {"step": s, metric: value, ...}
    lap: Lap  # training seconds (phases excluded), and each phase's and wait's seconds

    @property
    def last_step(self) -> int:
        return int(self.rows[-1]["step"])


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What hooks see after a call: read it, never assign to it."""

    step: int  # optimizer steps done
    state: TrainingState  # after ``step`` steps; valid until the next call donates it
    metrics: tuple[Interval, ...]  # metric intervals that reached the host now (all up to ``step`` for due hooks)
    clock: Clock
    last: bool = False  # the last info of this train() call: every metric has been read

    @property
    def rows(self) -> list[dict[str, float]]:
        """Every step's metrics in ``metrics``, in step order."""
        return [row for interval in self.metrics for row in interval.rows]


class MetricQueue:
    """Each call's metrics ``[n, m]`` stay on the device; an interval's are copied to the host together,
    asynchronously, and read at the next call, so logging never makes the device wait."""

    def __init__(self, names: Sequence[str], clock: Clock, max_in_flight: int):
        self.names, self.clock, self.max_in_flight = list(names), clock, max_in_flight
        self._pending: list[jax.Array] = []
        self._queued: collections.deque[jax.Array] = collections.deque()
        self._reading: tuple[int, jax.Array, Lap] | None = None

    def add(self, metrics: jax.Array) -> None:
        """One call's metrics; waits for the call ``max_in_flight`` back (bounded async dispatch)."""
        self._pending.append(metrics)
        self._queued.append(metrics)
        if len(self._queued) > self.max_in_flight:
            start = self.clock.now()
            self._queued.popleft().block_until_ready()
            self.clock.add("device_wait", self.clock.now() - start)

    def start_read(self, step: int) -> None:
        """Start copying the metrics up to ``step`` to the host; the interval's time ends here."""
        if self._pending:
            stacked = jnp.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
            stacked.copy_to_host_async()
            self._reading, self._pending = (step, stacked, self.clock.lap()), []

    def finish_read(self) -> list[Interval]:
        """The interval being read, if any (waits only if its copy is not done yet)."""
        if self._reading is None:
            return []
        step, stacked, lap = self._reading
        self._reading = None
        host = np.asarray(jax.device_get(stacked))
        first = step - len(host) + 1
        rows = tuple({"step": first + i, **dict(zip(self.names, map(float, values), strict=True))} for i, values in enumerate(host))
        return [Interval(rows, lap)]

    def flush(self, step: int) -> list[Interval]:
        """Everything up to ``step`` (a host sync): before a hook runs, and at the end."""
        done = self.finish_read()
        self.start_read(step)
        return done + self.finish_read()


def train(
    engine: Any,
    state: TrainingState,
    feed: Any,
    hooks: Sequence[Hook],
    *,
    start: int,
    stop: int | None,
    clock: Clock,
    read_every: int,
    steps_per_call: int = 1,
    max_in_flight: int = 2,
) -> TrainingState:
    """Run steps ``start+1 .. stop`` (or until ``feed`` ends) with ``hooks``; return the final state.

    ``engine.metric_names`` names the columns of each call's metrics; ``feed.take(step, n)``
    gives ``(run, k)``: ``run(state) -> (state, metrics [k, m])`` for the next ``k <= n`` steps,
    or None at the end of the data. Metrics are read every ``read_every`` steps.
    """
    queue = MetricQueue(engine.metric_names, clock, max_in_flight)
    observers = [hook for hook in hooks if hasattr(hook, "observe")]
    clock.restart()
    step = start
    plans = _boundary(hooks, observers, [None] * len(hooks), StepInfo(step, state, (), clock), queue)
    while stop is None or step < stop:
        # --- The next call: at most steps_per_call, never past a read or a hook's step --------
        n = steps_per_call
        for boundary in (stop, (step // read_every + 1) * read_every, *plans):
            if boundary is not None and boundary > step:
                n = min(n, boundary - step)
        started = clock.now()
        taken = feed.take(step, n)
        clock.add("data_wait", clock.now() - started)
        if taken is None:
            break
        run, count = taken
        state, metrics = run(state)
        step += count
        queue.add(metrics)
        if not clock.compiled:
            _first_call(clock, metrics, step)
        arrived = queue.finish_read()  # the previous interval, read while this call ran
        if step % read_every == 0:
            queue.start_read(step)
        plans = _boundary(hooks, observers, plans, StepInfo(step, state, tuple(arrived), clock), queue)
    arrived = queue.flush(step)
    for observer in observers:
        observer.observe(StepInfo(step, state, tuple(arrived), clock, last=True))
    return state


def _boundary(
    hooks: Sequence[Hook], observers: Sequence[Any], plans: Sequence[int | None], info: StepInfo, queue: MetricQueue
) -> list[int | None]:
    """After a call: ask every hook for its next step, run the due ones; return the plans for the next call.

    Due: a hook planned for this step, or one that answers this step ("now").
    """
    step = info.step
    asked = [hook.next_step(step) for hook in hooks]
    due = [h for h, p, a in zip(hooks, plans, asked, strict=True) if p == step or (a is not None and a <= step)]
    if not due:  # the common case: only the observers
        for observer in observers:
            observer.observe(info)
        return asked
    info = dataclasses.replace(info, metrics=info.metrics + tuple(queue.flush(step)))
    _run_due(hooks, observers, due, info)
    return [h.next_step(step) if any(h is d for d in due) else a for h, a in zip(hooks, asked, strict=True)]


def run_now(
    hooks: Iterable[Any], *, step: int, state: TrainingState, clock: Clock, observers: Iterable[Any] = ()
) -> None:
    """Run ``hooks`` at ``step`` outside :func:`train` (e.g. a run's final evaluation), each timed as its
    phase, then tell ``observers`` (e.g. the run log)."""
    hooks = list(hooks)
    _run_due(hooks, list(observers), hooks, StepInfo(step, state, (), clock))


class Progress:
    """An observer of the loop: its latest step and state, read after ``train()`` returns or raises."""

    def __init__(self, step: int, state: TrainingState):
        self.step, self.state = step, state

    def next_step(self, step: int) -> None:
        return None

    def __call__(self, info: StepInfo) -> None:
        del info

    def observe(self, info: StepInfo) -> None:
        self.step, self.state = info.step, info.state


def _run_due(hooks: Sequence[Hook], observers: Sequence[Any], due: Sequence[Hook], info: StepInfo) -> None:
    """Observers first (the NaN policy stops the run before anything is saved), then the due hooks in order."""
    for observer in observers:
        observer.observe(info)
    for hook in hooks:
        if any(hook is d for d in due):
            with info.clock.phase(getattr(hook, "kind", "hook"), info.step):
                hook(info)
    if due and observers:  # the phases just recorded (e.g. for the run log)
        after = dataclasses.replace(info, metrics=())
        for observer in observers:
            observer.observe(after)


def _first_call(clock: Clock, metrics: jax.Array, step: int) -> None:
    """Once per process: the first call includes compilation; its time is a ``compile`` phase, not steps."""
    metrics.block_until_ready()
    clock.first_call_done(step)
    log.info("First step done (step %d), %.1f s after the trainer was created.", step, clock.now() - clock.created)
