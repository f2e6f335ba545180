"""Where a run's files live: local disk, or a Cloud Storage bucket (``gs://bucket/path``).

Every path the trainer writes goes through :func:`as_path`: local paths stay ``pathlib.Path``
(absolute, so behaviour on disk is unchanged); ``gs://`` paths become ``etils.epath.Path``,
the path library Orbax and TFDS already use, so checkpoints, configs, samples and logs
share one way of reaching the bucket.

Backends. epath reaches ``gs://`` through gcsfs (``pip install 'workshop-dist[gcs]'``), and
Orbax's arrays go through tensorstore's own ``gcs`` driver. With TensorFlow installed epath
would pick TensorFlow's GCS filesystem instead, which ignores emulator endpoints and needs
TensorFlow at run time; importing this module therefore sets ``EPATH_USE_TF=false`` unless
it is already set, so the same code path runs against a bucket and against an emulator.
Credentials are Google's application-default ones for both (``gcloud auth
application-default login``, ``GOOGLE_APPLICATION_CREDENTIALS`` or the VM's service
account). Emulators: ``STORAGE_EMULATOR_HOST`` (gcsfs) and ``TENSORSTORE_GCS_HTTP_URL``
(tensorstore), both ``http://host:port``.

Cloud Storage has no appending and no renaming (a rename is a copy and a delete), so files
that grow line by line (``train.log``, ``metrics.jsonl``, TensorBoard events) are written
to a local staging directory and uploaded whole by :class:`SyncedDir` every
``SYNC_SECONDS`` and when the run closes them.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from etils import epath

# Read by epath when it resolves its first backend (cached after): gcsfs, not TensorFlow.
os.environ.setdefault("EPATH_USE_TF", "false")
# gcsfs caches directory listings forever; a workdir is also written by tensorstore and by
# other hosts, so a cached listing would hide their new checkpoints. List afresh each time.
with contextlib.suppress(ImportError):
    import fsspec.config

    fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)

REMOTE_PREFIXES = ("gs://",)
SYNC_SECONDS = 30.0  # how often growing files are uploaded to a remote workdir
STAGING_ENV = "WORKSHOP_STAGING_DIR"  # where remote data sets are copied to be read
DEFAULT_STAGING_DIR = "~/.cache/workshop_dist/staged"
AnyPath = Path | epath.Path


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an object store location (``gs://...``) rather than local disk."""
    return os.fspath(path).startswith(REMOTE_PREFIXES)


