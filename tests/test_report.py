"""The run event log and ``workshop-train --report``: exact numbers from a synthetic log with a
preemption and a crash, the text, the CLI, and end to end on a SIGTERM-ed and resumed run."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from tests.helpers import StreamedProcess
from workshop_dist.cli import main
from workshop_dist.report import compute_report, format_report
from workshop_dist.runlog import EVENTS_FILE, RunLog, read_events

REPO = Path(__file__).resolve().parents[1]


def write_events(workdir: Path, events: list[dict]) -> None:
    path = workdir / EVENTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(event) + "\n" for event in events))


def start(session, t, step, resumed_from=None):
    return {"event": "start", "time": t, "session": session, "step": step, "total_steps": 300,
            "resumed_from": resumed_from, "examples_per_step": 128}


def timed(session, t, step, kind, seconds, **extra):
    return {"event": "time", "time": t, "session": session, "step": step, "kind": kind, "seconds": seconds, **extra}


def end(session, t, step, reason, detail=None):
    return {"event": "end", "time": t, "session": session, "step": step, "reason": reason, "detail": detail}


# Three processes: A is preempted at step 100, B resumes there and is killed at step 175
# (its last checkpoint: 150), C resumes from 150 and finishes at 300.
SYNTHETIC = [
    start("A", 1000, 0),
    timed("A", 1004, 1, "compile", 4),
    timed("A", 1024, 50, "train", 20),
    timed("A", 1025, 50, "save", 1),
    timed("A", 1027, 50, "eval", 2, val_loss=40.0),
    timed("A", 1047, 100, "train", 20),
    timed("A", 1050, 100, "save", 2),
    end("A", 1050, 100, "preempted"),
    timed("B", 1103, 100, "restore", 3),  # began at 1100: 50 s after A's last event
    start("B", 1103, 100, resumed_from=100),
    timed("B", 1107, 101, "compile", 4),
    timed("B", 1127, 150, "train", 20),
    timed("B", 1129, 150, "eval", 2, val_loss=35.0),
    timed("B", 1130, 150, "save", 1),
    timed("B", 1140, 175, "train", 10),  # then SIGKILL: no end event
    timed("C", 1200, 150, "restore", 2),  # began at 1198: 58 s after B's last event
    start("C", 1200, 150, resumed_from=150),
    timed("C", 1203, 151, "compile", 3),
    timed("C", 1243, 250, "train", 40),
    timed("C", 1245, 250, "eval", 2, val_loss=36.0),
    timed("C", 1246, 250, "save", 1),
    timed("C", 1266, 300, "train", 20),
    timed("C", 1267, 300, "sample", 1),
    timed("C", 1269, 300, "save", 2),
    end("C", 1270, 300, "finished"),
]


def write_checkpoint(workdir: Path, step: int, **metadata) -> None:
    path = workdir / "checkpoints" / str(step) / "metadata" / "metadata"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"step": step, **metadata}))


@pytest.fixture
def synthetic(tmp_path) -> Path:
    write_events(tmp_path, SYNTHETIC)
    write_checkpoint(tmp_path, 150, best_loss=35.0, examples_seen=150 * 128)
    write_checkpoint(tmp_path, 250, best_loss=35.0, examples_seen=250 * 128)
    write_checkpoint(tmp_path, 300, best_loss=35.0, examples_seen=300 * 128)
    (tmp_path / "checkpoints" / "310.orbax-checkpoint-tmp").mkdir()  # an unfinished save is not a checkpoint
    return tmp_path


def test_report_numbers_with_a_preemption_and_a_crash(synthetic):
    report = compute_report(synthetic)
    assert report.status == "finished"
    assert (report.steps_done, report.total_steps, report.steps_to_go) == (300, 300, 0)
    assert report.examples_seen == 300 * 128
    assert report.starts == 3
    assert [(r.at_step, r.cause, r.steps_redone, r.downtime) for r in report.restarts] == [
        (100, "preemption", 0, 50.0),
        (150, "crash (no end event)", 25, 58.0),
    ]
    assert report.wall_seconds == 270.0  # 1000 .. 1270
    assert report.seconds == {
        "train": 130.0,
        "compile": 11.0,
        "eval": 6.0,
        "save": 7.0,
        "restore": 5.0,
        "sample": 1.0,
        "restarts": 108.0,
        "other": 2.0,  # 270 - 268
    }
    assert report.goodput == pytest.approx(130 / 270)
    assert (report.best_val_loss, report.best_val_step) == (35.0, 150)
    assert report.latest_checkpoint.step == 300
    assert report.best_checkpoint.step == 150
    assert report.latest_checkpoint.path == str(synthetic / "checkpoints" / "300")


def test_report_text(synthetic):
    text = format_report(compute_report(synthetic))
    lines = text.splitlines()
    assert lines[1].startswith("  status                            finished at step 300 (")  # local time follows
    del lines[1]
    expected = f"""\
