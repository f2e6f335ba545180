"""The U-Net and the DiT trained with a continuous-time objective: flow matching or EDM.

``model.parameters.objective`` picks what a backbone learns: ``diffusion`` (the default:
DDPM/VDM, :mod:`workshop_dist.models.diffusion`), ``flow_matching`` or ``edm``
(:mod:`workshop_dist.models.objectives`). The other ``parameters`` are, flat, the backbone's
sizes and that objective's own options (:class:`~.objectives.FlowMatchingConfig`,
:class:`~.objectives.EDMConfig`), so an option of another objective is an error that names it.

The network is the backbone with one output per image channel. Pixels are mapped to
``[-1, 1]`` (integer levels ``0..L-1``, or ``[0, 1]`` floats for ``data.normalize: unit``) and
samples back to the data's own form (levels are rounded); an autoencoder's latents
(``data.normalize: latent``, already scaled to about unit variance) are taken and returned as they
are, with no range to clip to. Every draw comes from the example's
own key, so results do not depend on the batch an example is in, and a sample batch is
sharded over the mesh like a training batch (:func:`shard_samples`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import pydantic
from flax import nnx

from workshop_dist.config import ConfigError, StrictConfig
from workshop_dist.models import layers
from workshop_dist.models.base import GenerativeModel
from workshop_dist.models.config import ModelConfiguration
from workshop_dist.models.keys import ExampleKeys
from workshop_dist.models.objectives import OBJECTIVES, Objective, create_objective
from workshop_dist.models.registry import validate_parameters

OBJECTIVE_CHOICES = ("diffusion", *OBJECTIVES)
# Built by the backbone's module: (hp, image_shape, out_features, num_classes, remat, **layer_kwargs) -> network
NetworkBuilder = Callable[..., nnx.Module]


def objective_name(config: ModelConfiguration, family: str) -> str:
    """``model.parameters.objective`` (default ``diffusion``), checked."""
    name = config.parameters.get("objective", "diffusion")
    if name not in OBJECTIVE_CHOICES:
        raise ConfigError(f"model.parameters.objective: {family} takes one of {list(OBJECTIVE_CHOICES)}, got {name!r}")
    return name


@functools.cache
def parameters_class(network: type[StrictConfig], objective: str) -> type[StrictConfig]:
    """One flat schema: the backbone's sizes, the objective's options and ``objective`` itself."""
    options = OBJECTIVES[objective].Config
    return pydantic.create_model(
        f"{network.__name__.removesuffix('NetworkParameters')}{options.__name__.removesuffix('Config')}Parameters",
        __base__=(network, options),
        objective=(Literal[objective], pydantic.Field(objective, description="The training objective.")),
    )


@functools.cache
def model_class(family: str, network: type[StrictConfig], build: NetworkBuilder, objective: str) -> type:
    """The model class of ``family`` (``dit``, ``ddpm_unet``) trained with ``objective``."""
    likelihood = hasattr(OBJECTIVES[objective], "nll")  # flow matching: the probability-flow ODE bound
    return type(
        f"{network.__name__.removesuffix('NetworkParameters')}{OBJECTIVES[objective].__name__}",
        (LikelihoodMixin, ObjectiveModel) if likelihood else (ObjectiveModel,),
        {"Parameters": parameters_class(network, objective), "family": family, "build_network": staticmethod(build),
         "objective_name": objective, "__module__": __name__},
    )


def shard_samples(x: jax.Array, sharding: Any) -> jax.Array:
    """``x`` ([N, ...]) laid out like a training batch when its rows divide over the mesh's batch axes."""
    if sharding is None:
        return x
    shards = sharding.mesh.size // max(1, _replicas(sharding))
    if x.shape[0] % max(1, shards):
        return x
    return jax.lax.with_sharding_constraint(x, sharding)


def _replicas(sharding: Any) -> int:
    """Devices holding the same rows of a batch sharded with ``sharding`` (its unused mesh axes)."""
    used = {axis for entry in sharding.spec if entry is not None for axis in (entry if isinstance(entry, tuple) else (entry,))}
    replicas = 1
    for axis, size in sharding.mesh.shape.items():
        if axis not in used:
            replicas *= size
    return replicas


