"""Refuse, before training starts, a workdir or data dir that cannot work.

Without these checks a bad ``--workdir`` is found late and loudly: ``gs://bk/run`` (an
invalid bucket name) trains until the first checkpoint save, whose background threads then
print dozens of tracebacks; a local path under a file ends in a ``FileNotFoundError``
traceback. :func:`check_storage` tries what the run will do, once, and raises one
:class:`StorageError` (exit code 2) naming the path, what is wrong and what to do:

- ``gs://``: the bucket name is valid (Cloud Storage's rules), the bucket exists, and the
  workdir can be written (a tiny object is written and deleted); the data dir's bucket
  exists and can be listed. Transient errors are retried with backoff for ``retry_seconds``.
- local: the workdir can be created and written (a probe file is written, synced and
  removed); a data dir that exists is a readable directory, one that does not could be
  created.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import re
import uuid
from pathlib import Path

from workshop_dist import storage
from workshop_dist.config import WorkshopError

PROBE_PREFIX = ".workshop-write-test-"
_BUCKET_CHARS = re.compile(r"^[a-z0-9][a-z0-9._-]*[a-z0-9]$")
BUCKET_RULES = (
    "3-63 characters (up to 222 with dots, 63 between dots) of lowercase letters, digits, '-', '_' and '.', "
    "starting and ending with a letter or digit"
)


class StorageError(WorkshopError):
    """A workdir or data dir that cannot work; found before training starts."""

    exit_code = 2


def bucket_name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid Cloud Storage bucket name, or None if it is."""
    if not _BUCKET_CHARS.match(name):
        return f"'{name}' is not a valid bucket name ({BUCKET_RULES})"
    if "." in name:
        if len(name) > 222 or any(not 1 <= len(part) <= 63 for part in name.split(".")):
            return f"'{name}' is not a valid bucket name ({BUCKET_RULES})"
    elif not 3 <= len(name) <= 63:
        return f"'{name}' is not a valid bucket name: it has {len(name)} characters ({BUCKET_RULES})"
    try:
        ipaddress.ip_address(name)
        return f"'{name}' is not a valid bucket name: it looks like an IP address"
    except ValueError:
        pass
    if name.startswith("goog") or "google" in name or "g00gle" in name:
        return f"'{name}' is not a valid bucket name: names may not start with 'goog' or contain 'google'"
    return None


def split_gs(path: str) -> tuple[str, str]:
    bucket, _, prefix = os.fspath(path).removeprefix("gs://").partition("/")
    return bucket, prefix.strip("/")


