"""Failed checkpoint saves on real broken storage: a full tmpfs and a read-only mount (root only).

Each failure is one CheckpointSaveError (which step, the OS error, the last complete
checkpoint), nothing partial is left, earlier checkpoints are untouched and restore exactly,
and Orbax's threads print no tracebacks.
"""

import logging
import os
import subprocess

import jax
import numpy as np
import pytest

from tests.helpers import small_tmpfs
from workshop_dist.checkpoint import CheckpointConfiguration, CheckpointManager, CheckpointSaveError
from workshop_dist.save_failures import SaveGuard, cause_of, short_error

SMALL = {"w": np.arange(1000, dtype=np.float32)}


def big_state() -> dict:
    """6 MiB of incompressible floats: more than the 2 MiB file system holds."""
    return {"w": jax.random.normal(jax.random.key(0), (1536, 1024))}


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


def unmount(path) -> None:
    subprocess.run(["umount", str(path)], check=False, capture_output=True)


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")


@pytest.fixture
def full_disk(tmp_path):
    """A 2 MiB tmpfs."""
    with small_tmpfs(tmp_path / "tmpfs") as path:
        yield path


def make_read_only(path) -> None:
    """``path`` becomes read-only for everyone, root too (a read-only bind mount of itself)."""
    mount("--bind", str(path), str(path))
    mount("-o", "remount,bind,ro", str(path))


def no_orbax_tracebacks(caplog, capfd) -> None:
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "RESOURCE_EXHAUSTED" not in out + err
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]
    assert not loud, [r.getMessage() for r in loud]


def saved_arrays(manager: CheckpointManager, step: int) -> np.ndarray:
    state, metadata, restored, _ = manager.restore({"w": jax.ShapeDtypeStruct((1000,), np.float32)}, step=step)
    assert restored == step and metadata == {"step": step}
    return np.asarray(state["w"])


@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_a_full_disk_is_one_error_naming_the_step_the_cause_and_the_last_good_checkpoint(
    full_disk, async_save, caplog, capfd
):
    directory = full_disk / "checkpoints"
    manager = CheckpointManager(directory, max_to_keep=1, async_save=async_save)  # 2 would prune 1
    manager.save(1, SMALL, metadata={"step": 1})
    manager.wait()
    with pytest.raises(CheckpointSaveError) as failure:
        manager.save(2, big_state(), metadata={"step": 2})
        manager.wait()
    message = str(failure.value)
    assert message.startswith(f"Could not save the checkpoint of step 2 to {directory}: the disk is full")
    assert "No space left on device" in message
    assert f"the last complete checkpoint is step 1 ({directory}/1)" in message
    assert (failure.value.step, failure.value.last_complete, failure.value.transient) == (2, 1, False)
    assert sorted(p.name for p in directory.iterdir()) == ["1"]  # no partial step 2
    assert manager.all_steps() == [1]
    np.testing.assert_array_equal(saved_arrays(manager, 1), SMALL["w"])
    manager.close()
    no_orbax_tracebacks(caplog, capfd)
    fresh = CheckpointManager(directory)  # the next start sees exactly the good checkpoint
    assert fresh.all_steps() == [1]
    fresh.close()


