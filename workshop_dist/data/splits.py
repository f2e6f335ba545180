"""What ``workshop-data`` reads: a data set named on the command line, as decoded splits.

``SRC`` is one of

* an image folder (``images:PATH`` or a directory): one folder per split, as for
  ``data.source: images:PATH`` (:mod:`workshop_dist.data.images`);
* ``ARRAYS.npz`` (features named ``image``/``label``, or Keras-style ``x_SPLIT``/``y_SPLIT``),
  or ``IMAGES.npy`` with ``--labels LABELS.npy``;
* ``tfds:NAME[:CONFIG]``, prepared in a data dir (``tfds build ... --file_format=array_record``);
* ArrayRecord files in the project's format (a directory written by ``workshop-data convert``,
  ``array_record:GLOB``, or a ``.array_record`` path).

Each split is a :class:`SplitSource`: ``len()`` and ``[i]`` -> dict of numpy arrays (the image
uint8 ``(H, W, C)`` for images, ``label`` where there is one). It is picklable and opens its
files lazily, so ``convert`` can hand it to worker processes, and it is what
``stats(split_source, out_npz, inception_weights)`` receives.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from workshop_dist.config import ConfigError
from workshop_dist.data import images
from workshop_dist.data.records import decode_example

RECORD_NAME = re.compile(r"^(?P<split>.+)-\d{5}-of-\d{5}\.array_record$")


class SplitSource(Protocol):
    """One split: ``len()``, and ``[i]`` -> feature name -> numpy array (raises BadExampleError)."""

    name: str

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, np.ndarray]: ...


@dataclasses.dataclass
class DataSet:
    """The splits of one ``SRC`` (in order), and the class names if labels have names."""

    source: str
    splits: dict[str, SplitSource]
    classes: list[str] | None = None


@dataclasses.dataclass(frozen=True)
class ImageOptions:
    """How images are decoded or resized: ``--image-size``, ``--channels``, ``--no-resize``, ``--skip-bad``."""

    image_size: int | None = None
    channels: int | None = None
    resize: bool = True
    skip_bad: bool = False
    native: bool = False  # inspect: without image_size, decode folder images as they are (sizes may differ)


# ----------------------------------------------------------------------------- split sources


@dataclasses.dataclass
class FolderSplit:
    """Images of one split folder, decoded (center crop) as ``settings`` say."""

    name: str
    folder: images.ImageFolder
    settings: images.ImageSettings

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return images.DecodeImage(self.settings, self.folder.labels).map((index, self.folder.paths[index]))


@dataclasses.dataclass
class ArraySplit:
    """Rows of numpy arrays in ``.npz``/``.npy`` files; ``features`` maps feature -> (file, key)."""

    name: str
    features: dict[str, tuple[str, str | None]]
    length: int
    settings: images.ImageSettings | None = None
    _arrays: dict[str, np.ndarray] | None = dataclasses.field(default=None, repr=False)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = {feature: _load_array(path, key) for feature, (path, key) in self.features.items()}
        example = {feature: np.asarray(array[index]) for feature, array in self._arrays.items()}
        return _fit(example, self.settings, self.name, index)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}  # workers load the arrays themselves


@dataclasses.dataclass
class TfdsSplit:
    """A split of a prepared TFDS dataset, numeric features only (strings are dropped)."""

    name: str
    dataset: str
    split: str
    data_dir: str
    settings: images.ImageSettings | None = None
    length: int = 0
    _source: Any = dataclasses.field(default=None, repr=False)

    def _open(self) -> Any:
        if self._source is None:
            from workshop_dist.data.sources import tfds_data_source

            self._source = tfds_data_source(self.dataset, self.split, Path(self.data_dir), download=False)
        return self._source

    def __len__(self) -> int:
        return self.length or len(self._open())

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        raw = self._open()[index]
        example = {key: np.asarray(value) for key, value in raw.items() if np.asarray(value).dtype.kind in "biuf"}
        return _fit(example, self.settings, self.name, index)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_source": None}


@dataclasses.dataclass
class RecordSplit:
    """ArrayRecord files of msgpack examples (:mod:`workshop_dist.data.records`)."""

    name: str
    paths: list[str]
    settings: images.ImageSettings | None = None
    _source: Any = dataclasses.field(default=None, repr=False)

    def _open(self) -> Any:
        if self._source is None:
            import grain

            self._source = grain.sources.ArrayRecordDataSource(self.paths)
        return self._source

    def __len__(self) -> int:
        return len(self._open())

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return _fit(decode_example(self._open()[index]), self.settings, self.name, index)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_source": None}


def _fit(example: dict[str, np.ndarray], settings: images.ImageSettings | None, name: str, index: int) -> dict:
    """Resize/crop/convert the ``image`` feature of an array example (uint8 images only)."""
    if settings is None or "image" not in example:
        return example
    image = example["image"]
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (1, 3, 4)):
        raise ConfigError(
            f"--image-size/--channels resize uint8 images of shape (H, W[, 1|3|4]); {name} example {index} has "
            f"{image.dtype} {image.shape}."
        )
    pil = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
    return {**example, "image": images.fit_image(pil, settings, name=f"{name} example {index}")}


def _load_array(path: str, key: str | None) -> np.ndarray:
    if key is None:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    with np.load(path, allow_pickle=False) as arrays:
        return arrays[key]


def _array_settings(options: ImageOptions) -> images.ImageSettings | None:
    if options.image_size is None and options.channels is None:
        return None
    if options.image_size is None:
        raise ConfigError("--channels on array data needs --image-size too (the images are re-encoded with Pillow).")
    return images.ImageSettings(
        (options.image_size, options.image_size), options.channels or 3, "resize" if options.resize else "crop"
    )


# ----------------------------------------------------------------------------- opening SRC


def open_dataset(
    src: str,
    *,
    splits: list[str] | None = None,
    data_dir: str | None = None,
    labels: str | None = None,
    options: ImageOptions = ImageOptions(),
) -> DataSet:
    """The splits of ``src`` (see the module docstring); one ConfigError for each bad input."""
    kind, _, rest = src.partition(":")
    if kind == "tfds" and rest:
        return _open_tfds(src, rest, splits, data_dir, options)
    if kind == "images" and rest:
        return _open_folder(src, rest, splits, options)
    if kind == "array_record" and rest:
        return _open_records(src, rest, splits, options)
    path = Path(os.path.expanduser(src))
    if not glob.has_magic(src) and not path.exists():
        raise ConfigError(f"{src} does not exist: give an image folder, a .npz/.npy file, tfds:NAME or ArrayRecord files.")
    if path.is_dir():
        if any(path.glob("*.array_record")):
            return _open_records(src, os.path.join(src, "{split}-*-of-*.array_record"), splits, options)
        return _open_folder(src, src, splits, options)
    if src.endswith(".npz"):
        return _open_npz(src, splits, options)
    if src.endswith(".npy"):
        return _open_npy(src, labels, splits, options)
    if src.endswith(".array_record") or glob.has_magic(src):
        return _open_records(src, src, splits, options)
    raise ConfigError(f"Cannot tell what {src} holds: expected a folder, .npz, .npy, .array_record, or tfds:NAME.")


def _open_folder(src: str, pattern: str, splits: list[str] | None, options: ImageOptions) -> DataSet:
    if splits is None:
        if "{split}" in pattern:
            raise ConfigError(f"{src} has {{split}} in it: name the splits with --splits train,validation.")
        root = Path(os.path.expanduser(pattern))
        if not root.is_dir():
            raise ConfigError(f"Image folder {root} does not exist.")
        splits = list(images.class_names(root))
        if not splits:
            raise ConfigError(
                f"Image folder {root} has no split folders: put the images in {root}/train/ (with class subfolders "
                "or not), or name the splits with --splits."
            )
    label_split = "train" if "train" in splits else splits[0]
    folders = {split: images.list_folder(pattern, split, label_split=label_split) for split in splits}
    paths = [path for folder in folders.values() for path in folder.paths]
    if options.native and options.image_size is None:
        settings = images.ImageSettings(None, options.channels or 0, "native")
    else:
        settings = images.resolve_settings(
            paths, image_size=options.image_size, channels=options.channels, resize=options.resize,
            skip_bad=options.skip_bad, where=src,
        )
    named = {split: FolderSplit(f"{src}[{split}]", folder, settings) for split, folder in folders.items()}
    classes = folders[label_split].classes
    return DataSet(src, named, list(classes) if classes else None)


def _open_npz(src: str, splits: list[str] | None, options: ImageOptions) -> DataSet:
    with np.load(src, allow_pickle=False) as arrays:
        shapes = {key: arrays[key].shape for key in arrays.files}
    keras = {match.group(1) for key in shapes if (match := re.fullmatch(r"x_(.+)", key))}
    if keras:  # x_train, y_train, x_test, ...
        layout = {split: {"image": f"x_{split}", **({"label": f"y_{split}"} if f"y_{split}" in shapes else {})} for split in sorted(keras)}
    else:
        aliases = {"images": "image", "x": "image", "labels": "label", "y": "label"}
        layout = {(splits or ["train"])[0]: {aliases.get(key, key): key for key in shapes}}
    if splits is not None:
        missing = [split for split in splits if split not in layout]
        if missing:
            raise ConfigError(f"{src} has no split(s) {missing}; it has {sorted(layout)} (arrays {sorted(shapes)}).")
        layout = {split: layout[split] for split in splits}
    named = {}
    for split, features in layout.items():
        lengths = {feature: shapes[key][0] if shapes[key] else 0 for feature, key in features.items()}
        if len(set(lengths.values())) != 1:
            raise ConfigError(f"The arrays of {src} for split {split} differ in length: {lengths}.")
        named[split] = ArraySplit(
            f"{src}[{split}]", {f: (src, k) for f, k in features.items()}, next(iter(lengths.values())), _array_settings(options)
        )
    return DataSet(src, named)


def _open_npy(src: str, labels: str | None, splits: list[str] | None, options: ImageOptions) -> DataSet:
    features = {"image": (src, None)}
    lengths = {"image": len(np.load(src, mmap_mode="r", allow_pickle=False))}
    if labels is not None:
        if not Path(labels).is_file():
            raise ConfigError(f"Labels file {labels} does not exist.")
        features["label"] = (labels, None)
        lengths["label"] = len(np.load(labels, mmap_mode="r", allow_pickle=False))
    if len(set(lengths.values())) != 1:
        raise ConfigError(f"{src} and {labels} differ in length: {lengths}.")
    split = (splits or ["train"])[0]
    return DataSet(src, {split: ArraySplit(f"{src}[{split}]", features, lengths["image"], _array_settings(options))})


def _open_tfds(src: str, spec: str, splits: list[str] | None, data_dir: str | None, options: ImageOptions) -> DataSet:
    from workshop_dist._deps import require_tfds
    from workshop_dist.data.config import DataConfiguration
    from workshop_dist.data.sources import diagnose_tfds, resolve_data_dir, tfds_name

    tfds = require_tfds("read TFDS datasets")
    name = tfds_name(spec)
    directory = resolve_data_dir(DataConfiguration(data_dir=data_dir), name)
    if not any(Path(directory, *name.split("/")).glob("*/dataset_info.json")):
        raise diagnose_tfds(name, "train", directory)  # how to prepare it
    info = tfds.builder(name, data_dir=os.fspath(directory)).info
    splits = splits or list(info.splits)
    for split in splits:
        problem = diagnose_tfds(name, split, directory)
        if problem is not None:
            raise problem
    label = info.features["label"] if "label" in info.features else None  # noqa: SIM401 (no .get)
    classes = list(getattr(label, "names", None) or []) or None
    if classes == [str(i) for i in range(len(classes or []))]:
        classes = None  # ClassLabel(num_classes=N): no names worth writing
    named = {
        split: TfdsSplit(f"{src}[{split}]", name, split, os.fspath(directory), _array_settings(options), info.splits[split].num_examples)
        for split in splits
    }
    return DataSet(src, named, classes)


def _open_records(src: str, pattern: str, splits: list[str] | None, options: ImageOptions) -> DataSet:
    expanded = os.path.expanduser(pattern)
    if "{split}" in pattern and splits is None:
        found = sorted({match.group("split") for path in glob.glob(expanded.replace("{split}", "*"))
                        if (match := RECORD_NAME.match(os.path.basename(path)))})
        splits = found
    if "{split}" not in pattern:
        paths = sorted(glob.glob(expanded))
        groups = {(splits or ["all"])[0]: paths}
    else:
        groups = {split: sorted(glob.glob(expanded.replace("{split}", split))) for split in splits}
    empty = [split for split, paths in groups.items() if not paths]
    if not groups or empty:
        raise ConfigError(f"No ArrayRecord files match {pattern}" + (f" for split(s) {empty}" if empty else "") + ".")
    classes = _classes_beside(Path(expanded).parent)
    settings = _array_settings(options)
    return DataSet(src, {split: RecordSplit(f"{src}[{split}]", paths, settings) for split, paths in groups.items()}, classes)


def _classes_beside(directory: Path) -> list[str] | None:
    """The class names ``convert`` wrote beside its shards (``labels.json``), if any."""
    import json

    path = directory / images.LABELS_FILE
    return json.loads(path.read_text())["classes"] if path.is_file() else None
