"""A generated image folder for the image-source and workshop-data tests.

``make_image_folder(root)`` writes ``root/train/{cat,dog,eel}/`` (80 images each plus one
corrupt file) and ``root/validation/{cat,dog,eel}/`` (20 each): PNG, JPEG and WebP files of
8-40 px sides in modes L, RGB, RGBA and P. Each image is a smooth random gradient plus noise,
so crops and resizes change the pixels in ways a test can see.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image, features

CLASSES = ("cat", "dog", "eel")
MODES = ("L", "RGB", "RGBA", "P")
CORRUPT = "train/dog/zz_corrupt.png"  # sorts last in its class: index 2 * 80 - 1 + 1 = 160


@dataclasses.dataclass(frozen=True)
class ImageFolderInfo:
    root: Path
    counts: dict[str, int]  # files per split, the corrupt one included
    corrupt: Path


def make_image_folder(root: Path, *, per_class: dict[str, int] | None = None, seed: int = 0) -> ImageFolderInfo:
    per_class = per_class or {"train": 80, "validation": 20}
    rng = np.random.default_rng(seed)
    webp = features.check("webp")
    counts = {}
    for split, count in per_class.items():
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                mode = MODES[i % len(MODES)]
                image = Image.fromarray(random_picture(rng, int(rng.integers(8, 41)), int(rng.integers(8, 41)))).convert(mode)
                if mode in ("L", "RGB") and i % 3 == 0:
                    image.save(folder / f"{i:03d}.jpg", quality=90)
                elif webp and mode == "RGB" and i % 3 == 1:
                    image.save(folder / f"{i:03d}.webp", lossless=True)
                else:
                    image.save(folder / f"{i:03d}.png")
        counts[split] = count * len(CLASSES)
    corrupt = root / CORRUPT
    if "train" in per_class:
        corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(range(40)))
        counts["train"] += 1
        (root / "train" / "README.txt").write_text("not an image: ignored")
    return ImageFolderInfo(root, counts, corrupt)


def random_picture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """uint8 (H, W, 3): a random linear gradient per channel plus a little noise."""
    y, x = np.mgrid[0:height, 0:width] / 40.0
    slopes = rng.uniform(-1, 1, (3, 2))
    base = rng.uniform(0.2, 0.8, 3)
    picture = base[:, None, None] + slopes[:, 0, None, None] * y + slopes[:, 1, None, None] * x
    picture = np.moveaxis(picture, 0, -1) + rng.normal(0, 0.05, (height, width, 3))
    return (np.clip(picture, 0, 1) * 255).astype(np.uint8)


def write_image(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path
