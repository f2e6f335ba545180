"""``workshop-data inspect``: what a split holds (counts, shapes, dtypes, labels) and a PNG grid."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from workshop_dist.data.splits import SplitSource
from workshop_dist.data.transforms import BadExampleError

MIN_CELL = 32  # smaller images are scaled up (nearest) in the grid so they can be seen


def summarize(source: SplitSource, *, limit: int | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Read the split (its first ``limit`` examples): feature dtypes/shapes, labels, image range, bad files."""
    from tqdm import tqdm

    count = len(source) if limit is None else min(limit, len(source))
    features: dict[str, Counter] = {}
    labels: Counter = Counter()
    bad: list[str] = []
    low, high, total, pixels = math.inf, -math.inf, 0.0, 0
    for index in tqdm(range(count), desc=f"inspect {source.name}", unit="ex", disable=None if progress is None else not progress):
        try:
            example = source[index]
        except BadExampleError as err:
            bad.append(str(err))
            continue
        for key, value in example.items():
            features.setdefault(key, Counter())[(value.dtype.str, value.shape)] += 1
        if "label" in example and example["label"].ndim == 0:
            labels[int(example["label"])] += 1
        if "image" in example and example["image"].size:
            image = example["image"]
            low, high = min(low, float(image.min())), max(high, float(image.max()))
            total, pixels = total + float(image.sum(dtype=np.float64)), pixels + image.size
    return {
        "name": source.name,
        "examples": len(source),
        "read": count,
        "features": {key: dict(shapes) for key, shapes in features.items()},
        "labels": dict(sorted(labels.items())),
        "image_range": (low, high, total / pixels) if pixels else None,
        "bad": bad,
    }


def format_summary(summary: dict[str, Any], classes: list[str] | None = None) -> str:
    """The summary as the text ``inspect`` prints."""
    read = "" if summary["read"] == summary["examples"] else f" (first {summary['read']} read)"
    lines = [f"{summary['name']}: {summary['examples']} examples{read}"]
    for key, shapes in summary["features"].items():
        common = sorted(shapes.items(), key=lambda item: -item[1])
        listed = ", ".join(f"{np.dtype(dtype).name} {tuple(shape)} x {n}" for (dtype, shape), n in common[:5])
        more = ""
        if len(common) > 5:
            sides = np.array([shape[:2] for (_, shape), _ in common if len(shape) >= 2] or [(0, 0)])
            more = f", ... ({len(common)} shapes; H {sides[:, 0].min()}-{sides[:, 0].max()}, W {sides[:, 1].min()}-{sides[:, 1].max()})"
        lines.append(f"  {key:<8} {listed}{more}")
    if summary["labels"]:
        names = classes or []
        histogram = "  ".join(
            f"{label}{f' ({names[label]})' if 0 <= label < len(names) else ''}: {n}" for label, n in summary["labels"].items()
        )
        lines.append(f"  labels   {len(summary['labels'])} classes  {histogram}")
    if summary["image_range"]:
        low, high, mean = summary["image_range"]
        lines.append(f"  values   min {low:g}  max {high:g}  mean {mean:.4g}")
    if summary["bad"]:
        lines.append(f"  bad      {len(summary['bad'])} unreadable: " + "; ".join(summary["bad"][:3]))
    return "\n".join(lines)


def write_grid(source: SplitSource, path: str | Path, *, count: int = 64) -> int:
    """A PNG of ``count`` examples spread evenly over the split (so every class shows); returns how many.

    Integer images whose largest value is below 255 (levels, like the digits' 0..16) are
    scaled to it, float images are taken as [0, 1]; tiny images are scaled up.
    """
    picked = []
    for index in np.unique(np.linspace(0, len(source) - 1, min(count, len(source))).round().astype(int)):
        try:
            picked.append(np.asarray(source[int(index)]["image"]))
        except BadExampleError:
            continue
    if not picked:
        raise BadExampleError(f"No example of {source.name} could be read for the grid.")
    tiles = [_displayable(image, max(float(np.max(image)) for image in picked)) for image in picked]
    cell_h, cell_w = max(t.shape[0] for t in tiles), max(t.shape[1] for t in tiles)
    zoom = max(1, math.ceil(MIN_CELL / max(cell_h, cell_w)))
    columns = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    pad = 2
    grid = np.full((rows * (cell_h * zoom + pad) + pad, columns * (cell_w * zoom + pad) + pad, 3), 40, np.uint8)
    for k, tile in enumerate(tiles):
        tile = tile.repeat(zoom, axis=0).repeat(zoom, axis=1)
        top = pad + (k // columns) * (cell_h * zoom + pad) + (cell_h * zoom - tile.shape[0]) // 2
        left = pad + (k % columns) * (cell_w * zoom + pad) + (cell_w * zoom - tile.shape[1]) // 2
        grid[top : top + tile.shape[0], left : left + tile.shape[1]] = tile
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return len(tiles)


def _displayable(image: np.ndarray, high: float) -> np.ndarray:
    """uint8 RGB (H, W, 3) for the grid."""
    if image.ndim == 2:
        image = image[..., None]
    if np.issubdtype(image.dtype, np.floating):
        image = np.clip(image, 0.0, 1.0) * 255.0
    elif 0 < high < 255:
        image = image.astype(np.float64) * (255.0 / high)
    image = np.clip(image, 0, 255).astype(np.uint8)
    channels = image.shape[-1]
    if channels == 1:
        return np.repeat(image, 3, axis=-1)
    return image[..., :3]
