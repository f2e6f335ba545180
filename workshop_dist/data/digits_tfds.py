"""The built-in digits data set as a real TFDS dataset (``workshop_digits``), built offline.

Importing this module registers the builder with TFDS, so import it only to prepare the
data (:func:`workshop_dist.data.digits.prepare_digits` does); reading goes through
``tfds.data_source("workshop_digits", data_dir=...)`` like any prepared TFDS dataset.

``image`` is stored as a raw ``Tensor`` (8x8x1 uint8, levels 0..16) rather than a PNG
``Image``: writing then needs no TensorFlow and reading no image decoder. Shuffling is
disabled so record ``i`` of a split is image ``SPLITS[split].start + i`` of ``load_digits``.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from workshop_dist.data.sklearn_digits import SPLITS, TFDS_VERSION, load_digits_split


class WorkshopDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 1,797 8x8 digits; splits train/validation/test = 1000/350/447 images."""

    # TFDS names it "workshop_digits" (digits.TFDS_NAME) after the class.
    VERSION = tfds.core.Version(TFDS_VERSION)
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        TFDS_VERSION: "Splits of sklearn.datasets.load_digits in their shipped order."
    }
    # TFDS finds a builder's files (checksums) via importlib.resources of the top package,
    # which fails for a namespace package installed in editable mode; point it here.
    code_path = Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Optical recognition of handwritten digits (UCI), as shipped with scikit-learn: "
                "8x8 images with integer levels 0..16. Fixed splits in the shipped order: "
                "train = first 1000, validation = next 350, test = remaining 447."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80",
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # the data ships with scikit-learn: nothing to download
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        examples = load_digits_split(split)
        for index, (image, label) in enumerate(zip(examples["image"], examples["label"], strict=True)):
            yield index, {"image": image, "label": int(label)}
