"""Latent data sets (written by ``workshop-data encode``) as the pipeline reads them.

``DEST/latents.json`` beside the shards says what the records hold::

    {"format": "workshop_dist/latents", "store": "moments" | "sample", "scale_factor": 0.27,
     "latent_shape": [8, 8, 4], "image_shape": [32, 32, 1], "autoencoder": "...", ...}

``store: moments``: each record has the posterior's ``mean`` and ``logvar`` (float32, unscaled);
``sample``: one draw ``latent``. Both have ``label`` when the source had labels.

Training on them (``data.source: array_record:DEST/{split}-*.array_record`` with
``data.normalize: latent``), batches hold ``image`` = ``scale_factor * z`` as float32, not pixel
levels: no [0, 1] range, no level count. With moments, each training example gets a fresh
posterior draw ``z = mean + exp(logvar / 2) * eps`` at every step it appears in, ``eps`` drawn at
its global position in the epoch from the data seed (as random flips are: reproducible, resumable,
the same for any number of hosts); evaluation batches use the mean, so validation losses compare.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grain
import numpy as np

from workshop_dist.config import ConfigError

LATENTS_FILE = "latents.json"
FORMAT = "workshop_dist/latents"
STORES = ("moments", "sample")
STD_KEY = "image_std"  # the per-example posterior std (scaled) beside the mean, until the draw replaces it


def latents_beside(pattern: str) -> dict[str, Any] | None:
    """The ``latents.json`` in the folder of an ``array_record:`` glob, if there is one."""
    folder = Path(os.path.expanduser(pattern.replace("{split}", "x"))).parent
    path = folder / LATENTS_FILE
    if not path.is_file():
        return None
    return read_latents_info(path)


def read_latents_info(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a latent data set (``DEST/latents.json`` or DEST); a ConfigError if it is not one."""
    path = Path(path)
    path = path / LATENTS_FILE if path.is_dir() else path
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read the latent data set's metadata {path}: {err}") from None
    if info.get("format") != FORMAT or info.get("store") not in STORES or not info.get("scale_factor"):
        raise ConfigError(f"{path} is not the metadata of `workshop-data encode` (format {FORMAT!r})")
    return info


@dataclasses.dataclass(frozen=True)
class LatentStandardize(grain.transforms.Map):
    """Batches of latent records -> ``image`` (``scale_factor * mean`` or the stored draw, float32),
    ``image_std`` (with moments: ``scale_factor * exp(logvar / 2)``) and ``label``.

    The draw itself happens where the batch's positions are known (``GlobalBatches``); evaluation
    batches drop ``image_std`` and keep the mean.
    """

    scale_factor: float
    store: str = "moments"

    def map(self, element: Mapping[str, Any]) -> dict[str, np.ndarray]:
        scale = np.float32(self.scale_factor)
        names = ("mean", "logvar") if self.store == "moments" else ("latent",)
        missing = [name for name in names if name not in element]
        if missing:
            raise KeyError(f"latent record has no {missing} (features: {sorted(element)}): is latents.json beside the right files?")
        if self.store == "moments":
            out = {"image": np.asarray(element["mean"], np.float32) * scale,
                   STD_KEY: np.exp(0.5 * np.asarray(element["logvar"], np.float32)) * scale}
        else:
            out = {"image": np.asarray(element["latent"], np.float32) * scale}
        if "label" in element:
            out["label"] = np.asarray(element["label"]).astype(np.int32)
        return out

    __call__ = map


def draw(batch: dict[str, np.ndarray], seed: int | None, epoch: int, step: int, rows: np.ndarray,
         global_batch_size: int) -> dict[str, np.ndarray]:
    """``batch`` with its posterior draw: ``image += image_std * eps`` (``seed`` None: the mean).

    ``eps`` is drawn for the whole global batch at ``(seed, epoch, step)`` and this process's
    ``rows`` taken, so an example's noise depends on its position, not on the number of hosts.
    """
    std = batch.pop(STD_KEY, None)
    if std is None or seed is None:
        return batch
    eps = np.random.default_rng([seed, epoch, step]).standard_normal((global_batch_size, *std.shape[1:]), np.float32)
    batch["image"] = batch["image"] + std * eps[rows]
    return batch


def check_normalize(normalize: str, latents: Mapping[str, Any] | None, name: str) -> None:
    """Latent sources need ``data.normalize: latent`` and only they take it: one message either way."""
    if latents is not None and normalize != "latent":
        raise ConfigError(
            f"{name} holds latents (workshop-data encode), not images: set data.normalize: latent (latents are "
            "fed as float, scaled by their stored factor, not as pixel levels)"
        )
    if latents is None and normalize == "latent":
        raise ConfigError(
            f"data.normalize: latent reads latents written by `workshop-data encode`, but {name} has no "
            f"{LATENTS_FILE} beside its files"
        )