def test_on_error_continue_warns_and_the_next_save_tries_again(full_disk, caplog, capfd):
    manager = CheckpointManager(full_disk, max_to_keep=3, on_error="continue")
    manager.save(1, SMALL, metadata={"step": 1})
    with caplog.at_level(logging.WARNING, logger="workshop_dist"):
        assert manager.save(2, big_state(), metadata={"step": 2})  # async: started fine
        manager.save(3, SMALL, metadata={"step": 3})  # reports step 2, then saves 3
        manager.wait()
    warnings = [r.getMessage() for r in caplog.records if r.name == "workshop_dist" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Could not save the checkpoint of step 2" in warnings[0]
    assert "training goes on and the next save tries again" in warnings[0]
    assert manager.all_steps() == [1, 3] and [f.step for f in manager.guard.failures] == [2]
    manager.close()
    no_orbax_tracebacks(caplog, capfd)


@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_a_directory_that_became_read_only(tmp_path, async_save, caplog, capfd):
    """With the data position too, as the loop saves: Orbax's own async default creates the directories in
    a thread, and the data item's save waited 20 minutes (its timeout) for the one that failed."""
    from workshop_dist import data

    needs_root()
    directory = tmp_path / "checkpoints"
    position = data.make_train_input(data.DataConfiguration(cache=True), global_batch_size=64, seed=0).iterator
    manager = CheckpointManager(directory, async_save=async_save)
    manager.save(1, SMALL, metadata={"step": 1}, data_iterator=position)
    manager.wait()
    make_read_only(directory)
    try:
        with pytest.raises(CheckpointSaveError, match="the file system is read-only") as failure:
            manager.save(2, SMALL, metadata={"step": 2}, data_iterator=position)
            manager.wait()
        assert failure.value.last_complete == 1
        assert "Read-only file system" in str(failure.value)
        manager.close()
    finally:
        unmount(directory)
    assert sorted(p.name for p in directory.iterdir()) == ["1"]
    no_orbax_tracebacks(caplog, capfd)


def test_transient_errors_of_a_sync_save_are_retried_with_backoff(tmp_path, caplog):
    manager = CheckpointManager(tmp_path, async_save=False, save_retries=2, retry_seconds=0.01)
    orbax_save, calls = manager._manager.save, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) <= 2:
            raise ConnectionError("Connection refused")
        return orbax_save(*args, **kwargs)

    manager._manager.save = flaky
    with caplog.at_level(logging.WARNING, logger="workshop_dist"):
        assert manager.save(1, SMALL, metadata={"step": 1})
    assert len(calls) == 3 and manager.all_steps() == [1]
    assert caplog.text.count("trying again") == 2

    calls.clear()
    with pytest.raises(CheckpointSaveError, match="the storage is unreachable") as failure:
        manager._manager.save = lambda *a, **k: (calls.append(1), flaky_forever())
        manager.save(2, SMALL, metadata={"step": 2})
    assert len(calls) == 3 and failure.value.transient and failure.value.last_complete == 1
    manager.close()


def flaky_forever():
    raise TimeoutError("timed out")


class FailingWaits:
    """Orbax's manager as seen after async saves whose background writes failed transiently."""

    def __init__(self, errors):
        self.errors = list(errors)

    def wait_until_finished(self):
        if self.errors and (error := self.errors.pop(0)):
            raise error

    def reload(self):
        pass

    def all_steps(self):
        return [1]

    def close(self):
        pass


def test_transient_async_failures_count_only_after_the_retries(tmp_path):
    unavailable = ValueError("UNAVAILABLE: gcs request failed")
    guard = SaveGuard(FailingWaits([unavailable] * 3), tmp_path, retries=2)
    for step in (2, 3):  # two transient failures in a row: warnings, the next save is the retry
        guard.save(step, lambda: True)
        guard.settle()
    guard.save(4, lambda: True)
    with pytest.raises(CheckpointSaveError, match="step 4"):  # the third counts
        guard.settle()

    guard = SaveGuard(FailingWaits([unavailable, None, unavailable, unavailable]), tmp_path, retries=1)
    for step in (2, 3, 4):  # a success in between resets the count
        guard.save(step, lambda: True)
        guard.settle()
    guard.save(5, lambda: True)
    with pytest.raises(CheckpointSaveError, match="step 5"):
        guard.settle()


@pytest.mark.parametrize(
    ("error", "what", "transient"),
    [
        (OSError(28, "No space left on device"), "the disk is full", False),
        (ValueError("PERMISSION_DENIED: HTTP response code: 403"), "permission denied", False),
        (ValueError('INVALID_ARGUMENT: Invalid GCS bucket name: "bk"'), "the bucket name is invalid", False),
        (OSError(5, "Input/output error"), "an I/O error", False),
        (ConnectionError("reset"), "the storage is unreachable", True),
        (ValueError("DEADLINE_EXCEEDED: while writing"), "the storage is unreachable", True),
        (RuntimeError("something else"), "a storage error", False),
    ],
)
def test_causes(error, what, transient):
    assert (cause_of(error).what, cause_of(error).transient) == (what, transient)


def test_short_errors_keep_the_os_error_of_a_tensorstore_message():
    long = ValueError(
        'RESOURCE_EXHAUSTED: Error writing "w/0.0" in OCDBT database at local file "/a/2.orbax-checkpoint-tmp/": '
        "Failed writing: \"/a/d/1\": Failed to write 9 bytes to file 4: No space left on device [os_error_code='28']"
    )
    assert short_error(long) == "RESOURCE_EXHAUSTED: Failed to write 9 bytes to file 4: No space left on device [os_error_code='28']"


def test_on_error_is_part_of_the_checkpoint_configuration():
    config = CheckpointConfiguration(on_error="continue", save_retries=1)
    manager_kwargs = CheckpointManager.from_config  # the loop builds its manager from the section
    assert callable(manager_kwargs) and config.on_error == "continue" and config.lock_timeout == 60
    with pytest.raises(Exception, match="on_error"):
        CheckpointConfiguration(on_error="ignore")
