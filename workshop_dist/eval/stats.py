"""``workshop-data stats`` and ``convert-weights``: reference statistics of a split, and FID's weights.

The statistics are those FID compares samples with: the mean and covariance of the Inception
pool features of every image of the split, computed on all local devices (batches split over
them, sums reduced there) and written as pytorch-fid's ``.npz`` (``mu``, ``sigma``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from workshop_dist import parallel
from workshop_dist.config import ConfigError
from workshop_dist.eval import features
from workshop_dist.eval.fid import FeatureStatistics


def reference_statistics(
    split_source: Any, out_npz: Path, inception_weights: Path, *, batch_size: int = 128, progress: bool | None = None
) -> FeatureStatistics:
    """Inception statistics of every image of ``split_source`` (``len()``, ``[i]["image"]``) into ``out_npz``."""
    count = len(split_source)
    if count < 2:
        raise ConfigError(f"split {split_source.name} has {count} image(s): statistics need at least 2")
    network = features.inception(str(inception_weights))
    mesh = parallel.make_mesh(parallel.MeshConfiguration())
    size = -(-batch_size // mesh.devices.size) * mesh.devices.size
    first = np.asarray(split_source[0]["image"])
    top = float(np.iinfo(first.dtype).max) if np.issubdtype(first.dtype, np.integer) else 1.0
    on_mesh = features.OnMesh(network, mesh, data_max=top)

    def batches() -> Iterator[dict[str, Any]]:
        bar = tqdm(total=count, unit="img", desc=f"stats {split_source.name}", disable=None if progress is None else not progress)
        with bar:
            for start in range(0, count, size):
                images = [np.asarray(split_source[i]["image"]) for i in range(start, min(count, start + size))]
                for offset, image in enumerate(images):
                    if image.shape != first.shape:
                        raise ConfigError(
                            f"split {split_source.name}: image {start + offset} is {image.shape}, image 0 {first.shape}; "
                            "pass --image-size S so all are resized and cropped to S x S"
                        )
                batch = np.zeros((size, *first.shape), first.dtype)
                batch[: len(images)] = np.stack(images)
                mask = (np.arange(size) < len(images)).astype(np.float32)
                bar.update(len(images))
                yield parallel.host_batch_to_global({"image": batch, "mask": mask}, mesh)

    stats = on_mesh.statistics(batches())
    stats.save(out_npz)
    return stats


def convert_weights(network: str, source: Path, out: Path) -> Path:
    """Published weights to the safetensors file the project reads (``inception``: pytorch-fid's ``.pth``)."""
    if network != "inception":
        raise ConfigError(f"unknown network {network!r}: convert-weights knows inception")
    from workshop_dist.eval.inception import convert_inception

    return convert_inception(source, out)
