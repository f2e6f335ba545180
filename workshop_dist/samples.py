"""Sample images: arrange a batch into one grid and write it as PNG (Pillow does the encoding)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from workshop_dist import storage


def image_grid(images: np.ndarray, columns: int | None = None, pad: int = 1) -> np.ndarray:
    """``[N, H, W, C]`` floats in [0, 1] -> one ``[rows*(H+pad)+pad, cols*(W+pad)+pad, C]`` image."""
    images = np.asarray(images, np.float32)
    if images.ndim == 3:
        images = images[..., None]
    count, height, width, channels = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = np.ones((rows * (height + pad) + pad, columns * (width + pad) + pad, channels), np.float32)
    for index, image in enumerate(images):
        top, left = pad + (index // columns) * (height + pad), pad + (index % columns) * (width + pad)
        grid[top : top + height, left : left + width] = image
    return np.clip(grid, 0.0, 1.0)


def save_png(grid: np.ndarray, path: str | Path, scale: int = 4) -> storage.AnyPath:
    """Write a [0, 1] image as PNG, enlarged ``scale`` times (nearest) so small images stay visible."""
    from PIL import Image

    path = storage.as_path(path, absolute=False)
    pixels = (np.clip(grid, 0.0, 1.0) * 255).round().astype(np.uint8)
    pixels = pixels.repeat(scale, axis=0).repeat(scale, axis=1)
    if pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    storage.save_image(Image.fromarray(pixels), path)  # local or gs://
    return path
