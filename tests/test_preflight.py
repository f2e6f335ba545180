"""A workdir or data dir that cannot work is refused before training starts, with one message."""

import os
import re
import subprocess

import pytest

from workshop_dist.preflight import (
    PROBE_PREFIX,
    StorageError,
    bucket_name_problem,
    check_data_dir,
    check_storage,
)


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("workshop-test", True), ("a_b.c-d", True), ("abc", True), ("a" * 63, True), ("x." * 20 + "yz", True),
        ("bk", False), ("a" * 64, False), ("Upper", False), ("-start", False), ("end-", False), ("sp ace", False),
        ("192.168.5.4", False), ("goog-data", False), ("my-google-bucket", False), ("a..b", False), ("", False),
    ],
)  # fmt: skip
def test_bucket_names_follow_cloud_storage_rules(name, valid):
    assert (bucket_name_problem(name) is None) == valid


def test_an_invalid_bucket_name_is_refused_without_asking_the_network():
    with pytest.raises(StorageError) as err:
        check_storage("gs://bk/run")
    assert str(err.value).startswith("--workdir gs://bk/run: 'bk' is not a valid bucket name: it has 2 characters")
    assert err.value.exit_code == 2
    with pytest.raises(StorageError, match=r"^data.data_dir gs://Data/x: 'Data' is not a valid bucket name"):
        check_data_dir("gs://Data/x")


def test_a_local_workdir_is_created_and_probed(tmp_path):
    workdir = tmp_path / "a" / "b" / "run"
    check_storage(workdir, data_dir=tmp_path / "data-not-there-yet")
    assert workdir.is_dir() and not list(workdir.iterdir())  # the probe is gone


def test_a_workdir_under_a_file_or_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match=r"^--workdir .*/file/run cannot be created: a part of the path is a file"):
        check_storage(tmp_path / "file" / "run")
    with pytest.raises(StorageError, match=r"^--workdir .*/file is a file, not a directory"):
        check_storage(tmp_path / "file")
    with pytest.raises(StorageError, match=r"^data.data_dir .*/file is a file, not a directory"):
        check_data_dir(tmp_path / "file")


def test_a_read_only_workdir(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    if os.geteuid() == 0:  # root writes through permissions: make it a read-only mount
        subprocess.run(["mount", "--bind", str(workdir), str(workdir)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(workdir)], check=True)
        expected = "the file system is read-only"
    else:
        workdir.chmod(0o555)
        expected = "permission denied"
    try:
        with pytest.raises(StorageError, match=f"^--workdir {re.escape(str(workdir))} cannot be written: {expected}"):
            check_storage(workdir)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(workdir)], check=False)
        workdir.chmod(0o755)
    assert not [p for p in workdir.iterdir() if p.name.startswith(PROBE_PREFIX)]


def test_a_data_dir_that_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="does not exist and cannot be created"):
        check_data_dir(tmp_path / "file" / "data")
