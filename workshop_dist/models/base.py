"""The contract between a model and the training engine.

A model is an ``nnx.Module`` built as ``cls(config: ModelConfiguration, *, rngs)``. The engine
needs two methods, and reads a few optional ones:

``example_losses(batch, rng, *, step=None, group=None) -> dict[str, Array[B]]``
    Per-example values; ``"loss"`` is required (for likelihood models: the negative
    log-likelihood, or its bound, in nats per example). Training minimises the mean of
    ``"loss"`` over the batch; evaluation sums every key over the real examples only (padding
    is masked here, never by scoring examples one at a time). Every key is logged as a metric.
    (Or, the older contract, only ``loss(batch, rng) -> (scalar, metrics)``: see below.)
``sample(rng, num_samples, *, labels=None, **options) -> Array[N, ...]``
    Samples in data space (what the data pipeline feeds the model), from one key ``rng``.
    ``labels`` (int ``[N]``) conditions a conditional model; ``options`` are model-specific
    (``guidance_scale``, ``sampling_steps``, ...).

Randomness (``rng``):

``per_example_keys = True`` (class attribute; every built-in family sets it)
    ``rng`` is an :class:`~workshop_dist.models.keys.ExampleKeys`: one key per example, derived
    from the run key, the step and the example's position in the global batch (in evaluation: its
    position in the pass). Draw all noise from it (``rng.normal(shape)`` is ``[B, *shape]``,
    ``rng.split(n)`` gives ``n`` streams, ``rng.map(fn)`` any per-example draw), and the results
    do not depend on ``grad_accum_steps``, the mesh or the padding of evaluation batches.
    ``ExampleKeys.of(rng, batch_size)`` turns a single key into per-example keys, so the same
    methods also take one key from a hand-written loop.
``per_example_keys = False`` (the default)
    ``rng`` is one key per (micro-)batch: ``fold_in(run key, step)``, folded with the
    micro-batch index under ``grad_accum_steps`` and with the batch index in evaluation.
``nnx.Rngs`` kept by the model (``nnx.Dropout``, stochastic layers)
    Their streams are reseeded per micro-batch from that batch's key (and checkpointed), so
    they resume bit-identically but, like the single key, are keyed per micro-batch.

Optional:

``loss(batch, rng, *, step=None, group=None) -> (scalar, metrics)``
    Override only when the training objective is not the mean of ``example_losses``. A model
    with only ``loss`` trains the same way; evaluation then calls it on whole padded batches
    (models keeping ``nnx.Rngs`` evaluate too) and, having no per-example values, counts each
    batch's values with its number of real examples, after filling the padding rows with
    copies of the batch's real examples: exact when every batch is full, otherwise the last
    batch's examples count with nearly equal weights (a warning says so).
``param_groups: dict[str, str]`` and ``update_order: tuple[str, ...]``
    Several optimizers (a GAN's ``{"generator": "generator", "discriminator": "discriminator"}``):
    each group is the parameters under that top-level attribute, trained by
    ``training.optimizers[group]``; one training step applies one update per entry of
    ``update_order`` (``("discriminator", "discriminator", "generator")`` = two discriminator
    updates per generator update), each with the loss ``loss(..., group=name)``.
``frozen_params: tuple[str, ...]``
    Params the engine holds fixed whatever the config says (``("autoencoder",)``: a latent model's first
    stage), as ``training.frozen`` patterns: no gradients, no optimizer state, not in the EMA.
``num_classes: int``
    Set by conditional models: sample grids then show one row per class.

``batch`` holds ``"image"`` and, when the data has them, ``"label"`` (int32 ``[B]``). ``step`` is
the optimizer step being taken (for KL annealing or other step-dependent objectives); it is
None in evaluation. NNX's ``model.train()`` / ``model.eval()`` modes are set by the engine
(training mode in the step, evaluation mode for evaluation and sampling). The compute dtype
(``config.dtype``) and storage dtype (``config.param_dtype``) are the model's to honour when
it is built: :mod:`workshop_dist.models.layers` does it for every layer.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from workshop_dist.models.keys import ExampleKeys

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def mean_losses(values: Metrics) -> tuple[jax.Array, Metrics]:
    """``(mean loss, mean of every value)`` over the batch: one reduction for all values
    (one all-reduce on a mesh, not one per metric)."""
    names = list(values)
    means = jnp.stack([jnp.asarray(values[name], jnp.float32) for name in names]).mean(axis=1)
    metrics = {name: means[index] for index, name in enumerate(names)}
    return metrics["loss"], metrics


class GenerativeModel(nnx.Module):
    """Base class giving ``loss`` as the batch mean of ``example_losses``."""

    per_example_keys: ClassVar[bool] = False  # True: ``rng`` is an ExampleKeys (one key per example)

    def example_losses(
        self, batch: Batch, rng: jax.Array | ExampleKeys, *, step: jax.Array | None = None, group: str | None = None
    ) -> Metrics:
        raise NotImplementedError

    def loss(
        self, batch: Batch, rng: jax.Array | ExampleKeys, *, step: jax.Array | None = None, group: str | None = None
    ) -> tuple[jax.Array, Metrics]:
        return mean_losses(self.example_losses(batch, rng, step=step, group=group))

    def sample(self, rng: jax.Array, num_samples: int, *, labels: jax.Array | None = None, **options: Any) -> jax.Array:
        raise NotImplementedError