def as_path(path: str | os.PathLike, *, absolute: bool = True) -> AnyPath:
    """``gs://...`` -> ``epath.Path``; anything else -> a ``pathlib.Path``.

    Local paths are made absolute (``~`` expanded) unless ``absolute=False``, which keeps
    them as given (for APIs that always kept a caller's relative path).
    """
    if is_remote(path):
        return epath.Path(os.fspath(path))
    return Path(path).expanduser().absolute() if absolute else Path(path)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a whole small file so a reader never sees half of it.

    Locally: a sibling temporary file renamed over the target. On Cloud Storage an object
    upload is already all-or-nothing, so it is written directly.
    """
    target = as_path(path)
    if is_remote(target):
        target.write_text(text)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp")
    staging.write_text(text)
    staging.replace(target)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a local or remote file, creating local parent directories."""
    target = as_path(path)
    if not is_remote(target):
        target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append ``text``. On Cloud Storage objects are immutable: read, add, write back whole."""
    target = as_path(path)
    if not is_remote(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("a") as file:
            file.write(text)
        return
    previous = target.read_text() if target.exists() else ""
    target.write_text(previous + text)


def save_image(image: object, path: str | os.PathLike) -> None:
    """Save a PIL image to a local or remote path (encoded in memory for a remote one)."""
    target = as_path(path)
    if not is_remote(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target)  # type: ignore[attr-defined]
        return
    buffer = io.BytesIO()
    image.save(buffer, format=target.suffix.lstrip(".").upper() or "PNG")  # type: ignore[attr-defined]
    target.write_bytes(buffer.getvalue())


def download_tree(remote: AnyPath, local: Path) -> None:
    """Copy every file under ``remote`` into ``local`` (which mirrors its layout).

    Walks with ``iterdir`` (epath's ``walk`` on gcsfs yields roots without ``gs://``).
    """
    local.mkdir(parents=True, exist_ok=True)
    for entry in remote.iterdir():
        if entry.is_dir():
            download_tree(entry, local / entry.name)
        else:
            (local / entry.name).write_bytes(entry.read_bytes())


def staging_root(remote: str | os.PathLike) -> Path:
    """The local directory that mirrors ``remote`` (``$WORKSHOP_STAGING_DIR/<bucket>/<path>``)."""
    base = Path(os.environ.get(STAGING_ENV) or DEFAULT_STAGING_DIR).expanduser().absolute()
    scheme, _, rest = os.fspath(remote).partition("://")
    return base / scheme / rest.strip("/")


def stage(remote: str | os.PathLike, relative: str) -> Path:
    """Copy ``remote/relative`` to local disk once; return the local root that mirrors ``remote``.

    For data read by libraries that only open local files (ArrayRecord's reader). The copy is
    made in a temporary sibling and renamed into place, so concurrent processes and killed
    downloads never leave a half copy; an existing copy is reused (delete it to refresh).
    Nothing is copied when ``remote/relative`` does not exist.
    """
    root = staging_root(remote)
    target = root / relative
    source = as_path(remote) / relative
    if target.exists() or not source.exists():
        return root
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        download_tree(source, partial)
        with contextlib.suppress(OSError):  # fails only when another process finished first
            partial.rename(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return root


class SyncedDir:
    """A local staging directory whose files are uploaded to ``remote`` now and then.

    For files that grow by appending, which Cloud Storage cannot do: writers write
    ``local(name)``; :meth:`sync` uploads the files that changed since the last upload (at
    most every ``interval`` seconds unless forced), :meth:`close` uploads and removes the
    staging directory. ``local(name, resume=True)`` first downloads an existing remote file,
    so a resumed run appends to what the previous process wrote. A process killed hard loses
    at most ``interval`` seconds of these files; checkpoints are not affected.
    """

    def __init__(self, remote: str | os.PathLike, *, interval: float = SYNC_SECONDS):
        self.remote = as_path(remote)
        self.interval = interval
        self.path = Path(tempfile.mkdtemp(prefix="workshop_dist_sync_"))
        self._uploaded: dict[str, tuple[int, int]] = {}
        self._last_sync = time.monotonic()

    def local(self, name: str, *, resume: bool = False) -> Path:
        """The local file to write for ``remote/name`` (downloaded first when ``resume``)."""
        local = self.path / name
        remote = self.remote / name
        if resume and not local.exists() and remote.exists():
            local.write_bytes(remote.read_bytes())
            stat = local.stat()
            self._uploaded[name] = (stat.st_size, stat.st_mtime_ns)
        return local

    def sync(self, *, force: bool = False) -> None:
        """Upload changed files (at most every ``interval`` seconds unless ``force``)."""
        if not force and time.monotonic() - self._last_sync < self.interval:
            return
        self._last_sync = time.monotonic()
        if not self.path.is_dir():
            return
        for local in sorted(self.path.iterdir()):
            if not local.is_file():
                continue
            stat = local.stat()
            signature = (stat.st_size, stat.st_mtime_ns)
            if self._uploaded.get(local.name) == signature:
                continue
            (self.remote / local.name).write_bytes(local.read_bytes())
            self._uploaded[local.name] = signature

    def close(self) -> None:
        """Upload what changed, then delete the staging directory."""
        try:
            self.sync(force=True)
        finally:
            shutil.rmtree(self.path, ignore_errors=True)


class SyncedFileHandler(logging.FileHandler):
    """``logging.FileHandler`` for a remote log file: a local copy, uploaded by a :class:`SyncedDir`.

    The previous process's log is downloaded first, so a resumed run's log continues it.
    """

    def __init__(self, path: epath.Path, *, interval: float = SYNC_SECONDS):
        self._synced = SyncedDir(path.parent, interval=interval)
        super().__init__(self._synced.local(path.name, resume=True))
        # logging closes handlers at exit only after gcsfs has closed its HTTP session (atexit
        # runs last-registered first), so upload from an exit hook registered now, after gcsfs's.
        atexit.register(self._upload_at_exit)

    def _upload_at_exit(self) -> None:
        with contextlib.suppress(Exception):
            self.flush()
            self._synced.sync(force=True)

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        try:
            self._synced.sync()
        except Exception:  # a failed upload must not stop training; the next one retries
            self.handleError(record)

    def close(self) -> None:
        super().close()
        atexit.unregister(self._upload_at_exit)
        try:
            self._synced.close()
        except Exception as err:  # at interpreter exit the storage client may be gone
            print(f"workshop_dist: could not upload {self._synced.remote}: {err}", flush=True)


def log_file_handler(path: str | os.PathLike) -> logging.Handler:
    """A file handler for ``path``: a plain ``FileHandler`` locally, a synced one on Cloud Storage."""
    target = as_path(path)
    if is_remote(target):
        return SyncedFileHandler(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return logging.FileHandler(target)
