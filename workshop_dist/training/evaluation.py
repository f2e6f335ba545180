"""Evaluation passes and samples: every example counted once, the EMA params when configured."""

from __future__ import annotations

import collections
from typing import Any

import jax
import numpy as np

from workshop_dist import parallel
from workshop_dist.config import WorkshopError
from workshop_dist.training import engine as engines
from workshop_dist.training import inputs
from workshop_dist.training.state import TrainingState
from workshop_dist.training.step import SAMPLE_STREAM


def evaluate(engine: engines.Engine, state: TrainingState, data: Any, batch_size: int, max_in_flight: int = 2) -> dict[str, float]:
    """Averages of the model's per-example values over ``data``, plus ``num_examples``.

    The pass accumulates on the device (a ``clu.metrics`` collection of averages, see
    :meth:`Engine.empty_totals`) and is read once at its end; at most ``max_in_flight``
    batches are queued ahead of the device.
    """
    batch_size = inputs.round_up(batch_size, parallel.data_parallel_size(engine.mesh))
    params = engine.eval_params(state)
    totals = None
    queued: collections.deque = collections.deque()
    for host_batch in inputs.eval_batches(data, batch_size // jax.process_count()):
        batch = parallel.host_batch_to_global(host_batch, engine.mesh)
        if totals is None:
            totals = engine.empty_totals(params, state.model_state, state.rng, batch)
        totals = engine.eval_step(params, state.model_state, state.rng, batch, totals)
        queued.append(totals[1])
        if len(queued) > max_in_flight:
            queued.popleft().block_until_ready()
    if totals is None:
        raise WorkshopError("Evaluation data is empty.")
    return engines.averages(totals)


def generate(
    engine: engines.Engine, state: TrainingState, num_samples: int, seed: int | None, labels: Any, options: dict[str, Any],
    decoder: Any = None,
) -> np.ndarray:
    """``num_samples`` samples (numpy); ``labels`` (int ``[num_samples]``) condition a conditional model.
    ``decoder`` (a :class:`~workshop_dist.training.first_stage.FirstStage`) turns latent samples into pixels."""
    rng = jax.random.fold_in(state.rng, SAMPLE_STREAM) if seed is None else jax.random.PRNGKey(seed)
    if labels is not None:
        labels = np.asarray(labels, np.int32)
        if labels.shape != (num_samples,):
            raise WorkshopError(f"labels must have shape ({num_samples},), got {labels.shape}")
        labels = parallel.place(labels, parallel.replicated(engine.mesh))
    options = tuple(sorted(options.items()))
    out = engine.sample(engine.eval_params(state), state.model_state, rng, labels, num_samples, options)
    return np.asarray(jax.device_get(out if decoder is None else decoder.decode_on_mesh(out)))
