"""One job per workdir: a lock file that a running job holds and refreshes.

Two jobs on one workdir (a job submitted twice, a requeue that overlaps the old one) would
interleave their checkpoints and logs, and the second one's start would delete the first
one's save in progress as an incomplete checkpoint. So a job takes ``WORKDIR/workdir.lock``
before it touches anything else there, and a second job exits (code 2) with one message
naming the holder.

The lock is a small JSON object: the job id, host, pid, start time, last refresh, and after
a clean exit ``released``. A background thread rewrites it every ``refresh_seconds`` (default
a sixth of ``timeout``, at most 10 s) while the job runs. Every write is conditional on the
version read before it (:mod:`workshop_dist.versioned_file`: ``flock`` on disk,
``if_generation_match`` on Cloud Storage), so of two processes racing for the lock exactly
one wins, and a release overwrites the lock with a ``released`` marker.

A lock whose holder is gone is taken over with a warning: its process is dead (same host:
the pid is gone or belongs to a newer process), or it was not refreshed for ``timeout``
seconds (another host: judged by its timestamp, which assumes the hosts' clocks agree to
within ``timeout``, or by watching it not change for ``timeout`` seconds). A live holder on
another host is recognised by its next refresh, a few seconds after the second job starts.
If a lock is taken over from a job that was alive after all (it stalled for longer than
``timeout``), its refresh thread notices and :meth:`WorkdirLock.check` raises in it.

Multi-host jobs share one lock: process 0 takes it (:func:`hold_workdir`) and tells the
others whether it could (one broadcast through JAX), so every process of a refused job exits
with the same message and code. The job id (``WORKSHOP_JOB_ID``, else the scheduler's job
id, else the coordinator address; identical in every process of a job) is written into the
lock, so the other processes recognise it as their job's where they can read it.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from workshop_dist import storage
from workshop_dist.config import WorkshopError
from workshop_dist.versioned_file import VersionConflict, versioned_file

LOCK_FILE = "workdir.lock"
_HELD: set[str] = set()  # lock paths this process holds now
DEFAULT_TIMEOUT = 60.0
POLL_SECONDS = 0.5
log = logging.getLogger("workshop_dist")


class WorkdirBusyError(WorkshopError):
    """Another job holds the workdir."""

    exit_code = 2


class WorkdirLockLost(WorkshopError):
    """This job's lock was taken over by another job (this one stalled for longer than the timeout)."""


@dataclasses.dataclass
class Holder:
    job_id: str
    host: str
    pid: int
    started: float
    refreshed: float
    process_count: int = 1
    pid_start: int | None = None  # the process's start time (Linux clock ticks): tells a reused pid apart
    released: float | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Holder | None:
        fields = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in fields})
        except TypeError:
            return None

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        started = datetime.datetime.fromtimestamp(self.started).isoformat(sep=" ", timespec="seconds")
        processes = f", {self.process_count} processes" if self.process_count > 1 else ""
        return (
            f"job {self.job_id} (pid {self.pid} on host {self.host}{processes}, started {started}, "
            f"last refreshed {max(now - self.refreshed, 0):.0f} s ago)"
        )


