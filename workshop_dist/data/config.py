"""Configuration of the input pipeline (the ``data`` section)."""

from __future__ import annotations

from typing import Literal

import pydantic

from workshop_dist.config import StrictConfig

SOURCE_KINDS = ("tfds", "array_record", "images")


class DataConfiguration(StrictConfig):
    """Where examples come from and how they are turned into batches."""

    source: str = pydantic.Field(
        "digits",
        description="'digits' (built in), 'tfds:NAME[:CONFIG]' (prepared with tfds build "
        "--file_format=array_record), 'array_record:GLOB' ({split} in GLOB becomes the split name; "
        "record format: workshop_dist.data.records) or 'images:PATH' (PNG/JPEG/WebP files, one folder "
        "per split under PATH or {split} in PATH, optional class subfolders).",
    )
    data_dir: str | None = pydantic.Field(
        None,
        description="Directory of prepared datasets (TFDS data_dir). Default: $WORKSHOP_DATA_DIR, else "
        "~/.cache/workshop_dist/data.",
    )
    train_split: str = "train"
    eval_split: str = "validation"
    image_key: str = pydantic.Field("image", description="Feature holding the image in each example.")
    normalize: Literal["unit", "levels", "latent"] = pydantic.Field(
        "unit",
        description="'unit': float32 in [0, 1]; 'levels': keep the integer pixel levels; 'latent': the latents of "
        "`workshop-data encode` (float32, scaled by their stored factor; no pixel range: workshop_dist.data.latents).",
    )
    max_level: float | None = pydantic.Field(
        None,
        gt=0,
        description="Pixel level that maps to 1.0 with normalize='unit'. Default: 16 for digits, the "
        "integer image dtype's maximum (255 for uint8) otherwise, 1.0 for float images.",
    )
    binarize: bool = pydantic.Field(False, description="Threshold unit images at 0.5 (Bernoulli data).")
    random_flip: bool = pydantic.Field(False, description="Random horizontal flips of training images.")
    shuffle: bool = True
    cache: bool = pydantic.Field(
        False,
        description="Read and standardize the whole split once into memory (in every process): for data "
        "that fits in RAM, like digits; decoding then no longer limits batches/s.",
    )
    worker_count: int = pydantic.Field(
        0,
        ge=0,
        description="Grain worker processes (0: in the main process). Pay off only for heavy decoding.",
    )
    prefetch: int = pydantic.Field(
        2, ge=0, description="Batches prepared ahead of the training step (in a thread, or per worker)."
    )
    download: bool = pydantic.Field(False, description="Allow TFDS to download and prepare missing datasets.")
    # Image folders (source 'images:PATH'); see workshop_dist.data.images.
    image_size: int | None = pydantic.Field(
        None,
        ge=1,
        description="images: side of the square images fed to the model (shorter side resized to it, then "
        "cropped). Default: the images' own size, which must then be the same for all of them. digits: the 8x8 "
        "images resized to image_size x image_size (bilinear, levels rounded), e.g. 32 for an autoencoder.",
    )
    channels: Literal[1, 3] | None = pydantic.Field(
        None,
        description="images: 1 (grey) or 3 (RGB); images of other modes are converted (alpha is dropped). "
        "Default: the images' own channel count, which must then be the same for all of them.",
    )
    resize: bool = pydantic.Field(
        True,
        description="images: resize the shorter side to image_size before cropping; false: crop only (every "
        "image must be at least image_size on both sides).",
    )
    random_crop: bool = pydantic.Field(
        True,
        description="images: random crops of training images (drawn per example from the data seed, so "
        "reproducible and resumable); evaluation and data.cache always crop the center.",
    )
    skip_bad_examples: bool = pydantic.Field(
        False,
        description="images: an unreadable or corrupt file is replaced by the next readable example (so "
        "batches stay full and positions resumable) and counted in the log, instead of stopping the run.",
    )

    @property
    def num_levels(self) -> int:
        """Distinct pixel values of the source: 2 when binarized, else ``max_level + 1`` (digits: 17; an
        integer source without ``max_level`` is taken as 8-bit, 256: set max_level for other depths)."""
        if self.binarize:
            return 2
        if self.max_level is not None:
            return int(self.max_level) + 1
        return 17 if self.source == "digits" else 256

    @property
    def max_value(self) -> float:
        """A white pixel's value in batches: 1 for ``unit``, the top level for ``levels`` (1 for ``latent``,
        which has no pixels: a model decoding them takes its autoencoder's range, ``model.decoder``)."""
        return float(self.num_levels - 1) if self.normalize == "levels" else 1.0

    @pydantic.field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        kind = value.split(":", 1)[0]
        if value != "digits" and kind not in SOURCE_KINDS:
            raise ValueError(
                f"unknown data source '{value}': use 'digits', 'tfds:NAME[:CONFIG]', 'array_record:GLOB' "
                "or 'images:PATH'"
            )
        if kind in SOURCE_KINDS and not value.partition(":")[2]:
            raise ValueError(f"data source '{value}' needs a name after '{kind}:'")
        return value
