"""``workshop-train --report WORKDIR``: where a run's time went, from the workdir alone.

Reads the event log (:mod:`workshop_dist.runlog`) and the checkpoints' ``metadata`` items,
nothing else, so it works while the job runs, after it, and on any machine that sees the
workdir. :func:`compute_report` gives the numbers, :func:`format_report` the text.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
from typing import Any

from etils import epath

from workshop_dist.config import WorkshopError
from workshop_dist.runlog import EVENTS_FILE, KINDS, read_events

# The time categories of the report, in the order shown.
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("train", "training steps"),
    ("compile", "compilation"),
    ("eval", "evaluation"),
    ("save", "checkpoint saves"),
    ("restore", "checkpoint restores"),
    ("sample", "sampling"),
    ("restarts", "restarts (between processes)"),
    ("other", "other (start-up, data, logging)"),
)
CAUSES = {"preempted": "preemption", "error": "error"}  # a start after "finished" is a continuation, not a restart


@dataclasses.dataclass
class Restart:
    """A process start after an earlier one; ``cause`` is how the earlier one stopped."""

    at_step: int  # where the new process resumed
    cause: str  # preemption, error: ..., crash (no end event)
    steps_redone: int  # steps the earlier process did past the checkpoint it resumed from
    downtime: float  # seconds between the earlier process's last event and this one's start
    tier: str | None = None  # the checkpoint tier the restore read (tiered checkpoints: local or persistent)


@dataclasses.dataclass
class Checkpoint:
    step: int
    path: str
    metadata: dict[str, Any]


@dataclasses.dataclass
class RunReport:
    workdir: str
    status: str  # finished, preempted, error, running (or killed)
    steps_done: int
    total_steps: int | None
    examples_seen: int | None
    starts: int
    restarts: list[Restart]
    wall_seconds: float
    seconds: dict[str, float]  # per CATEGORIES key
    best_val_loss: float | None
    best_val_step: int | None
    latest_checkpoint: Checkpoint | None
    best_checkpoint: Checkpoint | None
    last_event_time: float
    error: str | None = None
    continuations: int = 0  # starts after a process that finished the run (it was extended)
    idle_seconds: float = 0.0  # between a finished process and the next start: left out of the wall time

    @property
    def steps_to_go(self) -> int | None:
        return None if self.total_steps is None else max(self.total_steps - self.steps_done, 0)

    @property
    def goodput(self) -> float | None:
        """Time in training steps over wall time (from the first start to the last event, less the idle time)."""
        return self.seconds["train"] / self.wall_seconds if self.wall_seconds > 0 else None


def _session_start(events: list[dict[str, Any]]) -> float:
    """When a process began its logged work: a timed event began ``seconds`` before it was logged."""
    return min(event["time"] - (event.get("seconds", 0.0) if event["event"] == "time" else 0.0) for event in events)


def compute_report(workdir: str | os.PathLike, checkpoint_dir: str | os.PathLike | None = None) -> RunReport:
    """The run's numbers from ``WORKDIR/logs/run_events.jsonl`` and its checkpoints' metadata."""
    events = read_events(workdir)
    if not events:
        raise WorkshopError(
            f"No run events in {epath.Path(workdir) / EVENTS_FILE}: nothing has been trained in this workdir "
            "yet, or it was written by a version without the event log."
        )
    sessions: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        sessions.setdefault(event["session"], []).append(event)
    ordered = list(sessions.values())
    starts = [next((e for e in session if e["event"] == "start"), None) for session in ordered]
    ends = [next((e for e in session if e["event"] == "end"), None) for session in ordered]

    seconds = dict.fromkeys([key for key, _ in CATEGORIES], 0.0)
    for event in events:
        if event["event"] == "time" and event.get("kind") in KINDS:
            seconds[event["kind"]] += float(event["seconds"])

    restarts, continuations, idle = [], 0, 0.0
    for index in range(1, len(ordered)):
        previous, end = ordered[index - 1], ends[index - 1]
        start = starts[index] or ordered[index][0]
        resumed_from = start.get("resumed_from")
        last_step = max(e["step"] for e in previous)
        downtime = max(_session_start(ordered[index]) - max(e["time"] for e in previous), 0.0)
        if end is not None and end["reason"] == "finished":  # the run was done until someone extended it
            continuations, idle = continuations + 1, idle + downtime
            continue
        if end is None:
            cause = "crash (no end event)"
        elif end["reason"] == "error" and end.get("detail"):
            cause = f"error: {end['detail']}"
        else:
            cause = CAUSES.get(end["reason"], end["reason"])
        redone = max(last_step - resumed_from, 0) if resumed_from is not None else 0
        tier = next((e.get("tier") for e in ordered[index] if e.get("kind") == "restore" and e.get("tier")), None)
        restarts.append(Restart(start["step"], cause, redone, downtime, tier))
    seconds["restarts"] = sum(restart.downtime for restart in restarts)

    first_time = _session_start(ordered[0])
    last_time = max(event["time"] for event in events)
    wall = last_time - first_time - idle
    seconds["other"] = max(wall - sum(seconds.values()), 0.0)

    latest_start = next((s for s in reversed(starts) if s is not None), {})
    steps_done = max(event["step"] for event in ordered[-1])
    per_step = latest_start.get("examples_per_step")
    last_end = ends[-1]
    status = last_end["reason"] if last_end else "running (or killed)"

    evals = [
        (float(e["val_loss"]), e["step"])
        for e in events
        if e["event"] == "time" and e.get("kind") == "eval" and isinstance(e.get("val_loss"), int | float)
    ]
    best_loss, best_step = min(evals) if evals else (None, None)

    directory = checkpoint_dir or latest_start.get("checkpoint_dir") or epath.Path(workdir) / "checkpoints"
    checkpoints = read_checkpoints(directory)
    latest = checkpoints[-1] if checkpoints else None
    examples = steps_done * per_step if per_step else None
    if examples is None and latest is not None and latest.step == steps_done:
        examples = latest.metadata.get("examples_seen")
    return RunReport(
        workdir=str(workdir),
        status=status,
        steps_done=steps_done,
        total_steps=latest_start.get("total_steps"),
        examples_seen=examples,
        starts=len(ordered),
        restarts=restarts,
        wall_seconds=wall,
        seconds=seconds,
        best_val_loss=best_loss,
        best_val_step=best_step,
        latest_checkpoint=latest,
        best_checkpoint=best_checkpoint(checkpoints, best_step),
        last_event_time=last_time,
        error=last_end.get("detail") if last_end and last_end["reason"] == "error" else None,
        continuations=continuations,
        idle_seconds=idle,
    )


def read_checkpoints(directory: str | os.PathLike) -> list[Checkpoint]:
    """Complete checkpoints (named by their step; in-progress saves have a suffix), by step."""
    directory = epath.Path(directory)
    if not directory.exists():
        return []
    found = []
    for child in directory.iterdir():
        if not child.name.isdigit():
            continue
        metadata_file = child / "metadata" / "metadata"
        try:
            metadata = json.loads(metadata_file.read_text())
        except (OSError, ValueError):
            metadata = {}
        found.append(Checkpoint(int(child.name), str(child), metadata))
    return sorted(found, key=lambda checkpoint: checkpoint.step)


def best_checkpoint(checkpoints: list[Checkpoint], best_val_step: int | None) -> Checkpoint | None:
    """The checkpoint of the best evaluation; else the first one saved with the lowest ``best_loss``.

    (A save after an improving evaluation records that loss as ``best_loss``; later saves
    repeat it, so the first holder is the best checkpoint.)
    """
    by_step = {checkpoint.step: checkpoint for checkpoint in checkpoints}
    if best_val_step in by_step:
        return by_step[best_val_step]
    scored = [c for c in checkpoints if isinstance(c.metadata.get("best_loss"), int | float)]
    if not scored:
        return None
    lowest = min(c.metadata["best_loss"] for c in scored)
    return next(c for c in scored if c.metadata["best_loss"] == lowest)


def format_duration(seconds: float) -> str:
    """``3725.4 -> '1h 02m 05s'``, ``65 -> '1m 05s'``, ``4.25 -> '4.2s'``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def format_report(report: RunReport, now: float | None = None) -> str:
    """The report as aligned text lines (``now`` fixes "ago" for tests)."""
    now = time.time() if now is None else now
    lines = [f"Run report for {report.workdir}"]

    def row(label: str, text: str, indent: int = 2) -> None:
        lines.append(f"{' ' * indent}{label:<{36 - indent}}{text}")

    if report.status == "running (or killed)":
        status = f"running, or killed without an end event (last event {format_duration(now - report.last_event_time)} ago)"
    else:
        when = datetime.datetime.fromtimestamp(report.last_event_time).strftime("%Y-%m-%d %H:%M:%S")
        status = f"{report.status} at step {report.steps_done} ({when})"
        if report.error:
            status += f": {report.error}"
    row("status", status)
    to_go = "unknown" if report.steps_to_go is None else f"{report.steps_to_go:,}"
    total = "?" if report.total_steps is None else f"{report.total_steps:,}"
    row("steps", f"{report.steps_done:,} of {total} done, {to_go} to go")
    row("examples seen", "unknown" if report.examples_seen is None else f"{report.examples_seen:,}")
    continued = f"; {report.continuations} continued a finished run" if report.continuations else ""
    row("process starts", f"{report.starts} ({len(report.restarts)} restart{'s' if len(report.restarts) != 1 else ''}{continued})")
    for number, restart in enumerate(report.restarts, 1):
        row(
            f"restart {number}",
            f"at step {restart.at_step}{f' ({restart.tier} tier)' if restart.tier else ''} after {restart.cause}; "
            f"{restart.steps_redone} steps redone, "
            f"{format_duration(restart.downtime)} between processes",
            indent=4,
        )
    idle = f", less {format_duration(report.idle_seconds)} idle after finished processes" if report.idle_seconds else ""
    row("wall time", f"{format_duration(report.wall_seconds)} (first start to last event{idle})")
    for key, label in CATEGORIES:
        share = report.seconds[key] / report.wall_seconds if report.wall_seconds > 0 else 0.0
        row(label, f"{format_duration(report.seconds[key]):>12}  {share:6.1%}", indent=4)
    goodput = report.goodput
    row("goodput", "unknown" if goodput is None else f"{goodput:.1%} (training steps / wall time)")
    if report.best_val_loss is None:
        row("best validation loss", "none yet")
    else:
        row("best validation loss", f"{report.best_val_loss:.6g} at step {report.best_val_step}")
    for name, checkpoint in (("latest checkpoint", report.latest_checkpoint), ("best checkpoint", report.best_checkpoint)):
        row(name, "none" if checkpoint is None else checkpoint.path)
    return "\n".join(lines)


def print_report(workdir: str | os.PathLike) -> int:
    """``workshop-train --report WORKDIR``."""
    print(format_report(compute_report(workdir)))
    return 0
