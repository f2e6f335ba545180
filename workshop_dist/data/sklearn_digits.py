"""scikit-learn's ``load_digits`` (1,797 real 8x8 images, no network) in fixed splits, in the order it ships them:
train = first 1000, validation = next 350, test = remaining 447 (:mod:`workshop_dist.data.digits` prepares them as TFDS).
"""

from __future__ import annotations

import numpy as np

SPLITS: dict[str, slice] = {
    "train": slice(0, 1000),
    "validation": slice(1000, 1350),
    "test": slice(1350, 1797),
}
MAX_LEVEL = 16  # digits pixels are integers 0..16
SIZE = 8  # images are SIZE x SIZE (data.image_size resizes them)
TFDS_NAME = "workshop_digits"
TFDS_VERSION = "1.0.0"


def load_digits_split(split: str) -> dict[str, np.ndarray]:
    """Return ``{"image": uint8 [N, 8, 8, 1] in 0..16, "label": int64 [N]}`` for a split."""
    from sklearn.datasets import load_digits

    if split not in SPLITS:
        raise ValueError(f"unknown digits split '{split}': choose one of {sorted(SPLITS)}")
    bunch = load_digits()
    part = SPLITS[split]
    images = bunch.images[part].astype(np.uint8)[..., None]
    return {"image": images, "label": bunch.target[part].astype(np.int64)}
