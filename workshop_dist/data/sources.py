"""Where examples come from: ``data.source`` -> a random-access source of one split.

* ``digits``: the built-in data set, prepared on first use as the TFDS dataset
  ``workshop_digits`` in the data dir (:mod:`workshop_dist.data.digits`), then read like any
  TFDS dataset; ``data.image_size`` resizes its 8x8 images (:class:`transforms.ResizeImage`).
* ``tfds:NAME[:CONFIG]``: a TFDS dataset prepared beforehand with
  ``tfds build NAME --file_format=array_record --data_dir=DIR``; read with
  ``tfds.data_source``. Nothing is downloaded unless ``data.download=true``.
* ``array_record:GLOB``: ArrayRecord files in the format of :mod:`workshop_dist.data.records`;
  ``{split}`` in GLOB is replaced by the split name.
* ``images:PATH``: PNG, JPEG and WebP files, one folder per split (:mod:`workshop_dist.data.images`),
  decoded by a Grain transform on their paths.

The data dir is ``data.data_dir``, else ``$WORKSHOP_DATA_DIR``, else ``~/.cache/workshop_dist/data``.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grain
import numpy as np

from workshop_dist import storage
from workshop_dist._deps import require_tfds
from workshop_dist.config import ConfigError
from workshop_dist.data import digits
from workshop_dist.data.config import DataConfiguration
from workshop_dist.data.latents import latents_beside
from workshop_dist.data.transforms import DecodeRecord, ResizeImage

DATA_DIR_ENV = "WORKSHOP_DATA_DIR"
DEFAULT_DATA_DIR = "~/.cache/workshop_dist/data"


class DatasetNotPreparedError(ConfigError):
    """A TFDS dataset is not in the data dir; the message says how to prepare it."""


@dataclasses.dataclass(frozen=True)
class Source:
    """One split of a data set: random access to raw examples, plus how to read them.

    ``data`` has ``__len__`` and ``__getitem__`` (Grain's ``RandomAccessDataSource``);
    ``decode`` turns its records into dicts of arrays (None: they already are);
    ``max_level`` is the pixel value that maps to 1.0 (None: from the image dtype);
    ``skip_bad``: replace examples whose decoding fails (``data.skip_bad_examples``).
    """

    data: Any
    name: str
    decode: grain.transforms.Map | None = None
    max_level: float | None = None
    skip_bad: bool = False
    latents: dict[str, Any] | None = None  # latents.json of a `workshop-data encode` data set

    def __len__(self) -> int:
        return len(self.data)


class ArraySource:
    """In-memory examples (dict of equally long arrays) as a Grain random-access source."""

    def __init__(self, examples: Mapping[str, np.ndarray]):
        self._examples = {key: np.asarray(value) for key, value in examples.items()}
        lengths = {key: len(value) for key, value in self._examples.items()}
        if not lengths or len(set(lengths.values())) > 1:
            raise ValueError(
                f"examples must be a non-empty dict of equally long arrays, got lengths {lengths}"
            )
        self._length = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._length

    @property
    def arrays(self) -> Mapping[str, np.ndarray]:
        """The examples as arrays: batch readers gather from them directly."""
        return self._examples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {key: value[index] for key, value in self._examples.items()}

    def __repr__(self) -> str:
        shapes = {key: value.shape for key, value in self._examples.items()}
        return f"ArraySource({shapes})"


def resolve_data_dir(config: DataConfiguration, dataset: str | None = None) -> Path:
    """``data.data_dir``, else ``$WORKSHOP_DATA_DIR``, else ``~/.cache/workshop_dist/data``.

    A ``gs://`` data dir is read from a local copy of ``dataset`` (its directory in the data
    dir), made once under ``$WORKSHOP_STAGING_DIR``: ArrayRecord's reader opens local files only.
    """
    raw = config.data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    if storage.is_remote(raw):
        return storage.stage(raw, dataset.split("/")[0]) if dataset else storage.staging_root(raw)
    return Path(raw).expanduser().absolute()


def open_source(config: DataConfiguration, split: str, *, augment: bool = False) -> Source:
    """The split ``split`` of the data set named by ``config.source``.

    ``augment``: training examples (random crops of image folders, if ``data.random_crop``).
    """
    kind, _, rest = config.source.partition(":")
    if kind != "images":
        _check_image_fields(config)
    if config.source == "digits":
        if split not in digits.SPLITS:
            raise ConfigError(
                f"The digits data set has no split '{split}'; choose one of {list(digits.SPLITS)}."
            )
        data_dir = digits.prepare_digits(resolve_data_dir(config, digits.TFDS_NAME))
        data = tfds_data_source(digits.TFDS_NAME, split, data_dir, download=False)
        resize = ResizeImage(config.image_size) if config.image_size not in (None, digits.SIZE) else None
        return Source(data, name=f"digits[{split}]", decode=resize, max_level=config.max_level or digits.MAX_LEVEL)
    if kind == "tfds":
        name = tfds_name(rest)
        data = tfds_data_source(name, split, resolve_data_dir(config, name), download=config.download)
        return Source(data, name=f"tfds:{name}[{split}]", max_level=config.max_level)
    if kind == "array_record":
        paths = array_record_paths(rest, split)
        data = grain.sources.ArrayRecordDataSource(paths)
        return Source(
            data, name=f"array_record:{rest}[{split}]", decode=DecodeRecord(), max_level=config.max_level,
            latents=latents_beside(rest),
        )
    if kind == "images":
        return image_source(config, rest, split, augment=augment)
    raise ConfigError(f"unknown data source '{config.source}'")  # the config validator prevents this


def image_source(config: DataConfiguration, pattern: str, split: str, *, augment: bool) -> Source:
    """An image folder split: records are ``(index, path)``, decoded by :class:`images.DecodeImage`."""
    from workshop_dist.data import images

    folder = images.list_folder(pattern, split, label_split=config.train_split)
    scanned = folder.paths  # headers are read only when a setting is left to them (see resolve_settings)
    if split != config.train_split and images.split_dir(pattern, config.train_split).is_dir():
        scanned += images.list_folder(pattern, config.train_split).paths  # same channels/size as training
    settings = images.resolve_settings(
        scanned,
        image_size=config.image_size,
        channels=config.channels,
        resize=config.resize,
        skip_bad=config.skip_bad_examples,
        where=str(folder.root),
    )
    random_crop = augment and config.random_crop
    decode = (images.DecodeImageRandomCrop if random_crop else images.DecodeImage)(settings, folder.labels)
    return Source(
        images.ImageFiles(folder),
        name=f"images:{pattern}[{split}]",
        decode=decode,
        max_level=config.max_level or 255.0,
        skip_bad=config.skip_bad_examples,
    )


def _check_image_fields(config: DataConfiguration) -> None:
    """image_size / channels / resize / random_crop configure only image folders (image_size also the
    built-in digits, upsampled): say so rather than ignore them."""
    defaults = DataConfiguration.model_fields
    fields = ("channels", "resize", "random_crop") if config.source == "digits" else (
        "image_size", "channels", "resize", "random_crop")
    changed = [name for name in fields if getattr(config, name) != defaults[name].default]
    if changed:
        raise ConfigError(
            f"data.{', data.'.join(changed)} only apply to 'images:PATH' sources, not '{config.source}' (data.image_size "
            "also to 'digits'). Resize other data once with `workshop-data convert SRC DEST --image-size N`, then train "
            "on array_record:DEST/..."
        )


def tfds_name(spec: str) -> str:
    """``NAME[:CONFIG]`` (the part after ``tfds:``) -> TFDS's ``NAME/CONFIG``."""
    name, _, config = spec.partition(":")
    return f"{name}/{config}" if config else name


