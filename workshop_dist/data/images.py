"""Image folders (``data.source: images:PATH``): listing, label maps, header checks and decoding.

Layout: ``PATH/<split>/`` (or ``PATH`` with ``{split}`` in it) holds the split's PNG, JPEG and
WebP files, either directly (unlabelled) or in one subfolder per class (searched
recursively). Labels are the positions of the class folders of the *training* split in
sorted order, so every split uses the same mapping; :func:`write_label_map` records it.

The source's records are file paths; :class:`DecodeImage`, a Grain ``Map`` transform, opens
and decodes each with Pillow inside the pipeline's batch reader, so with
``data.worker_count > 0`` decoding runs in the Grain worker processes. Each image becomes
uint8 ``(H, W, C)``: mode converted to grey (``L``) or ``RGB`` (alpha dropped), shorter side
resized to ``image_size`` (bilinear, antialiased; JPEGs decoded at a reduced scale first
when that is still at least the target size), then an ``image_size`` square cropped from the
center, or, for training, at an offset drawn per example (:meth:`DecodeImage.augment`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import struct
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import grain
import numpy as np
from PIL import Image

from workshop_dist.config import ConfigError
from workshop_dist.data.config import DataConfiguration
from workshop_dist.data.transforms import BadExampleError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
LABELS_FILE = "labels.json"
_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_PILLOW_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- listing


@dataclasses.dataclass(frozen=True)
class ImageFolder:
    """The image files of one split, sorted, with their labels (None: no class folders)."""

    root: Path
    paths: tuple[str, ...]
    labels: np.ndarray | None
    classes: tuple[str, ...] | None

    def __len__(self) -> int:
        return len(self.paths)


def split_dir(pattern: str, split: str) -> Path:
    """``PATH/<split>``, or ``PATH`` with ``{split}`` replaced by the split name."""
    if "{split}" in pattern:
        return Path(os.path.expanduser(pattern.replace("{split}", split))).absolute()
    return Path(os.path.expanduser(pattern), split).absolute()


def class_names(directory: Path) -> tuple[str, ...]:
    """Sorted names of the (non-hidden) subfolders of ``directory``: the classes."""
    return tuple(sorted(entry.name for entry in os.scandir(directory) if entry.is_dir() and not entry.name.startswith(".")))


def list_folder(pattern: str, split: str, *, label_split: str | None = None) -> ImageFolder:
    """The images of ``split``; labels from the class folders of ``label_split`` (default: this split).

    One ConfigError each for a missing folder, a folder without images, and class folders
    that the labelling split does not have.
    """
    root = split_dir(pattern, split)
    if not root.is_dir():
        raise ConfigError(f"Image folder {root} (split '{split}' of images:{pattern}) does not exist. {_layout_hint(pattern)}")
    classes = class_names(root)
    label_root = split_dir(pattern, label_split) if label_split and label_split != split else root
    if label_root != root and label_root.is_dir():
        reference = class_names(label_root)
        unknown = sorted(set(classes) - set(reference))
        if unknown or bool(classes) != bool(reference):
            raise ConfigError(
                f"Image folder {root} has class folders {unknown or list(classes)} that the training split's folder "
                f"{label_root} lacks (its classes: {list(reference)}); labels come from the training split, so "
                "every split needs the same class folders (or none)."
            )
        classes = reference
    top_level = _images_in(root, recursive=not classes)
    if classes and top_level:
        raise ConfigError(
            f"Image folder {root} holds both class subfolders {list(classes)[:5]} and images outside them "
            f"(e.g. {top_level[0]}): put every image in its class folder, or use no class folders."
        )
    if classes:
        per_class = [_images_in(root / name, recursive=True) for name in classes]
        paths = [path for files in per_class for path in files]
        labels = np.concatenate([np.full(len(files), label, np.int64) for label, files in enumerate(per_class)])
    else:
        paths, labels = top_level, None
    if not paths:
        raise ConfigError(
            f"Image folder {root} holds no image files ({', '.join(IMAGE_EXTENSIONS)}, searched recursively). "
            f"{_layout_hint(pattern)}"
        )
    return ImageFolder(root, tuple(paths), labels, classes or None)


def _images_in(directory: Path, *, recursive: bool) -> list[str]:
    """Image files under ``directory`` in a platform-independent sorted order (by path parts)."""
    found = []
    for current, dirs, files in os.walk(directory):
        dirs[:] = [name for name in dirs if not name.startswith(".")] if recursive else []
        found += [os.path.join(current, name) for name in files if name.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found, key=lambda path: Path(path).relative_to(directory).parts)


def _layout_hint(pattern: str) -> str:
    base = Path(os.path.expanduser(pattern.split("{split}")[0]))
    existing = class_names(base) if "{split}" not in pattern and base.is_dir() else ()
    seen = f" It has the folders {list(existing)[:8]}: set data.train_split / data.eval_split to their names." if existing else ""
    return (
        "images:PATH needs one folder per split under PATH (PATH/train/, PATH/validation/, each with images or "
        f"class subfolders), or {{split}} in PATH.{seen}"
    )


# ----------------------------------------------------------------------------- label map


def label_map(config: DataConfiguration) -> list[str] | None:
    """Class names in label order for an ``images:`` source with class folders, else None."""
    kind, _, pattern = config.source.partition(":")
    if kind != "images":
        return None
    root = split_dir(pattern, config.train_split)
    return list(class_names(root)) or None if root.is_dir() else None


def write_label_map(config: DataConfiguration, workdir: str | os.PathLike) -> Path | None:
    """Write ``WORKDIR/labels.json`` (``{"source", "classes"}``, label ``i`` = ``classes[i]``).

    Returns the path, or None (and writes nothing) when the source has no class folders.
    The CLI calls this on the primary process once the workdir exists.
    """
    from workshop_dist import storage

    classes = label_map(config)
    if classes is None:
        return None
    path = storage.as_path(workdir) / LABELS_FILE
    storage.write_text(path, json.dumps({"source": config.source, "classes": classes}, indent=2) + "\n")
    return path


# ----------------------------------------------------------------------------- header checks


@dataclasses.dataclass(frozen=True)
class ImageSettings:
    """What every decoded image of a split becomes: ``size`` (W, H) with ``channels``.

    ``fit``: ``"resize"`` (shorter side to the size, then crop), ``"crop"`` (crop only),
    ``"exact"`` (no image_size given: every image must already have ``size``) or ``"native"``
    (``workshop-data inspect``: each image as it is; ``channels`` 0 keeps its own).
    """

    size: tuple[int, int] | None
    channels: int
    fit: str = "resize"


def channels_of(mode: str) -> int:
    """1 for grey modes, 3 for the others (RGB, RGBA, P, CMYK, ...: alpha is dropped)."""
    return 1 if mode in _GREY_MODES else 3


def resolve_settings(
    paths: Sequence[str],
    *,
    image_size: int | None,
    channels: int | None,
    resize: bool = True,
    skip_bad: bool = False,
    where: str = "",
) -> ImageSettings:
    """Check the files' headers where the settings depend on them; the decoding settings.

    Headers (no pixels) are read only when ``channels`` or ``image_size`` is unset, or when
    cropping without resizing (every image must be large enough): set all three to skip the
    scan on large folders. Unreadable headers are errors naming the file, or skipped.
    """
    if channels is not None and image_size is not None and resize:
        return ImageSettings((image_size, image_size), channels, "resize")
    if where:
        log.info("Reading the headers of %d images in %s.", len(paths), where)
    sizes: dict[tuple[int, int], str] = {}
    modes: dict[int, dict[str, str]] = {}
    counts: Counter = Counter()
    for path in paths:
        try:
            with Image.open(path) as image:
                size, mode = image.size, image.mode
        except _PILLOW_ERRORS as err:
            if skip_bad:
                continue
            raise BadExampleError(f"Cannot read image {path}: {err}") from None
        sizes.setdefault(size, path)
        modes.setdefault(channels_of(mode), {}).setdefault(mode, path)
        counts[channels_of(mode)] += 1
        if image_size is not None and not resize and min(size) < image_size:
            raise ConfigError(
                f"Image {path} is {size[0]}x{size[1]}, smaller than data.image_size={image_size}, and data.resize=false "
                "only crops: set data.resize: true, or a data.image_size of at most the smallest image side."
            )
    if not counts:
        raise BadExampleError(f"None of the {len(paths)} images in {where or 'the folder'} can be read.")
    if channels is None:
        if len(modes) > 1:
            found = "; ".join(
                f"{counts[c]} with {c} channel{'s' * (c > 1)} (" + ", ".join(f"{m}: e.g. {p}" for m, p in modes[c].items()) + ")"
                for c in sorted(modes)
            )
            raise ConfigError(
                f"Images in {where or 'the folder'} have mixed channel counts: {found}. Set data.channels: 1 (grey) or 3 "
                "(RGB) to convert them all (workshop-data convert --channels)."
            )
        channels = next(iter(modes))
    if image_size is None and len(sizes) > 1:
        examples = ", ".join(f"{w}x{h}: {p}" for (w, h), p in list(sizes.items())[:3])
        raise ConfigError(
            f"Images in {where or 'the folder'} have {len(sizes)} different sizes (e.g. {examples}); set data.image_size "
            "to resize and crop them all to one square size (workshop-data convert --image-size)."
        )
    if image_size is None:
        return ImageSettings(next(iter(sizes)), channels, "exact")
    return ImageSettings((image_size, image_size), channels, "resize" if resize else "crop")


# ----------------------------------------------------------------------------- decoding


def crop_box(
    width: int, height: int, size: tuple[int, int], *, resize: bool, offset: tuple[float, float] | None = None
) -> tuple[float, float, float, float]:
    """Source-pixel box of the crop: shorter side resized to the target, then a target-sized window.

    ``offset`` (two numbers in [0, 1)) picks the window among all integer positions; None is
    the center. Resizing only this box (Pillow's ``resize(box=...)``) gives the same pixels
    as resizing the whole image and cropping, for less work.
    """
    out_w, out_h = size
    if resize:
        scale = max(out_w / width, out_h / height)
        full_w, full_h = max(out_w, round(width * scale)), max(out_h, round(height * scale))
    else:
        full_w, full_h = width, height
    if offset is None:
        left, top = (full_w - out_w) // 2, (full_h - out_h) // 2
    else:
        left, top = int(offset[0] * (full_w - out_w + 1)), int(offset[1] * (full_h - out_h + 1))
    sx, sy = full_w / width, full_h / height
    return left / sx, top / sy, (left + out_w) / sx, (top + out_h) / sy


def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Grey (``L``) or ``RGB``; palette images with transparency go through RGBA, 16-bit grey is scaled."""
    target = "L" if channels == 1 else "RGB"
    if image.mode == target:
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode.startswith("I;16") or image.mode == "I":
        image = Image.fromarray((np.asarray(image, np.uint32) // 257).clip(0, 255).astype(np.uint8), "L")
    return image.convert(target)


def decode_file(path: str, settings: ImageSettings, offset: tuple[float, float] | None = None) -> np.ndarray:
    """One image file -> uint8 ``(H, W, C)`` as ``settings`` say; a BadExampleError naming the file."""
    try:
        with Image.open(path) as image:
            return fit_image(image, settings, offset, name=path)
    except _PILLOW_ERRORS as err:
        raise BadExampleError(f"Cannot read image {path}: {err}") from None


def fit_image(
    image: Image.Image, settings: ImageSettings, offset: tuple[float, float] | None = None, *, name: str = "an image"
) -> np.ndarray:
    """A Pillow image -> uint8 ``(H, W, C)``: mode, then resize and crop (see :func:`crop_box`)."""
    size, (width, height) = settings.size, image.size
    if settings.fit == "native":
        return _as_array(to_mode(image, settings.channels or channels_of(image.mode)))
    if image.size == size:
        return _as_array(to_mode(image, settings.channels))
    if settings.fit == "resize":
        scale = max(size[0] / width, size[1] / height)
        if scale <= 0.5 and image.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 scale, still > the target
            image.draft("L" if settings.channels == 1 else "RGB", (int(width * scale) + 1, int(height * scale) + 1))
        image = to_mode(image, settings.channels)
        box = crop_box(*image.size, size, resize=True, offset=offset)
        return _as_array(image.resize(size, Image.Resampling.BILINEAR, box=box))
    if settings.fit == "exact":
        raise ConfigError(
            f"Image {name} is {width}x{height}, but the split's images are {size[0]}x{size[1]}: set data.image_size "
            "to resize and crop them all to one size."
        )
    if width < size[0] or height < size[1]:
        raise ConfigError(
            f"Image {name} is {width}x{height}, smaller than data.image_size={size[0]}, and data.resize=false only "
            "crops: set data.resize: true."
        )
    box = tuple(round(v) for v in crop_box(width, height, size, resize=False, offset=offset))
    return _as_array(to_mode(image.crop(box), settings.channels))


def _as_array(image: Image.Image) -> np.ndarray:
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


@dataclasses.dataclass(frozen=True)
class DecodeImage(grain.transforms.Map):
    """Record ``(index, path)`` -> ``{"image": uint8 (H, W, C)[, "label"]}``, center crop.

    A Grain ``Map`` on file paths: it runs wherever the batch is read, so in the Grain
    worker processes when ``data.worker_count > 0``. ``labels[index]`` is the label.
    """

    settings: ImageSettings
    labels: np.ndarray | None = None

    def map(self, element: tuple[int, str]) -> dict[str, np.ndarray]:
        return self._decode(element, None)

    def _decode(self, element: tuple[int, str], offset: tuple[float, float] | None) -> dict[str, np.ndarray]:
        index, path = element
        example = {"image": decode_file(path, self.settings, offset)}
        if self.labels is not None:
            example["label"] = self.labels[index]
        return example


@dataclasses.dataclass(frozen=True)
class DecodeImageRandomCrop(DecodeImage):
    """:class:`DecodeImage` for training: :meth:`augment` crops at an offset drawn per example.

    The pipeline draws ``offset`` (two uniform numbers in [0, 1)) per epoch and position
    from the data seed (:class:`~workshop_dist.data.batches.GlobalBatches`), so crops are
    reproducible, resumable and the same for any number of processes or workers.
    """

    def augment(self, element: tuple[int, str], offset: tuple[float, float]) -> dict[str, np.ndarray]:
        return self._decode(element, offset)


class ImageFiles:
    """Grain random-access source over an :class:`ImageFolder`: record ``i`` is ``(i, path_i)``."""

    def __init__(self, folder: ImageFolder):
        self._paths = folder.paths

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> tuple[int, str]:
        return int(index), self._paths[index]

    def __repr__(self) -> str:
        return f"ImageFiles({len(self._paths)} files)"
