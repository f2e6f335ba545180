"""What went wrong when a checkpoint could not be written, in one sentence, and what is left on disk.

Orbax writes a checkpoint in background threads; when the disk is full, a directory read-only
or a bucket unreachable, each of those threads logs the same exception with its traceback
(hundreds of lines), and the exception itself surfaces only at the next ``save`` or
``wait_until_finished``. :class:`workshop_dist.checkpoint.CheckpointManager` surfaces it there
as one :class:`~workshop_dist.checkpoint.CheckpointSaveError`, built from :func:`describe`;
:class:`OrbaxThreadTracebacks` turns the threads' copies into debug records (``--verbose``
shows them), and :func:`remove_incomplete` deletes what the failed save left, so the next
start sees only complete checkpoints.

Transient errors (a connection refused or reset, a timeout, ``UNAVAILABLE``) are worth
another try; a full disk, missing permission or invalid bucket are not.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from typing import Any

from workshop_dist.config import WorkshopError

log = logging.getLogger("workshop_dist")


@dataclasses.dataclass(frozen=True)
class Cause:
    """A known kind of storage failure: how to recognise it, say it and fix it."""

    patterns: tuple[str, ...]
    what: str
    fix: str
    transient: bool = False


CAUSES = (
    Cause(("No space left on device", "os_error_code='28'", "ENOSPC"), "the disk is full",
          "free space there (or set training.checkpoint.directory to a bigger disk)"),
    Cause(("Read-only file system", "os_error_code='30'", "EROFS"), "the file system is read-only",
          "make it writable, or set training.checkpoint.directory elsewhere"),
    Cause(("Permission denied", "PERMISSION_DENIED", "os_error_code='13'", "code: 403", "Forbidden"), "permission denied",
          "give this user (or service account) write access there"),
    Cause(("Invalid GCS bucket name", "Invalid bucket name"), "the bucket name is invalid",
          "use a valid bucket name (3-63 characters: a-z, 0-9, '-', '_', '.')"),
    Cause(("Input/output error", "os_error_code='5'", "EIO"), "an I/O error", "check the disk (dmesg) before resuming"),
    Cause(("NoSuchBucket", "The specified bucket does not exist", "bucket does not exist"), "the bucket does not exist",
          "create the bucket or fix the name"),
    Cause(("Connection refused", "Connection reset", "UNAVAILABLE", "DEADLINE_EXCEEDED", "timed out", "Timeout",
           "Could not resolve host", "Name or service not known", "code: 503", "code: 429", "ServiceUnavailable",
           "TooManyRequests"),
          "the storage is unreachable", "check the network and the bucket's availability", transient=True),
)  # fmt: skip
UNKNOWN = Cause((), "a storage error", "fix the storage problem above")


def cause_of(err: BaseException) -> Cause:
    text = f"{type(err).__name__}: {err}"
    for cause in CAUSES:
        if any(pattern in text for pattern in cause.patterns):
            return cause
    if isinstance(err, (ConnectionError, TimeoutError)):
        return CAUSES[-1]
    return UNKNOWN


def short_error(err: BaseException, limit: int = 400) -> str:
    """The first line of ``err``, at most ``limit`` characters (the OS or storage error is at its end)."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    code, _, rest = text.partition(": ")
    if code.isupper() and '": ' in rest:  # tensorstore: CODE: Error writing "a": Failed writing: "b": the OS error
        text = f"{code}: {rest.rsplit(chr(34) + ': ', 1)[1]}"
    if len(text) > limit:
        text = text[: limit // 3] + " ... " + text[-(2 * limit) // 3 :]
    return text


def describe(step: int, where: str, err: BaseException, last_complete: int | None, on_error: str) -> str:
    """The one message a failed save gets: which checkpoint, why, what is left, what to do."""
    cause = cause_of(err)
    last = (
        f"the last complete checkpoint is step {last_complete} ({where}/{last_complete})"
        if last_complete is not None
        else "there is no complete checkpoint yet"
    )
    then = (
        "training goes on and the next save tries again"
        if on_error == "continue"
        else "then run the same command again to resume from it"
    )
    return (
        f"Could not save the checkpoint of step {step} to {where}: {cause.what} ({short_error(err)}). "
        f"Nothing of step {step} was kept and earlier checkpoints are untouched; {last}. "
        f"To fix: {cause.fix}; {then}."
    )


def remove_incomplete(directory: Any, step: int, complete_steps: list[int]) -> list[str]:
    """Delete what a failed save of ``step`` left in ``directory`` (local or gs://); returns the names removed.

    Orbax writes ``<step>.orbax-checkpoint-tmp`` and renames it when complete (on Cloud
    Storage, which cannot rename, it writes ``<step>`` and marks it complete instead), so a
    failed save leaves a temporary directory, or a ``<step>`` that is not complete.
    """
    removed = []
    candidates = [p for p in directory.glob(f"{step}.orbax-checkpoint-tmp*")]
    if step not in complete_steps:
        candidates.append(directory / str(step))
    for path in candidates:
        try:
            if not path.exists():
                continue
            if hasattr(path, "rmtree"):  # etils.epath (gs://)
                path.rmtree()
            else:
                shutil.rmtree(path)
            removed.append(path.name)
        except Exception as err:  # a broken disk may refuse even this: the next start ignores and cleans it
            log.debug("Could not remove %s after a failed save: %s", path, err)
    return removed


class OrbaxThreadTracebacks(logging.Filter):
    """Orbax's background threads log a failed save's exception with a traceback, once per thread.

    The manager raises that exception itself (one message), so these copies become debug
    records of ``workshop_dist`` (shown with ``--verbose``) instead of error tracebacks.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.exc_info and "orbax" in record.pathname.replace("\\", "/"):
            log.debug("Orbax: %s", record.getMessage(), exc_info=record.exc_info)
            return False
        return True


class CheckpointSaveError(WorkshopError):
    """A checkpoint could not be written (the message names it, the storage error and the last good one)."""

    def __init__(self, message: str, *, step: int, last_complete: int | None, transient: bool):
        super().__init__(message)
        self.step, self.last_complete, self.transient = step, last_complete, transient


class SaveGuard:
    """Runs the saves of one Orbax ``CheckpointManager`` and turns their failures into one message.

    A failed save (sync: raised by ``save``; async: raised by Orbax at the next save or
    ``wait_until_finished``) is cleaned up (:func:`remove_incomplete`; the manager re-reads its
    steps from storage, since Orbax forgets pruned steps before the save completes), then:

    - transient (see :data:`CAUSES`): a sync save is tried again at once, ``retries`` times
      with exponential backoff from ``retry_seconds``; an async one cannot be (the loop has
      moved on), so it is a warning and the next save is the retry, ``retries`` times in a row;
    - otherwise, or when the retries are used up: ``on_error="stop"`` raises
      :class:`CheckpointSaveError`; ``"continue"`` logs it as a warning and goes on.
    """

    def __init__(self, manager: Any, directory: Any, *, on_error: str = "stop", retries: int = 3,
                 retry_seconds: float = 1.0, async_save: bool = True):  # fmt: skip
        self.manager, self.directory = manager, directory
        self.on_error, self.retries, self.retry_seconds, self.async_save = on_error, retries, retry_seconds, async_save
        self.failures: list[CheckpointSaveError] = []  # every failed save of this process, in order
        self._in_flight: int | None = None  # an async save's step, until it is known complete
        self._transient_in_a_row = 0

    def save(self, step: int, start: Any) -> bool:
        """``start()`` begins Orbax's save of ``step``; returns what it returns, False when it failed."""
        for attempt in range(self.retries + 1):
            try:
                started = start()
            except Exception as err:
                try:  # Orbax may have started background work (its directories) before raising
                    self.manager.wait_until_finished()
                except Exception as later:
                    log.debug("After the failed save of step %d: %s", step, later)
                failure = self._failed(step, err)
                if failure.transient and attempt < self.retries:
                    delay = self.retry_seconds * 2**attempt
                    log.warning("Saving step %d failed (%s); trying again in %.1f s.", step, short_error(err), delay)
                    time.sleep(delay)
                    continue
                self._report(failure, counted=True)
                return False
            if self.async_save:
                self._in_flight = step
            else:
                self._transient_in_a_row = 0
            return bool(started)
        return False

    def settle(self) -> None:
        """Wait for the async save in flight; report it if it failed."""
        step, self._in_flight = self._in_flight, None
        try:
            self.manager.wait_until_finished()
        except Exception as err:
            if step is None:
                raise
            failure = self._failed(step, err)
            self._transient_in_a_row = self._transient_in_a_row + 1 if failure.transient else 0
            self._report(failure, counted=not failure.transient or self._transient_in_a_row > self.retries)
            return
        if step is not None:
            self._transient_in_a_row = 0

    def close(self) -> None:
        """Settle, then close Orbax's threads whatever happened (so nothing prints after the message)."""
        try:
            self.settle()
        finally:
            try:
                self.manager.close()
            except Exception as err:  # after a failed save Orbax may raise the same exception again
                log.debug("Closing the checkpoint manager after a failed save: %s", err)

    def _failed(self, step: int, err: BaseException) -> CheckpointSaveError:
        complete: list[int] = []
        try:
            self.manager.reload()
            complete = sorted(self.manager.all_steps())
        except Exception as listing:  # the storage may be unreachable: say so without a step
            log.debug("Could not list %s after a failed save: %s", self.directory, listing)
        if _is_primary():
            removed = remove_incomplete(self.directory, step, complete)
            if removed:
                log.debug("Removed the incomplete save %s from %s.", ", ".join(removed), self.directory)
        last = max((s for s in complete if s != step), default=None)
        failure = CheckpointSaveError(
            describe(step, str(self.directory), err, last, self.on_error),
            step=step, last_complete=last, transient=cause_of(err).transient,
        )  # fmt: skip
        failure.__cause__ = err
        return failure

    def _report(self, failure: CheckpointSaveError, *, counted: bool) -> None:
        self.failures.append(failure)
        if counted and self.on_error == "stop":
            raise failure
        log.warning("%s%s", failure, "" if counted else " (transient: the next save tries again)")


def _is_primary() -> bool:
    import jax

    return jax.process_index() == 0