def array_record_paths(pattern: str, split: str) -> list[str]:
    """Sorted files matching ``pattern`` with ``{split}`` replaced; a ConfigError if none."""
    resolved = os.path.expanduser(pattern.replace("{split}", split))
    paths = sorted(glob.glob(resolved))
    if not paths:
        raise ConfigError(
            f"No ArrayRecord files match '{resolved}' (data.source='array_record:{pattern}', split '{split}'). "
            "Write them with workshop_dist.data.records.write_array_record."
        )
    return paths


def tfds_data_source(name: str, split: str, data_dir: Path, *, download: bool) -> Any:
    """``tfds.data_source(name, split=split)`` from ``data_dir``; clear errors when it is missing.

    TFDS's own error for an unprepared dataset with ``download=False`` talks about the
    TFRECORD format, so on failure we look at the data dir ourselves and explain.
    """
    tfds = require_tfds("read TFDS datasets")
    if download:
        return tfds.data_source(
            name,
            split=split,
            data_dir=os.fspath(data_dir),
            download=True,
            builder_kwargs={"file_format": "array_record"},
        )
    try:
        return tfds.data_source(name, split=split, data_dir=os.fspath(data_dir), download=False)
    except Exception as err:
        known = not isinstance(err, tfds.core.DatasetNotFoundError)
        problem = diagnose_tfds(name, split, data_dir, known_name=known)
        if problem is None:
            raise
        raise problem from err


def diagnose_tfds(name: str, split: str, data_dir: Path, *, known_name: bool = True) -> ConfigError | None:
    """Explain why ``name`` cannot be read from ``data_dir``, or None if it looks fine."""
    dataset_dir = Path(data_dir, *name.split("/"))
    infos = sorted(dataset_dir.glob("*/dataset_info.json"))
    if not infos:
        build = f"tfds build {name} --file_format=array_record --data_dir={shlex.quote(os.fspath(data_dir))}"
        unknown = "" if known_name else f" '{name}' is not in the TFDS catalog either: check the name."
        return DatasetNotPreparedError(
            f"TFDS dataset '{name}' is not prepared in the data dir {data_dir} (searched {dataset_dir})."
            f"{unknown} Training never downloads data by itself. Prepare it once with:\n  {build}\n"
            "or set data.data_dir to where it is prepared, or data.download=true to let this run "
            "download and prepare it."
        )
    info = json.loads(infos[-1].read_text())
    file_format = info.get("fileFormat", "tfrecord")
    if file_format not in ("array_record", "parquet"):
        return ConfigError(
            f"TFDS dataset '{name}' in {infos[-1].parent} was prepared as {file_format}, which has no random "
            f"access. Rebuild it with:\n  tfds build {name} --file_format=array_record "
            f"--data_dir={shlex.quote(os.fspath(data_dir))}"
        )
    splits = [entry.get("name") for entry in info.get("splits", [])]
    if split.split("[", 1)[0] not in splits:
        return ConfigError(f"TFDS dataset '{name}' has no split '{split}'; available splits: {splits}.")
    return None
