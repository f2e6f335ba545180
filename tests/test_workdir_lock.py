"""One job per workdir: the lock, its refresh, take-over of dead holders, and multi-process agreement."""

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from workshop_dist import versioned_file, workdir_lock
from workshop_dist.workdir_lock import LOCK_FILE, WorkdirBusyError, WorkdirLock, WorkdirLockLost, hold_workdir

REPO = Path(__file__).resolve().parents[1]


def write_holder(workdir: Path, **fields) -> None:
    """A lock as another job would have left it."""
    now = time.time()
    holder = {"job_id": "other-job", "host": socket.gethostname(), "pid": 1, "started": now - 100,
              "refreshed": now, "process_count": 1, "version": 7, **fields}  # fmt: skip
    (workdir / LOCK_FILE).write_text(json.dumps(holder))


def read_lock(workdir: Path) -> dict:
    """The lock's content as another job reads it: under the shared flock, never mid-rewrite."""
    data, _ = versioned_file.versioned_file(workdir / LOCK_FILE).read()
    assert data is not None, "no lock file"
    return data


def test_the_lock_names_its_holder_and_is_refreshed_then_released(tmp_path):
    with WorkdirLock(tmp_path, job_id="job-a", timeout=3, refresh_seconds=0.1) as lock:
        first = read_lock(tmp_path)
        assert (first["job_id"], first["host"], first["pid"]) == ("job-a", socket.gethostname(), os.getpid())
        assert first["released"] is None and abs(first["started"] - time.time()) < 5
        time.sleep(0.5)
        later = read_lock(tmp_path)
        assert later["refreshed"] > first["refreshed"] and later["version"] > first["version"]
        assert later["started"] == first["started"]
        assert lock.held
    released = read_lock(tmp_path)
    assert released["released"] is not None and not lock.held
    time.sleep(0.3)
    assert read_lock(tmp_path) == released  # the refresh thread stopped
    with WorkdirLock(tmp_path, job_id="job-b") as again:  # a released lock is free: no take-over
        assert again.took_over is None


def test_a_live_holder_on_this_host_refuses_the_second_job_with_one_message(tmp_path):
    write_holder(tmp_path, pid=os.getppid())  # a live process that is not us
    with pytest.raises(WorkdirBusyError) as err:
        WorkdirLock(tmp_path, job_id="job-b", timeout=60).acquire()
    message = str(err.value)
    assert err.value.exit_code == 2
    assert f"is in use by job other-job (pid {os.getppid()} on host {socket.gethostname()}" in message
    assert "use another --workdir" in message and "lock_timeout=60" in message
    assert read_lock(tmp_path)["job_id"] == "other-job"  # untouched


def test_this_process_cannot_take_its_own_held_lock_twice(tmp_path):
    with WorkdirLock(tmp_path, job_id="job-a"), pytest.raises(WorkdirBusyError, match="job job-a"):
        WorkdirLock(tmp_path, job_id="job-a").acquire()


@pytest.mark.slow
def test_a_dead_holder_on_this_host_is_taken_over_with_a_warning(tmp_path, caplog):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    write_holder(tmp_path, pid=gone.pid)
    with caplog.at_level(logging.WARNING, logger="workshop_dist"), WorkdirLock(tmp_path, job_id="job-b") as lock:
        assert lock.took_over is not None and lock.took_over.pid == gone.pid
        assert read_lock(tmp_path)["job_id"] == "job-b"
    assert f"Took over the lock of {tmp_path}, job other-job" in caplog.text
    assert f"process {gone.pid} is no longer running" in caplog.text


def test_a_reused_pid_does_not_keep_a_dead_lock_alive(tmp_path):
    write_holder(tmp_path, pid=os.getppid(), pid_start=1)  # the pid runs, but started at another time
    with WorkdirLock(tmp_path, job_id="job-b") as lock:
        assert lock.took_over is not None