def check_storage(workdir: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> None:
    """Raise a :class:`StorageError` if ``workdir`` cannot be written or ``data_dir`` cannot be read."""
    check_workdir(workdir)
    if data_dir is not None:
        check_data_dir(data_dir)


def check_workdir(path: str | os.PathLike, *, name: str = "--workdir", retry_seconds: float = 30.0) -> None:
    if storage.is_remote(path):
        _check_bucket(os.fspath(path), name, write=True, retry_seconds=retry_seconds)
    else:
        _check_local_writable(storage.as_path(path), name)


def check_data_dir(path: str | os.PathLike, *, name: str = "data.data_dir", retry_seconds: float = 30.0) -> None:
    if storage.is_remote(path):
        _check_bucket(os.fspath(path), name, write=False, retry_seconds=retry_seconds)
        return
    local = storage.as_path(path)
    if local.exists():
        if not local.is_dir():
            raise StorageError(f"{name} {local} is a file, not a directory: point it at the directory of the data sets.")
        if not os.access(local, os.R_OK | os.X_OK):
            raise StorageError(f"{name} {local} cannot be read (permission denied): give this user read access.")
        return
    parent = _existing_ancestor(local)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise StorageError(
            f"{name} {local} does not exist and cannot be created ({parent} is not a writable directory): "
            "create it, or point it elsewhere."
        )


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_local_writable(path: Path, name: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise StorageError(f"{name} {path} is a file, not a directory: choose another path.") from None
    except OSError as err:
        raise StorageError(f"{name} {path} cannot be created: {_os_reason(err)}.") from None
    probe = path / f"{PROBE_PREFIX}{uuid.uuid4().hex[:8]}"
    try:
        with probe.open("wb") as file:
            file.write(b"workshop_dist write test\n")
            file.flush()
            os.fsync(file.fileno())
    except OSError as err:
        raise StorageError(f"{name} {path} cannot be written: {_os_reason(err)}.") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def _os_reason(err: OSError) -> str:
    hints = {
        errno.EACCES: "permission denied: give this user write access, or choose another path",
        errno.EPERM: "permission denied: give this user write access, or choose another path",
        errno.EROFS: "the file system is read-only: choose a writable path",
        errno.ENOSPC: "the disk is full: free space, or choose another disk",
        errno.ENOTDIR: "a part of the path is a file, not a directory: choose another path",
        errno.ENOENT: "a part of the path does not exist and cannot be made",
    }
    return hints.get(err.errno, f"{err.strerror or err}")


def _check_bucket(path: str, name: str, *, write: bool, retry_seconds: float) -> None:
    bucket_name, prefix = split_gs(path)
    problem = bucket_name_problem(bucket_name)
    if problem:
        raise StorageError(f"{name} {path}: {problem}.")
    from workshop_dist._deps import require

    gcs = require("google.cloud.storage", f"check {name} {path}", extra="gcs")
    from google.api_core import exceptions
    from google.auth import exceptions as auth_exceptions

    retry = gcs.retry.DEFAULT_RETRY.with_timeout(retry_seconds)
    try:
        bucket = gcs.Client().bucket(bucket_name)
        if write:
            blob = bucket.blob(f"{prefix}/{PROBE_PREFIX}{uuid.uuid4().hex[:8]}".lstrip("/"))
            blob.upload_from_string(b"", if_generation_match=0, retry=retry, timeout=10)
            blob.delete(retry=retry, timeout=10)
        else:
            next(iter(bucket.list_blobs(prefix=prefix, max_results=1, retry=retry, timeout=10)), None)
    except exceptions.NotFound:
        raise StorageError(
            f"{name} {path}: the bucket '{bucket_name}' does not exist (or this account cannot see it): create it "
            f"(gcloud storage buckets create gs://{bucket_name}) or fix the name."
        ) from None
    except exceptions.Forbidden as err:
        access = "write to" if write else "read"
        raise StorageError(
            f"{name} {path}: this account may not {access} the bucket '{bucket_name}' ({err.message}): grant it "
            f"{'roles/storage.objectUser' if write else 'roles/storage.objectViewer'} on the bucket, or use other "
            "credentials (gcloud auth application-default login, GOOGLE_APPLICATION_CREDENTIALS)."
        ) from None
    except auth_exceptions.DefaultCredentialsError as err:
        raise StorageError(
            f"{name} {path}: no Google credentials found ({err}): run `gcloud auth application-default login`, "
            "or set GOOGLE_APPLICATION_CREDENTIALS."
        ) from None
    except (exceptions.GoogleAPIError, ConnectionError, TimeoutError, OSError) as err:
        raise StorageError(
            f"{name} {path}: Cloud Storage could not be reached within {retry_seconds:.0f} s ({_network_reason(err)}): "
            "check the network (and STORAGE_EMULATOR_HOST if you use an emulator), then start again."
        ) from None


def _network_reason(err: BaseException) -> str:
    """The innermost useful words of a (retried) request error, e.g. ``[Errno 111] Connection refused``."""
    cause = getattr(err, "cause", None) or err  # api_core's RetryError keeps the last error as .cause
    text = str(cause)
    found = re.search(r"\[Errno -?\d+\] [^'\")\]]+", text)
    return found.group(0).strip() if found else f"{type(cause).__name__}: {text.splitlines()[0][:200] if text else ''}"
