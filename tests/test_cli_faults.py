"""workshop-train refuses a workdir it cannot use before it writes anything there: one line, no traceback."""

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
