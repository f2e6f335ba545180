"""A small JSON file that is only ever replaced conditionally: compare-and-swap on disk and in a bucket.

``read()`` gives the content and its version; ``write(data, if_version)`` replaces it only if
the version is still ``if_version`` (0: the file must not exist yet), else raises
:class:`VersionConflict`. Of two processes racing to write the same version exactly one wins.
:mod:`workshop_dist.workdir_lock` builds the one-job-per-workdir lock on it.

- Local disk (also NFS): the file is rewritten in place under ``flock`` (so its inode never
  changes and every reader and writer serialises on it), with a version counter inside.
- Cloud Storage: uploads with ``if_generation_match`` (google-cloud-storage, a dependency of
  gcsfs; versions are object generations). fake-gcs-server honours the precondition for
  uploads but not for deletes, so nothing here deletes: a released lock is a rewrite.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from workshop_dist import storage

log = logging.getLogger("workshop_dist")


class VersionConflict(Exception):
    """The file changed since it was read: the conditional write did not happen."""


class LocalVersionedFile:
    """The lock file on local disk (or NFS), rewritten in place under ``flock``."""

    def __init__(self, path: Path):
        self.path = path

    @contextlib.contextmanager
    def _locked(self, exclusive: bool):
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield fd
        finally:
            os.close(fd)  # releases the flock

    def _parse(self, fd: int) -> tuple[dict | None, int]:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = b""
        while chunk := os.read(fd, 65536):
            raw += chunk
        if not raw.strip():
            return None, 0
        try:
            data = json.loads(raw)
            return data, int(data.get("version", 0))
        except (ValueError, AttributeError):
            log.warning("The workdir lock %s is unreadable; treating it as free.", self.path)
            return None, -1

    def read(self) -> tuple[dict | None, int]:
        with self._locked(exclusive=False) as fd:
            return self._parse(fd)

    def write(self, data: dict, if_version: int) -> int:
        with self._locked(exclusive=True) as fd:
            _, version = self._parse(fd)
            if version != if_version:
                raise VersionConflict
            version = max(version, 0) + 1
            payload = json.dumps({**data, "version": version}, indent=1).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, payload, 0)
            os.fsync(fd)
            return version


class CloudVersionedFile:
    """The lock object in a bucket; versions are object generations (0: no object)."""

    def __init__(self, path: str):
        from workshop_dist._deps import require

        gcs = require("google.cloud.storage", "lock a gs:// workdir", extra="gcs")
        bucket, _, name = path.removeprefix("gs://").partition("/")
        self._blob_name = name
        self._bucket = gcs.Client().bucket(bucket)

    def read(self) -> tuple[dict | None, int]:
        from google.api_core import exceptions

        while True:
            blob = self._bucket.get_blob(self._blob_name)
            if blob is None:
                return None, 0
            try:
                raw = blob.download_as_bytes(if_generation_match=blob.generation)
            except (exceptions.PreconditionFailed, exceptions.NotFound):
                continue  # rewritten between the two requests: read again
            try:
                return json.loads(raw), int(blob.generation)
            except ValueError:
                log.warning("The workdir lock gs://%s/%s is unreadable; treating it as free.", self._bucket.name, self._blob_name)
                return None, int(blob.generation)

    def write(self, data: dict, if_version: int) -> int:
        from google.api_core import exceptions

        blob = self._bucket.blob(self._blob_name)
        try:
            blob.upload_from_string(json.dumps(data, indent=1), content_type="application/json", if_generation_match=if_version)
        except exceptions.PreconditionFailed:
            raise VersionConflict from None
        return int(blob.generation)


def versioned_file(path: storage.AnyPath) -> LocalVersionedFile | CloudVersionedFile:
    return CloudVersionedFile(os.fspath(path)) if storage.is_remote(path) else LocalVersionedFile(Path(path))