def default_job_id(env: Mapping[str, str] | None = None) -> str:
    """The id every process of this job computes alike (a fresh one for a single process)."""
    env = os.environ if env is None else env
    for name, prefix in (("WORKSHOP_JOB_ID", ""), ("SLURM_JOB_ID", "slurm-"), ("JAX_COORDINATOR_ADDRESS", "coordinator-")):
        if env.get(name):
            return prefix + env[name]
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def process_start_ticks(pid: int) -> int | None:
    """When ``pid`` started (Linux ``/proc/<pid>/stat`` field 22), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def process_alive(pid: int, start_ticks: int | None = None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: alive
    if start_ticks is not None:
        now = process_start_ticks(pid)
        return now is None or now == start_ticks
    return True


# ----------------------------------------------------------------------------- the lock


class WorkdirLock:
    """``with WorkdirLock(workdir):`` holds ``WORKDIR/workdir.lock`` for this job (see the module doc)."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        job_id: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        refresh_seconds: float | None = None,
        process_count: int = 1,
    ):
        self.path = storage.as_path(workdir) / LOCK_FILE
        self.job_id = job_id or default_job_id()
        self.timeout = float(timeout)
        self.refresh_seconds = refresh_seconds if refresh_seconds is not None else min(self.timeout / 6, 10.0)
        self.process_count = process_count
        self._store = versioned_file(self.path)
        self._version: int | None = None  # of our last write, while held
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()
        self.lost_to: Holder | None = None
        self.took_over: Holder | None = None
        self._holder = Holder(self.job_id, socket.gethostname(), os.getpid(), 0.0, 0.0, process_count,
                              process_start_ticks(os.getpid()))  # fmt: skip

    @property
    def held(self) -> bool:
        return self._version is not None and self.lost_to is None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> WorkdirLock:
        """Take the lock, waiting (at most ``timeout`` s) only to tell a dead holder on another host from a live one."""
        seen: tuple[int, float] | None = None  # (version, monotonic time) a foreign holder was first seen at
        while True:
            data, version = self._store.read()
            holder = Holder.from_json(data) if data else None
            reason = None
            if holder is not None and holder.released is None:
                reason = self._gone(holder)
                if reason is None and holder.host == socket.gethostname():
                    raise self._busy(holder)  # its process runs on this host
                if reason is None:
                    if seen is None or seen[0] != version:
                        if seen is not None:  # it refreshed while we watched: alive
                            raise self._busy(holder)
                        seen = (version, time.monotonic())
                    elif time.monotonic() - seen[1] >= self.timeout:
                        reason = f"it has not been refreshed for {self.timeout:.0f} s"
                    if reason is None:
                        time.sleep(min(POLL_SECONDS, self.refresh_seconds))
                        continue
            now = time.time()
            mine = dataclasses.asdict(dataclasses.replace(self._holder, started=now, refreshed=now))
            try:
                self._version = self._store.write(mine, version)
            except VersionConflict:
                seen = None
                continue  # someone else wrote in between: look again
            self._holder = Holder(**mine)
            if reason is not None:
                self.took_over = holder
                log.warning("Took over the lock of %s, %s: %s.", self.path.parent, holder.describe(now), reason)
            break
        self._stop.clear()
        self._thread = threading.Thread(target=self._refresh_loop, name="workdir-lock", daemon=True)
        self._thread.start()
        _HELD.add(os.fspath(self.path))
        atexit.register(self.release)
        return self

    def _gone(self, holder: Holder) -> str | None:
        """Why ``holder`` no longer holds the lock, or None if it may still."""
        if holder.host == socket.gethostname():
            if holder.pid == os.getpid() and holder.pid_start == self._holder.pid_start:
                held = os.fspath(self.path) in _HELD
                return None if held else "it was this process's own lock, left behind"
            if not process_alive(holder.pid, holder.pid_start):
                return f"process {holder.pid} is no longer running"
            return None
        age = time.time() - holder.refreshed
        return f"it has not been refreshed for {age:.0f} s" if age > self.timeout else None

    def _busy(self, holder: Holder) -> WorkdirBusyError:
        return WorkdirBusyError(
            f"{self.path.parent} is in use by {holder.describe()}. Two jobs on one workdir would interleave "
            f"their checkpoints and logs: wait for that job to end or stop it, or use another --workdir. "
            f"If it is gone, its lock ({self.path}) is taken over once it has not been refreshed for "
            f"training.checkpoint.lock_timeout={self.timeout:.0f} s."
        )

    def _refresh_loop(self) -> None:
        failing_since: float | None = None
        while not self._stop.wait(self.refresh_seconds):
            try:
                self._refresh()
                failing_since = None
            except VersionConflict:
                data, _ = self._store.read()
                self.lost_to = Holder.from_json(data or {}) or self._holder
                log.error("The lock of %s was taken over by %s: this job must stop.", self.path.parent, self.lost_to.describe())
                return
            except Exception as err:  # storage hiccup: keep trying; the lock goes stale only after `timeout`
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning("Could not refresh the lock of %s (will retry): %s", self.path.parent, err)

    def _refresh(self) -> None:
        with self._mutex:
            if self._version is None:
                return
            mine = dataclasses.asdict(dataclasses.replace(self._holder, refreshed=time.time()))
            self._version = self._store.write(mine, self._version)

    def check(self) -> None:
        """Raise :class:`WorkdirLockLost` if another job took the lock over (call before each save)."""
        if self.lost_to is not None:
            raise WorkdirLockLost(
                f"{self.path.parent} was taken over by {self.lost_to.describe()} while this job held it (this "
                f"job did not refresh its lock for training.checkpoint.lock_timeout={self.timeout:.0f} s): stopping "
                "without writing anything more there."
            )

    def release(self) -> None:
        """Stop refreshing and mark the lock released (idempotent; also runs at exit)."""
        atexit.unregister(self.release)
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        self._thread = None
        with self._mutex:
            version, self._version = self._version, None
            if version is None:
                return
            _HELD.discard(os.fspath(self.path))
            if self.lost_to is not None:
                return
            released = dataclasses.asdict(dataclasses.replace(self._holder, refreshed=time.time(), released=time.time()))
            try:
                self._store.write(released, version)
            except VersionConflict:
                pass  # taken over meanwhile: nothing of ours to release
            except Exception as err:
                log.warning("Could not release the lock of %s (the next job takes it over when stale): %s", self.path.parent, err)

    def read_holder(self) -> Holder | None:
        data, _ = self._store.read()
        return Holder.from_json(data) if data else None


def hold_workdir(
    workdir: str | os.PathLike,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    job_id: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    agree: Callable[[bool], bool] | None = None,
) -> WorkdirLock | None:
    """Take the workdir for this job: process 0 holds the lock, every process learns whether it could.

    Returns the lock on process 0 (release it, or use it as a context manager), None on the
    others. Raises :class:`WorkdirBusyError` in every process when another job holds it.
    ``agree(ok)`` gives every process process 0's ``ok`` (default: a JAX broadcast).
    """
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    job_id = job_id or default_job_id()
    lock, error = None, None
    if process_index == 0:
        try:
            lock = WorkdirLock(workdir, job_id=job_id, timeout=timeout, process_count=process_count).acquire()
        except WorkdirBusyError as err:
            error = err
    if process_count > 1:
        ok = (agree or _broadcast_from_process_0)(error is None)
        if not ok and error is None:
            holder = _readable_holder(workdir)
            error = WorkdirBusyError(
                f"{storage.as_path(workdir)} is in use by {holder.describe() if holder else 'another job'} "
                "(process 0 could not take its lock): use another --workdir, or stop that job."
            )
        if ok and process_index != 0:
            holder = _readable_holder(workdir)
            if holder is not None and holder.job_id != job_id:  # this host sees another job's lock
                log.warning("The lock of %s names %s, not this job (%s).", workdir, holder.describe(), job_id)
    if error is not None:
        raise error
    return lock


def _readable_holder(workdir: str | os.PathLike) -> Holder | None:
    with contextlib.suppress(Exception):
        path = storage.as_path(workdir) / LOCK_FILE
        if storage.is_remote(path) or path.exists():
            data, _ = versioned_file(path).read()
            return Holder.from_json(data) if data else None
    return None


def _broadcast_from_process_0(ok: bool) -> bool:
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))
