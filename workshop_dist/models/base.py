"""The contract between a model and the training engine.

A model is an ``nnx.Module`` built as ``cls(config: ModelConfiguration, *, rngs)``. The engine
needs only two methods, and reads a few optional ones:

``example_losses(batch, rng, *, step=None, group=None) -> dict[str, Array[B]]``
    Per-example values; ``"loss"`` is required (for likelihood models: the negative
    log-likelihood, or its bound, in nats per example). Training minimises the mean of
    ``"loss"`` over the batch; evaluation sums every key over the real examples only (padding
    is masked here, never by scoring examples one at a time). Every key is logged as a metric.
``sample(rng, num_samples, *, labels=None, **options) -> Array[N, ...]``
    Samples in data space (what the data pipeline feeds the model). ``labels`` (int ``[N]``)
    conditions a conditional model; ``options`` are model-specific (``guidance_scale``,
    ``sampling_steps``, ...).

Optional:

``loss(batch, rng, *, step=None, group=None) -> (scalar, metrics)``
    Override only when the training objective is not the mean of ``example_losses``.
``param_groups: dict[str, str]`` and ``update_order: tuple[str, ...]``
    Several optimizers (a GAN's ``{"generator": "generator", "discriminator": "discriminator"}``):
    each group is the parameters under that top-level attribute, trained by
    ``training.optimizers[group]``; one training step applies one update per entry of
    ``update_order`` (``("discriminator", "discriminator", "generator")`` = two discriminator
    updates per generator update), each with the loss ``loss(..., group=name)``.
``num_classes: int``
    Set by conditional models: sample grids then show one row per class.

``batch`` holds ``"image"`` and, when the data has them, ``"label"`` (int32 ``[B]``). ``step`` is
the optimizer step being taken (for KL annealing or other step-dependent objectives); it is
None in evaluation. NNX's ``model.train()`` / ``model.eval()`` modes are set by the engine
(training mode in the step, evaluation mode for evaluation and sampling).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


class GenerativeModel(nnx.Module):
    """Base class giving ``loss`` as the batch mean of ``example_losses``."""

    def example_losses(
        self, batch: Batch, rng: jax.Array, *, step: jax.Array | None = None, group: str | None = None
    ) -> Metrics:
        raise NotImplementedError

    def loss(
        self, batch: Batch, rng: jax.Array, *, step: jax.Array | None = None, group: str | None = None
    ) -> tuple[jax.Array, Metrics]:
        values = self.example_losses(batch, rng, step=step, group=group)
        names = list(values)
        # one reduction over the batch for all values (one all-reduce on a mesh, not one per metric)
        means = jnp.stack([jnp.asarray(values[name], jnp.float32) for name in names]).mean(axis=1)
        metrics = {name: means[index] for index, name in enumerate(names)}
        return metrics["loss"], metrics

    def sample(self, rng: jax.Array, num_samples: int, *, labels: jax.Array | None = None, **options: Any) -> jax.Array:
        raise NotImplementedError