Run report for {synthetic}
  steps                             300 of 300 done, 0 to go
  examples seen                     38,400
  process starts                    3 (2 restarts)
    restart 1                       at step 100 after preemption; 0 steps redone, 50.0s between processes
    restart 2                       at step 150 after crash (no end event); 25 steps redone, 58.0s between processes
  wall time                         4m 30s (first start to last event)
    training steps                        2m 10s   48.1%
    compilation                            11.0s    4.1%
    evaluation                              6.0s    2.2%
    checkpoint saves                        7.0s    2.6%
    checkpoint restores                     5.0s    1.9%
    sampling                                1.0s    0.4%
    restarts (between processes)          1m 48s   40.0%
    other (start-up, data, logging)         2.0s    0.7%
  goodput                           48.1% (training steps / wall time)
  best validation loss              35 at step 150
  latest checkpoint                 {synthetic / "checkpoints" / "300"}
  best checkpoint                   {synthetic / "checkpoints" / "150"}"""
    assert "\n".join(lines) == expected


def test_a_running_job_and_an_error_end(tmp_path):
    write_events(tmp_path, SYNTHETIC[:15])  # B still running (or killed): no checkpoints dir at all
    report = compute_report(tmp_path)
    assert report.status == "running (or killed)"
    assert (report.steps_done, report.steps_to_go, report.examples_seen) == (175, 125, 175 * 128)
    assert report.latest_checkpoint is None and report.best_checkpoint is None
    assert "last event 1m 00s ago" in format_report(report, now=1200.0)

    write_events(tmp_path, [*SYNTHETIC[:15], end("B", 1141, 175, "error", "NaN loss at step 175")])
    report = compute_report(tmp_path)
    assert report.status == "error" and report.error == "NaN loss at step 175"
    write_events(tmp_path, [*SYNTHETIC[:15], end("B", 1141, 175, "error", "boom"), start("D", 1150, 150, 150)])
    assert compute_report(tmp_path).restarts[-1].cause == "error: boom"


def test_a_finished_run_extended_days_later_is_a_continuation_not_a_restart(synthetic):
    # C finished at 1270; a day later the run is extended (max_steps raised) and D trains 300 -> 400.
    later = 1270 + 86_400
    extension = [
        timed("D", later + 2, 300, "restore", 2),
        start("D", later + 2, 300, resumed_from=300),
        timed("D", later + 5, 301, "compile", 3),
        timed("D", later + 45, 400, "train", 40),
        end("D", later + 46, 400, "finished"),
    ]
    write_events(synthetic, [*SYNTHETIC, *extension])
    report = compute_report(synthetic)
    assert (report.starts, len(report.restarts), report.continuations) == (4, 2, 1)  # the two of SYNTHETIC only
    assert report.idle_seconds == 86_400 and report.seconds["restarts"] == 108.0
    assert report.wall_seconds == 270.0 + 46  # the idle day is nobody's lost time
    assert report.goodput == pytest.approx(170 / 316)
    text = format_report(report)
    assert "process starts                    4 (2 restarts; 1 continued a finished run)" in text
    assert "(first start to last event, less 24h 00m 00s idle after finished processes)" in text


def test_best_checkpoint_falls_back_to_metadata_without_eval_events(tmp_path):
    write_events(tmp_path, [start("A", 0, 0), timed("A", 5, 30, "train", 5)])
    write_checkpoint(tmp_path, 10, best_loss=5.0)
    write_checkpoint(tmp_path, 20, best_loss=4.0)
    write_checkpoint(tmp_path, 30, best_loss=4.0)
    report = compute_report(tmp_path)
    assert report.best_val_loss is None
    assert report.best_checkpoint.step == 20  # the first save holding the lowest best_loss


def test_runlog_writes_what_the_report_reads(tmp_path):
    log = RunLog(tmp_path, enabled=True)
    log.started(0, 20, examples_per_step=8, checkpoint_dir=tmp_path / "ckpt")
    log.timed("compile", 0.5, 1, at=1000.0)  # a phase that ended at a given time
    log.timed("train", 2.5, 10)
    log.timed("eval", 0.5, 10, val_loss=float("nan"))
    log.ended(10, "preempted")
    log.ended(10, "error", "ignored: the first end wins")
    with (tmp_path / EVENTS_FILE).open("a") as file:
        file.write('{"event": "time", "ti')  # a torn line from a killed writer
    events = read_events(tmp_path)
    assert [(e["event"], e.get("kind"), e["step"]) for e in events] == [
        ("start", None, 0), ("time", "compile", 1), ("time", "train", 10), ("time", "eval", 10), ("end", None, 10)
    ]
    assert events[0]["checkpoint_dir"] == str(tmp_path / "ckpt")
    assert events[1]["time"] == 1000.0 and events[2]["time"] > 1000.0
    assert events[3]["val_loss"] == "nan"
    assert len({e["session"] for e in events}) == 1
    report = compute_report(tmp_path)
    assert (report.status, report.steps_done, report.examples_seen, report.seconds["train"]) == ("preempted", 10, 80, 2.5)
    assert report.best_val_loss is None  # a NaN evaluation is no best
    with pytest.raises(ValueError, match="unknown timing kind 'lunch'"):
        log.timed("lunch", 1.0, 10)  # type: ignore[arg-type]


def test_the_report_names_the_tier_each_restart_restored_from(tmp_path):
    for tier in (None, "local", "persistent"):  # a first start, then two restarts of a tiered run
        log = RunLog(tmp_path, enabled=True)
        log.started(0 if tier is None else 10, 30, resumed_from=None if tier is None else 10)
        if tier is not None:
            log.timed("restore", 0.1, 10, tier=tier)
        log.timed("train", 1.0, 12)
        log.ended(12, "preempted")
    report = compute_report(tmp_path)
    assert [r.tier for r in report.restarts] == ["local", "persistent"]
    text = format_report(report)
    assert "at step 10 (local tier) after preemption" in text and "at step 10 (persistent tier)" in text


def test_runlog_on_other_processes_writes_nothing(tmp_path):
    log = RunLog(tmp_path, enabled=False)
    log.started(0, 10)
    log.ended(0, "finished")
    assert not (tmp_path / "logs").exists()


def test_cli_report(synthetic, tmp_path, capsys):
    assert main(["--report", str(synthetic)]) == 0
    assert "  goodput                           48.1% (training steps / wall time)" in capsys.readouterr().out
    assert main(["--report", str(tmp_path / "empty")]) == 1
    assert "No run events in" in capsys.readouterr().err


@pytest.mark.slow
def test_report_after_sigterm_and_resume_end_to_end(tmp_path):
    from workshop_dist.training.preemption import EXIT_PREEMPTED

    workdir = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    settings = ["training.num_epochs=3", "training.cadence.log_every=1", "training.cadence.save_every=100", "training.cadence.num_samples=4"]
    command = [sys.executable, "-m", "workshop_dist.cli", "--workdir", str(workdir), *settings]
    run = StreamedProcess(command, env=env, cwd=REPO)
    run.wait_for("train step 5:")
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == EXIT_PREEMPTED, run.output[-3000:]
    run = StreamedProcess(command, env=env, cwd=REPO)
    assert run.finish() == 0, run.output[-3000:]

    report = compute_report(workdir)
    final = 3 * (1000 // 128)
    assert report.status == "finished"
    assert (report.steps_done, report.steps_to_go, report.examples_seen) == (final, 0, final * 128)
    assert report.starts == 2
    [restart] = report.restarts
    assert restart.cause == "preemption" and restart.steps_redone == 0 and 5 <= restart.at_step < final
    assert report.seconds["train"] > 0 and report.seconds["compile"] > 0 and report.seconds["save"] > 0
    assert report.seconds["restore"] > 0 and report.seconds["eval"] > 0
    assert 0 < report.goodput < 1
    assert report.best_val_loss is not None
    assert report.latest_checkpoint.step == final
    assert report.best_checkpoint is not None
    result = StreamedProcess([sys.executable, "-m", "workshop_dist.cli", "--report", str(workdir)], env=env, cwd=REPO)
    assert result.finish() == 0
    assert "goodput" in result.output and "after preemption" in result.output


def test_readme_shows_the_report_of_the_synthetic_run(synthetic):
    readme = (REPO / "README.md").read_text()
    shown = readme.split("**Run report.**", 1)[1].split("```\n", 1)[1].split("```", 1)[0].splitlines()
    actual = format_report(compute_report(synthetic)).replace(str(synthetic), "runs/vae").splitlines()
    assert [line for line in shown if "status" not in line] == [line for line in actual if "status" not in line]
