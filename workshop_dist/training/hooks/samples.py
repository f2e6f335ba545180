"""A grid of ``cadence.num_samples`` samples at each evaluation: ``WORKDIR/samples/step_<N>.png`` and TensorBoard,
and the time sampling took in the log (the first time includes compilation).

Conditional models get one row per class. A latent model (``model.decoder``) has its samples decoded
to pixels by the frozen autoencoder first. Every process samples (it runs on the whole mesh); only
the primary writes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from workshop_dist import samples, storage
from workshop_dist.data import DataConfiguration
from workshop_dist.metrics import MetricsLogger, is_primary
from workshop_dist.training import evaluation
from workshop_dist.training.engine import Engine

log = logging.getLogger("workshop_dist")


class SamplesHook:
    """Writes a sample grid whenever ``follows`` (the evaluation hook) runs."""

    kind = "sample"

    def __init__(
        self,
        engine: Engine,
        *,
        count: int,
        directory: storage.AnyPath | None,
        metrics_logger: MetricsLogger,
        follows: Any = None,
        data_max: float | None = None,
        decoder: Any = None,
    ):
        """``data_max``: the pixel value shown as white (the top level of integer-level data);
        None: 1, or the samples' own maximum when it is clearly above 1. ``decoder``: a
        :class:`~workshop_dist.training.first_stage.FirstStage` that turns latent samples into pixels."""
        self.engine, self.count, self.directory, self.decoder = engine, count, directory, decoder
        data_max = decoder.max_value if decoder is not None else data_max
        self.metrics_logger, self.follows, self.data_max = metrics_logger, follows, data_max

    @property
    def enabled(self) -> bool:
        return self.count > 0 and self.directory is not None

    def next_step(self, step: int) -> int | None:
        return self.follows.next_step(step) if self.enabled and self.follows is not None else None

    def __call__(self, info: Any) -> None:
        self.write(info.step, info.state)

    def write(self, step: int, state: Any) -> storage.AnyPath | None:
        """The grid of ``state``'s samples at ``step`` (None when disabled)."""
        if not self.enabled:
            return None
        classes, count, columns, labels = self.engine.num_classes, self.count, None, None
        if classes:
            per_class = max(1, count // classes)
            labels = np.repeat(np.arange(classes), per_class)
            count, columns = len(labels), per_class
        start = time.perf_counter()
        images = evaluation.generate(self.engine, state, count, None, labels, {}, self.decoder)  # on the host: done
        seconds = time.perf_counter() - start
        log.info("Sampled %d images at step %d in %.2f s (the first time includes compilation).", count, step, seconds)
        top = self.data_max
        if top is None:
            top = float(np.max(images)) if images.size else 1.0
            top = top if top > 1.5 else 1.0  # in-memory level data without a config: its own maximum
        grid = samples.image_grid(images / top, columns=columns)
        path = self.directory / f"step_{step}.png"
        if is_primary():
            samples.save_png(grid, path)
            self.metrics_logger.log_images(step, {"samples": grid[None]})
        return path


def data_max(experiment_config: dict[str, Any] | None) -> float | None:
    """The white level of sample grids from the run's ``data`` section: the top level for
    ``normalize: levels`` data (from ``data``: 16 for the digits); None otherwise."""
    data = (experiment_config or {}).get("data") or {}
    if data.get("normalize") == "levels":
        return DataConfiguration.model_validate(data).max_value  # the data section's top level, said once
    return None
