"""Transforms of the Grain pipeline: decoding records and standardizing examples or batches.

They are small picklable classes, not closures: with ``worker_count > 0`` Grain pickles the
whole pipeline into spawned worker processes. This module does not import TFDS or
TensorFlow, so workers start faster.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from workshop_dist.config import WorkshopError
from workshop_dist.data.records import decode_example

Example = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DecodeRecord(grain.transforms.Map):
    """Bytes of an ``array_record:`` source -> dict of arrays (see :mod:`workshop_dist.data.records`)."""

    def map(self, element: bytes) -> Example:
        return decode_example(element)


@dataclasses.dataclass(frozen=True)
class Standardize(grain.transforms.Map):
    """Select ``image`` (renamed from ``image_key``) and ``label``; scale, binarize, cast.

    ``normalize="unit"``: float32 in [0, 1] (levels / ``max_level``); ``"levels"``: int32
    levels. ``binarize`` thresholds the unit value at 0.5 (result 0/1 in the same dtype).
    Other features are dropped: batches must hold only numeric arrays of fixed shape.
    """

    image_key: str = "image"
    normalize: str = "unit"
    binarize: bool = False
    max_level: float = 255.0
    batched: bool = False  # elements are whole batches (a leading example axis)

    def map(self, element: Mapping[str, Any]) -> Example:
        if self.image_key not in element:
            raise KeyError(
                f"example has no feature '{self.image_key}' (features: {sorted(element)}); "
                "set data.image_key to the image feature"
            )
        image = np.asarray(element[self.image_key])
        if image.ndim == 2 + self.batched:  # (H, W) grayscale -> (H, W, 1)
            image = image[..., None]
        if self.binarize:
            image = (image.astype(np.float32) >= 0.5 * self.max_level).astype(np.float32)
            if self.normalize == "levels":
                image = image.astype(np.int32)
        elif self.normalize == "unit":
            image = image.astype(np.float32) / np.float32(self.max_level)
        else:
            image = image.astype(np.int32)
        out = {"image": image}
        if "label" in element:
            out["label"] = np.asarray(element["label"]).astype(np.int32)
        return out

    __call__ = map


@dataclasses.dataclass(frozen=True)
class ResizeImage(grain.transforms.Map):
    """``image`` (integer ``(H, W, C)``) resized to ``size`` x ``size``, bilinear, per channel (Pillow).

    For ``data.image_size`` on the built-in digits: convolutional first stages (the autoencoder's factor
    4 or 8) need larger images than 8x8. Pixels stay integer levels (rounded), so ``data.normalize`` and
    the level count (17) mean what they did; other features pass through.
    """

    size: int
    image_key: str = "image"

    def map(self, element: Mapping[str, Any]) -> Example:
        from PIL import Image

        image = np.asarray(element[self.image_key])
        if image.ndim == 2:
            image = image[..., None]
        planes = [
            np.asarray(Image.fromarray(image[..., c].astype(np.uint8)).resize((self.size, self.size), Image.Resampling.BILINEAR))
            for c in range(image.shape[-1])
        ]
        return {**element, self.image_key: np.stack(planes, axis=-1).astype(image.dtype)}

    __call__ = map


class BadExampleError(WorkshopError):
    """An example that cannot be read (an unreadable or corrupt file); the message names it.

    With ``data.skip_bad_examples`` the batch reader replaces it instead
    (:class:`workshop_dist.data.batches.ExampleReader`).
    """