def test_another_hosts_holder_is_taken_over_when_stale_and_refused_while_it_refreshes(tmp_path):
    write_holder(tmp_path, host="elsewhere", refreshed=time.time() - 120)
    with WorkdirLock(tmp_path, job_id="job-b", timeout=60) as lock:  # stale by its timestamp: at once
        assert lock.took_over.host == "elsewhere"

    write_holder(tmp_path, host="elsewhere")  # fresh, but never refreshed again: watched for `timeout`
    start = time.monotonic()
    with WorkdirLock(tmp_path, job_id="job-c", timeout=1.0) as lock:
        assert lock.took_over.host == "elsewhere"
    assert 1.0 <= time.monotonic() - start < 10

    other = WorkdirLock(tmp_path, job_id="live-elsewhere", timeout=30, refresh_seconds=0.2)
    other._holder.host = "elsewhere"  # a live job on another host: it keeps refreshing
    with other:
        start = time.monotonic()
        with pytest.raises(WorkdirBusyError, match=r"job live-elsewhere .* on host elsewhere"):
            WorkdirLock(tmp_path, job_id="job-d", timeout=30).acquire()
        assert time.monotonic() - start < 5  # recognised by its next refresh, not after the timeout


def test_a_job_whose_lock_was_taken_over_finds_out(tmp_path):
    lock = WorkdirLock(tmp_path, job_id="stalled", timeout=60, refresh_seconds=0.1).acquire()
    store = versioned_file.LocalVersionedFile(tmp_path / LOCK_FILE)
    data, version = store.read()
    store.write({**data, "job_id": "newcomer", "pid": os.getppid()}, version)  # what a take-over writes
    deadline = time.monotonic() + 5
    while lock.lost_to is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(WorkdirLockLost, match="taken over by job newcomer"):
        lock.check()
    lock.release()
    assert read_lock(tmp_path)["job_id"] == "newcomer"  # its release does not touch the new holder's lock


def test_processes_of_one_job_share_process_0s_lock(tmp_path):
    lock = hold_workdir(tmp_path, job_id="job-x", process_index=0, process_count=2, agree=lambda ok: ok)
    assert read_lock(tmp_path)["process_count"] == 2
    assert hold_workdir(tmp_path, job_id="job-x", process_index=1, process_count=2, agree=lambda ok: True) is None
    lock.release()

    write_holder(tmp_path, pid=os.getppid())
    with pytest.raises(WorkdirBusyError, match="in use by job other-job"):  # process 0 said no
        hold_workdir(tmp_path, job_id="job-y", process_index=1, process_count=2, agree=lambda ok: False)
    with pytest.raises(WorkdirBusyError, match="in use by job other-job"):
        hold_workdir(tmp_path, job_id="job-y", process_index=0, process_count=2, agree=lambda ok: ok)


def test_the_job_id_is_the_same_in_every_process_of_a_job():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"}
    assert workdir_lock.default_job_id(env) == workdir_lock.default_job_id(dict(env)) == "coordinator-10.0.0.2:1234"
    assert workdir_lock.default_job_id({"SLURM_JOB_ID": "77", **env}) == "slurm-77"
    assert workdir_lock.default_job_id({"WORKSHOP_JOB_ID": "mine", "SLURM_JOB_ID": "77"}) == "mine"
    assert workdir_lock.default_job_id({}) != workdir_lock.default_job_id({})  # single processes: unique


HOLD = textwrap.dedent(
    """
    import sys, time
    from workshop_dist.workdir_lock import WorkdirBusyError, WorkdirLock
    try:
        with WorkdirLock(sys.argv[1], timeout=30):
            print("HELD", flush=True)
            time.sleep(float(sys.argv[2]))
    except WorkdirBusyError as err:
        print(err, flush=True)
        sys.exit(err.exit_code)
    """
)


@pytest.mark.slow
def test_of_jobs_racing_for_one_workdir_exactly_one_wins_and_a_kill_frees_it(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    racers = [
        subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path), "3"], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outputs = [(proc.wait(timeout=120), proc.stdout.read()) for proc in racers]
    assert sorted(code for code, _ in outputs) == [0, 2, 2, 2], outputs
    assert all("is in use by job" in out for code, out in outputs if code == 2)

    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path), "600"], env=env, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "HELD"
    holder.kill()  # SIGKILL: no release
    holder.wait()
    assert read_lock(tmp_path)["released"] is None
    with WorkdirLock(tmp_path) as lock:  # its process is gone: taken over at once
        assert lock.took_over.pid == holder.pid