class ObjectiveModel(GenerativeModel):
    """A backbone ``network(x, t, labels)`` and an :class:`~.objectives.Objective` over it."""

    per_example_keys = True
    shards_samples: ClassVar[bool] = True  # ``sample(..., sharding=)``: the engine passes the batch layout
    Parameters: ClassVar[type[StrictConfig]]
    family: ClassVar[str]
    objective_name: ClassVar[str]
    build_network: ClassVar[NetworkBuilder]

    def __init__(self, config: ModelConfiguration, *, rngs: nnx.Rngs):
        self.hp = validate_parameters(type(self), config)
        self.image_shape = tuple(config.input_dim)
        if len(self.image_shape) != 3:
            raise ConfigError(f"{self.family} needs input_dim (H, W, C), got {list(self.image_shape)}")
        self.channels = self.image_shape[-1]
        spec = config.data
        self.unit_data = spec.normalize == "unit"  # [0, 1] floats; otherwise integer levels 0..L-1
        self.latent_data = spec.normalize == "latent"  # scaled latents: the model's space as they are
        self.top = 1.0 if self.unit_data else float(spec.num_levels - 1)
        options = self.hp.model_dump(include=set(OBJECTIVES[self.objective_name].Config.model_fields))
        self.objective: Objective = create_objective(self.objective_name, options)
        self.eval_objective: Objective = create_objective(self.objective_name, {**options, "label_dropout": 0.0})
        self.num_classes = self.objective.conditioning.num_classes
        self.deterministic = False  # model.eval(): no label dropout in evaluation losses
        self.network = type(self).build_network(
            self.hp, self.image_shape, self.channels, self.num_classes, config.remat, rngs=rngs, **layers.dtypes(config)
        )

    # --- data space <-> model space ----------------------------------------------------------
    def to_model(self, images: jax.Array) -> jax.Array:
        if self.latent_data:
            return images.astype(jnp.float32)
        return images.astype(jnp.float32) * (2.0 / self.top) - 1.0

    def to_data(self, x: jax.Array) -> jax.Array:
        if self.latent_data:
            return x.astype(jnp.float32)
        data = jnp.clip((x + 1.0) * (self.top / 2.0), 0.0, self.top)
        return data if self.unit_data else jnp.round(data)

    def _network(self, x: jax.Array, t: jax.Array, labels: jax.Array | None) -> jax.Array:
        return self.network(x, t, labels)

    # --- the contract --------------------------------------------------------------------------
    def example_losses(
        self, batch: dict[str, jax.Array], rng: jax.Array | ExampleKeys, *, step: jax.Array | None = None,
        group: str | None = None,
    ) -> dict[str, jax.Array]:
        """The objective's per-example loss (and ``mse``); label dropout only in training."""
        layers.check_images(batch["image"], self.image_shape)
        x = self.to_model(batch["image"])
        keys = ExampleKeys.of(rng, x.shape[0]).keys
        objective = self.eval_objective if self.deterministic else self.objective
        return objective.example_losses(self._network, x, keys, batch.get("label"))

    def sample(
        self, rng: jax.Array, num_samples: int, *, labels: jax.Array | None = None, sampler: str | None = None,
        steps: int | None = None, sampling_steps: int | None = None, guidance_scale: float | None = None,
        sharding: Any = None,
    ) -> jax.Array:
        """Samples in data space from sample ``i``'s own key ``fold_in(rng, i)``: the same images
        whatever the mesh or the number drawn. ``sampler``/``steps`` override the config's."""
        keys = shard_samples(jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(num_samples)), sharding)
        if labels is not None:
            labels = shard_samples(jnp.asarray(labels, jnp.int32), sharding)
        out = self.objective.sample(
            self._network, keys, self.image_shape, labels, sampler=sampler,
            steps=steps if steps is not None else sampling_steps, guidance_scale=guidance_scale,
        )
        return self.to_data(shard_samples(out.x, sharding))

    def network_evaluations(self, sampler: str | None = None, steps: int | None = None) -> int | None:
        """Network evaluations per sample of a fixed-step sampler (None: adaptive)."""
        return self.objective.network_evaluations(sampler, steps)


class LikelihoodMixin:
    """``nll`` for the objectives that have a likelihood (flow matching)."""

    def nll(self, batch: dict[str, jax.Array], rng: jax.Array, **options: Any) -> jax.Array:
        """Flow matching: an upper bound on ``-log P(levels)`` in nats per image through the
        probability-flow ODE (exact divergence on small images, Hutchinson's otherwise); with
        labels, of the uniform mixture over classes, like the diffusion bound."""
        if self.unit_data or self.latent_data:
            raise ConfigError(f"{self.family}: the likelihood bound is over integer levels (data.normalize: levels)")
        x, labels = self.to_model(batch["image"]), batch.get("label")
        keys = jax.random.split(rng, x.shape[0])
        bound = self.objective.nll(self._network, x, 2.0 / self.top, keys, labels, **options)
        # with labels: -log p(x) <= -log p(x | y) + log num_classes (the uniform mixture over classes)
        return bound + (math.log(self.num_classes) if self.num_classes and labels is not None else 0.0)
