"""Evaluation passes and samples: every example counted once, the EMA params when configured."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from workshop_dist import parallel, samples
from workshop_dist.config import WorkshopError
from workshop_dist.data import DataConfiguration
from workshop_dist.metrics import is_primary
from workshop_dist.training import inputs
from workshop_dist.training.step import SAMPLE_STREAM

if TYPE_CHECKING:
    from workshop_dist.training.engine import Engine
    from workshop_dist.training.reporting import StepMetrics
    from workshop_dist.training.state import TrainingState
    from workshop_dist.training.trainer import Trainer


def evaluate(engine: Engine, state: TrainingState, data: Any, batch_size: int, metrics: StepMetrics) -> dict[str, float]:
    """Averages of the model's per-example values over ``data``, plus ``num_examples``."""
    batch_size = inputs.round_up(batch_size, parallel.data_parallel_size(engine.mesh))
    params = engine.eval_params(state)
    totals = None
    for host_batch in inputs.eval_batches(data, batch_size // jax.process_count()):
        batch = parallel.host_batch_to_global(host_batch, engine.mesh)
        if totals is None:
            shapes = jax.eval_shape(engine.eval_sums, params, state.model_state, state.rng, batch, 0)
            totals = parallel.place(
                {key: np.zeros(shape.shape, shape.dtype) for key, shape in shapes.items()}, parallel.replicated(engine.mesh)
            )
        totals = engine.eval_step(params, state.model_state, state.rng, batch, totals)
        metrics.bound_queue(totals["num_examples"])
    if totals is None:
        raise WorkshopError("Evaluation data is empty.")
    sums = {key: float(value) for key, value in jax.device_get(totals).items()}
    count = sums.pop("num_examples")
    sums.pop("num_batches")
    return {**{key: value / count for key, value in sums.items()}, "num_examples": int(count)}


def generate(
    engine: Engine, state: TrainingState, num_samples: int, seed: int | None, labels: Any, options: dict[str, Any]
) -> np.ndarray:
    """``num_samples`` samples (numpy); ``labels`` (int ``[num_samples]``) condition a conditional model."""
    rng = jax.random.fold_in(state.rng, SAMPLE_STREAM) if seed is None else jax.random.PRNGKey(seed)
    if labels is not None:
        labels = np.asarray(labels, np.int32)
        if labels.shape != (num_samples,):
            raise WorkshopError(f"labels must have shape ({num_samples},), got {labels.shape}")
        labels = parallel.place(labels, parallel.replicated(engine.mesh))
    options = tuple(sorted(options.items()))
    out = engine.sample(engine.eval_params(state), state.model_state, rng, labels, num_samples, options)
    return np.asarray(jax.device_get(out))


def write_sample_grid(trainer: Trainer, count: int, path: Path) -> Path:
    """A grid of samples (one row per class for a conditional model) as a PNG and a TensorBoard image."""
    classes = trainer.engine.num_classes
    labels = None
    columns = None
    if classes:
        per_class = max(1, count // classes)
        labels = np.repeat(np.arange(classes), per_class)
        count, columns = len(labels), per_class
    images = trainer.generate_samples(count, labels=labels)
    grid = samples.image_grid(images / _data_max(trainer, images), columns=columns)
    if is_primary():
        samples.save_png(grid, path)
        trainer.metrics_logger.log_images(trainer.step, {"samples": grid[None]})
    return path


def _data_max(trainer: Trainer, images: np.ndarray) -> float:
    """The pixel value shown as white: the top level for integer-level data (``data.normalize: levels``)."""
    data = (trainer.experiment_config or {}).get("data") or {}
    if data.get("normalize") == "levels":
        return DataConfiguration.model_validate(data).max_value  # the data section's top level
    top = float(np.max(images)) if images.size else 1.0
    return top if top > 1.5 else 1.0  # in-memory level data without a config: its own maximum
