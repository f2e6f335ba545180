"""Faults, in-process through ``workshop-train``'s main: a workdir it cannot use is refused before anything
is written (one line, no traceback); a save that fails stops the run with one message (or warns, with
on_error=continue); a config changed on resume is named (or refused) and an extended run's learning rate
stays continuous; a finished run started again changes nothing."""

import contextlib
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from workshop_dist import cli
from workshop_dist.workdir_lock import WorkdirLock

QUICK = ["training.length.max_steps=1", "training.cadence.num_samples=0", "training.scheduler=null"]


def test_a_second_job_on_a_held_workdir_exits_2_naming_the_holder(tmp_path, capsys):
    workdir = tmp_path / "run"
    lock = WorkdirLock(workdir, job_id="first-job").acquire()
    try:
        code = cli.main(["--workdir", str(workdir), *QUICK])
    finally:
        lock.release()
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("workshop-train: error: ") and "first-job" in err and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert sorted(p.name for p in workdir.iterdir()) == ["workdir.lock"]  # no logs, no checkpoints


def test_a_workdir_that_cannot_be_created_is_one_line(tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a directory")
    code = cli.main(["--workdir", str(tmp_path / "a_file" / "run"), *QUICK])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("workshop-train: error: --workdir ") and err.count("\n") == 1, err


# ----------------------------------------------------------------------------- faults of a run in progress

FAST = ["training.cadence.num_samples=0", "training.cadence.log_every=1", "eval.fid_every=null"]
COSINE = "training.scheduler={scheduler_type: cosine, warmup_steps: 2, min_lr_ratio: 0.1}"


def train(workdir, *overrides: str) -> int:
    return cli.main(["--workdir", str(workdir), *FAST, *overrides])


def rows(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "logs" / "metrics.jsonl").read_text().splitlines()]


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def read_only(path: Path):
    """``path`` refuses new entries: a read-only bind mount as root (chmod does not stop root), else chmod."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o755)
        return
    try:
        subprocess.run(["mount", "--bind", str(path), str(path)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"root, and no bind mount to make {path} read-only: {err}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["umount", str(path)], check=False, capture_output=True)


@pytest.mark.slow  # trains through the CLI twice: over 10 s on 2 cores
def test_a_failed_save_stops_the_run_with_one_message_and_leaves_the_last_checkpoint(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert train(workdir, "training.length.max_steps=2", "training.scheduler=null") == 0
    checkpoints, before = workdir / "checkpoints", tree(workdir / "checkpoints" / "2")
    capsys.readouterr()
    with read_only(checkpoints):
        code = train(workdir, "training.length.max_steps=4", "training.scheduler=null", "--quiet")
    out, err = capsys.readouterr()
    assert code == 1, err
    assert "Traceback" not in out + err, err
    warning, change, message = err.strip().splitlines()  # --quiet: the config change, then the one message
    assert " W Resuming from step 2 " in warning and change == "  training.length.max_steps: 2 -> 4  [schedule]"
    assert message.startswith(f"workshop-train: error: Could not save the checkpoint of step 4 to {checkpoints}: ")
    assert "Read-only file system" in message or "Permission denied" in message  # the OS error (root / not)
    assert f"the last complete checkpoint is step 2 ({checkpoints}/2)" in message
    assert sorted(p.name for p in checkpoints.iterdir()) == ["2"]  # nothing partial of step 4
    assert tree(checkpoints / "2") == before  # untouched
    assert train(workdir, "training.length.max_steps=4", "training.scheduler=null") == 0  # fixed: it resumes
    assert "Trained 2 steps (2 -> 4)." in capsys.readouterr().out


def test_with_on_error_continue_a_failed_save_is_a_warning_and_training_goes_on(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert train(workdir, "training.length.max_steps=2", "training.scheduler=null") == 0
    capsys.readouterr()
    with read_only(workdir / "checkpoints"):
        code = train(workdir, "training.length.max_steps=6", "training.scheduler=null", "training.cadence.save_every=2",
                     "training.checkpoint.on_error=continue")  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    warnings = [line for line in err.splitlines() if " W Could not save the checkpoint" in line]
    assert [w.split("checkpoint of step ")[1].split()[0] for w in warnings] == ["4", "6"], err
    assert all("training goes on and the next save tries again" in w for w in warnings)
    assert "Traceback" not in err
    assert [r["step"] for r in rows(workdir) if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
    assert "Trained 4 steps (2 -> 6)." in out and "(latest: 2)" in out


@pytest.mark.slow  # trains through the CLI twice: over 10 s on 2 cores
def test_an_extended_run_names_the_change_and_keeps_the_learning_rate_continuous(tmp_path, capsys):
    from workshop_dist.optim import SchedulerConfiguration, create_schedule

    workdir = tmp_path / "run"
    assert train(workdir, "training.length.max_steps=6", COSINE) == 0
    capsys.readouterr()
    assert train(workdir, "training.length.max_steps=9", COSINE) == 0
    out, err = capsys.readouterr()
    assert "Resuming from step 6 with a config that differs from the checkpoint's" in err
    assert "  training.length.max_steps: 6 -> 9  [schedule]" in err.splitlines()
    [rate] = [line for line in err.splitlines() if line.startswith("  learning rate at step 6: ")]
    assert "with training.scheduler.cycle_length=6" in rate
    assert "Trained 3 steps (6 -> 9)." in out

    schedule = SchedulerConfiguration(scheduler_type="cosine", warmup_steps=2, min_lr_ratio=0.1)
    first_run, restretched = create_schedule(schedule, 2e-3, 6), create_schedule(schedule, 2e-3, 9)
    logged = {r["step"]: r["train/learning_rate"] for r in rows(workdir) if "train/learning_rate" in r}
    assert sorted(logged) == list(range(1, 10))
    # The row of step s logs the rate of its update, the schedule at s - 1: the first run's schedule at
    # every step, then its final rate, where the re-stretched schedule would have jumped back up.
    expected = [float(first_run(s - 1)) for s in range(1, 10)]
    np.testing.assert_allclose([logged[s] for s in range(1, 10)], expected, rtol=1e-5)
    assert float(restretched(6)) > 2 * float(first_run(6))
    assert "cycle_length: 6" in (workdir / "config.yaml").read_text()  # what this start ran with


def test_on_config_change_refuse_exits_2_with_the_list_and_trains_nothing(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert train(workdir, "training.length.max_steps=3", COSINE) == 0
    written, checkpoints = rows(workdir), sorted(p.name for p in (workdir / "checkpoints").iterdir())
    capsys.readouterr()
    code = train(workdir, "training.length.max_steps=4", COSINE, "training.cadence.log_every=2",
                 "training.on_config_change=refuse")  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert "workshop-train: error: The config differs from the one checkpoint 3 was saved with" in err
    assert "  training.cadence.log_every: 1 -> 2" in err.splitlines()
    assert "  training.length.max_steps: 3 -> 4  [schedule]" in err.splitlines()
    assert "Traceback" not in err
    assert rows(workdir) == written and sorted(p.name for p in (workdir / "checkpoints").iterdir()) == checkpoints
    # WORKDIR/config.yaml is still the checkpoint's run's: resuming with it is no change
    saved = ["--config", str(workdir / "config.yaml"), "training.on_config_change=refuse"]
    assert cli.main(["--workdir", str(workdir), *saved]) == 0
    assert capsys.readouterr().out.startswith("Run already finished at step 3 ")


def test_a_finished_run_started_again_changes_nothing_and_an_extension_is_no_restart(tmp_path, capsys):
    from workshop_dist.report import compute_report

    workdir = tmp_path / "run"
    assert train(workdir, "training.length.max_steps=3", COSINE) == 0
    events, written = (workdir / "logs" / "run_events.jsonl").read_text(), rows(workdir)
    checkpoints = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    capsys.readouterr()
    # refuse too: choosing how to resume is not a change of the run
    assert train(workdir, "training.length.max_steps=3", COSINE, "training.on_config_change=refuse") == 0
    out, err = capsys.readouterr()
    assert out == (
        "Run already finished at step 3 (training.length.max_steps=3); nothing to do. "
        "Raise training.length.max_steps to train on.\n"
    ), out + err
    assert rows(workdir) == written and sorted(p.name for p in (workdir / "checkpoints").iterdir()) == checkpoints
    assert (workdir / "logs" / "run_events.jsonl").read_text() == events
    assert compute_report(workdir).starts == 1

    time.sleep(1.0)  # idle between the finished process and the next start
    assert train(workdir, "training.length.max_steps=5", COSINE) == 0
    assert "Trained 2 steps (3 -> 5)." in capsys.readouterr().out
    report = compute_report(workdir)
    assert (report.starts, report.restarts, report.continuations) == (2, [], 1)
    assert report.seconds["restarts"] == 0 and report.idle_seconds >= 1.0
    assert cli.main(["--report", str(workdir)]) == 0
    assert "2 (0 restarts; 1 continued a finished run)" in capsys.readouterr().out
