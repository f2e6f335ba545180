"""The built-in data set: scikit-learn's ``load_digits`` (1,797 real 8x8 images, no network).

Fixed splits, in the order scikit-learn ships the images:
train = first 1000, validation = next 350, test = remaining 447.

On first use :func:`prepare_digits` writes them as the TFDS dataset ``workshop_digits``
(ArrayRecord files, see :mod:`workshop_dist.data.digits_tfds`) into the data dir; after
that they are read like any prepared TFDS dataset.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from workshop_dist.data.sklearn_digits import (
    MAX_LEVEL,
    SIZE,
    SPLITS,
    TFDS_NAME,
    TFDS_VERSION,
    load_digits_split,
)

__all__ = ["MAX_LEVEL", "SIZE", "SPLITS", "TFDS_NAME", "TFDS_VERSION", "is_prepared", "load_digits_split", "prepare_digits"]


def is_prepared(data_dir: str | Path) -> bool:
    """TFDS renames the finished version dir into place, so its info file means "complete"."""
    return (Path(data_dir) / TFDS_NAME / TFDS_VERSION / "dataset_info.json").is_file()


def prepare_digits(data_dir: str | Path) -> Path:
    """Build ``workshop_digits`` into ``data_dir`` unless it is there; return ``data_dir``.

    Safe when several processes start at once (multi-process runs start N at the same
    time): one builds under an exclusive file lock while the others wait, then find it
    prepared. Nothing is downloaded (the images ship with scikit-learn).
    """
    data_dir = Path(data_dir).expanduser()
    if is_prepared(data_dir):
        return data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(data_dir / f".{TFDS_NAME}.lock"):
        if not is_prepared(data_dir):
            _build(data_dir)
    return data_dir


def _build(data_dir: Path) -> None:
    from workshop_dist._deps import require_tfds

    tfds = require_tfds("prepare the built-in digits data set")
    from workshop_dist.data.digits_tfds import WorkshopDigits  # imports TFDS: after the check

    builder = WorkshopDigits(data_dir=os.fspath(data_dir), file_format="array_record")
    # try_download_gcs=False: never ask GCS for a prebuilt copy (no network at run time).
    with tempfile.TemporaryDirectory(prefix="workshop_digits_dl_") as download_dir:
        builder.download_and_prepare(
            download_dir=download_dir,
            download_config=tfds.download.DownloadConfig(try_download_gcs=False),
        )


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """``flock`` on ``path``: held by one process (or open file) at a time, freed if it dies."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
