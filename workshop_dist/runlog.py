"""The run's event log: what each process start did and how long it spent on what.

``WORKDIR/logs/run_events.jsonl`` is append-only JSON lines, written by process 0 only, one
line per event, each closed and flushed at once (a killed process loses nothing it logged).
Metrics say how well a model trains; this log says where a job's time went: starts, restarts
and why, compilation, steps, evaluations, checkpoint saves and restores. ``workshop-train
--report WORKDIR`` (:mod:`workshop_dist.report`) reads it back, also while the job runs.

Events (every line has ``event``, ``time`` (Unix seconds), ``session`` (one id per process
start), ``step``):

- ``start``: ``total_steps``, ``resumed_from`` (step restored, or None), ``examples_per_step``,
  ``process_count``, ``checkpoint_dir``, ``host``, ``pid``.
- ``time``: ``kind`` (one of :data:`KINDS`), ``seconds``, for ``eval`` the ``val_loss``, and for
  ``restore`` the checkpoint ``tier`` it came from (``local`` or ``persistent``) when tiered.
- ``end``: ``reason`` (one of :data:`REASONS`) and an optional ``detail`` (the error).

A ``start`` that follows a session without an ``end`` means that session crashed or was
killed (SIGKILL, out of memory, a lost host).
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
import uuid
from typing import Any, Literal

from etils import epath

from workshop_dist import storage

EVENTS_FILE = "logs/run_events.jsonl"
Kind = Literal["compile", "train", "eval", "save", "restore", "sample"]
Reason = Literal["finished", "preempted", "error"]
KINDS: tuple[str, ...] = ("compile", "train", "eval", "save", "restore", "sample")
REASONS: tuple[str, ...] = ("finished", "preempted", "error")


def events_path(workdir: str | os.PathLike) -> epath.Path:
    return epath.Path(workdir) / EVENTS_FILE


class RunLog:
    """Appends this process start's events to ``WORKDIR/logs/run_events.jsonl``.

    The Trainer calls :meth:`started` once it knows where it starts and :meth:`ended` when it
    stops for any reason; its run-log hook calls :meth:`timed` for each timed phase. On processes
    other than 0 (``enabled=False``) every call does nothing, so callers need no checks.
    """

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool | None = None):
        if enabled is None:
            import jax

            enabled = jax.process_index() == 0
        self.enabled = enabled
        self.path = events_path(workdir)
        self.session = uuid.uuid4().hex[:12]
        self._ended = False

    def started(
        self,
        step: int,
        total_steps: int | None,
        resumed_from: int | None = None,
        *,
        examples_per_step: int | None = None,
        process_count: int = 1,
        checkpoint_dir: str | os.PathLike | None = None,
    ) -> None:
        """Training begins (or resumes) at ``step`` of ``total_steps``.

        ``resumed_from`` is the checkpoint step restored (None for a fresh start);
        ``examples_per_step`` the global batch size, for the examples-seen count;
        ``checkpoint_dir`` where checkpoints go when not ``WORKDIR/checkpoints``.
        """
        self._write(
            "start",
            step,
            total_steps=total_steps,
            resumed_from=resumed_from,
            examples_per_step=examples_per_step,
            process_count=process_count,
            checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir),
            host=socket.gethostname(),
            pid=os.getpid(),
        )

    def timed(
        self, kind: Kind, seconds: float, step: int, *, val_loss: float | None = None, at: float | None = None,
        tier: str | None = None,
    ) -> None:
        """``seconds`` spent on ``kind`` ending at ``step`` (at Unix time ``at``, default now); a
        ``restore`` names the checkpoint ``tier`` it read (local or persistent) when there are tiers.

        ``train`` is the time of the steps since the last ``train`` event (log it at every
        metrics read, so the log also shows progress), without compilation (log that as
        ``compile``); ``save`` is the time the loop was blocked by a save; ``eval`` carries the
        validation loss. The kinds must not overlap: the report adds them up against wall time.
        The training clock (:mod:`workshop_dist.training.clock`) measures them all.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown timing kind {kind!r}; expected one of {', '.join(KINDS)}")
        fields: dict[str, Any] = {"kind": kind, "seconds": float(seconds)}
        if val_loss is not None:
            fields["val_loss"] = float(val_loss) if math.isfinite(val_loss) else str(val_loss)
        if tier is not None:
            fields["tier"] = tier
        self._write("time", step, at=at, **fields)

    def ended(self, step: int, reason: Reason, detail: str | None = None) -> None:
        """Training stops at ``step``: ``finished``, ``preempted`` (saved, exits 75) or ``error``.

        Only the first call of a session counts, so a ``finally`` may call it again safely.
        """
        if reason not in REASONS:
            raise ValueError(f"unknown end reason {reason!r}; expected one of {', '.join(REASONS)}")
        if self._ended:
            return
        self._ended = True
        self._write("end", step, reason=reason, detail=detail)

    def _write(self, event: str, step: int, *, at: float | None = None, **fields: Any) -> None:
        if not self.enabled:
            return
        record = {"event": event, "time": time.time() if at is None else at, "session": self.session, "step": int(step), **fields}
        # Open, append, close: each line is on disk before the next step runs (on gs://,
        # which cannot append, storage rewrites the small object whole).
        storage.append_text(self.path, json.dumps(record) + "\n")


def read_events(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every event in the log, in order; a torn last line (the writer was killed mid-write) is skipped."""
    path = events_path(workdir)
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events
