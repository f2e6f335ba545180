"""storage.SyncedDir, the local staging that Cloud Storage log files go through, against a local
"remote" directory (the gs:// end to end runs against an emulator in the slow test_gcs.py)."""

from workshop_dist import storage


def test_synced_dir_uploads_changes_at_its_interval_and_resumes_from_the_remote(tmp_path):
    remote = tmp_path / "remote"
    remote.mkdir()
    synced = storage.SyncedDir(remote, interval=3600)
    log = synced.local("metrics.jsonl")
    log.write_text("step 1\n")
    synced.sync(force=True)
    assert (remote / "metrics.jsonl").read_text() == "step 1\n"
    with log.open("a") as out:
        out.write("step 2\n")
    synced.sync()  # within the interval: nothing uploaded yet
    assert (remote / "metrics.jsonl").read_text() == "step 1\n"
    staging = synced.path
    synced.close()  # uploads what changed and removes the staging directory
    assert (remote / "metrics.jsonl").read_text() == "step 1\nstep 2\n"
    assert not staging.exists()

    resumed = storage.SyncedDir(remote, interval=0)
    log = resumed.local("metrics.jsonl", resume=True)  # a restarted run appends to what was there
    assert log.read_text() == "step 1\nstep 2\n"
    with log.open("a") as out:
        out.write("step 3\n")
    resumed.sync()
    assert (remote / "metrics.jsonl").read_text().splitlines() == ["step 1", "step 2", "step 3"]
    resumed.close()
