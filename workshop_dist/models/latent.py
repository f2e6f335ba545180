"""Latent diffusion with the encoder inside the step (``model_class: latent``): for users who do not pre-extract.

Why: pre-extracted latents (``workshop-data encode`` + ``data.normalize: latent``) are the fast way,
but need a pass over the data first and one fixed draw (or the moments) per example on disk. This
wrapper takes the pixel batch as it comes, encodes it with a frozen autoencoder inside the jitted
step (the posterior mean, or a draw from each example's own key, times the scale factor), and trains
any backbone and objective on the latents (``parameters.backbone``: a model section, e.g. ``dit``
with ``objective: flow_matching``). ``sample`` decodes the backbone's latents to pixels, so sample
grids and the FID hook see images, like every pixel model.

The autoencoder is the ``autoencoder`` param group, frozen (``frozen_params``,
:mod:`workshop_dist.training.frozen`): no gradients, no optimizer state, not in the EMA; it is
sharded and checkpointed with the run, so a resume reads it from the run's checkpoint and never
needs the source again for its values (its structure is still read from ``parameters.autoencoder``).
The source is converted weights (``.safetensors`` from ``workshop-data convert-weights sd-vae``) or an
autoencoder run's workdir/checkpoint (read by :mod:`workshop_dist.training.first_stage` through
:attr:`LatentModel.run_loader`, which the training package sets). Its weights enter the model's
(sharded) initialisation as constants: fine for first stages up to ~100M params.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np
import pydantic
from flax import nnx

from workshop_dist.config import ConfigError, StrictConfig
from workshop_dist.models.autoencoder_weights import FORMAT, abstract_autoencoder
from workshop_dist.models.base import GenerativeModel
from workshop_dist.models.config import DataSpec, ModelConfiguration
from workshop_dist.models.keys import ExampleKeys
from workshop_dist.models.registry import create_model, register_model, validate_parameters
from workshop_dist.weights import WeightsError, load_tensors, read_safetensors

LATENT_STREAM = 0x4C41_5400  # the per-example keys of the posterior draw (apart from the backbone's)
_STAGES: dict[tuple, tuple[nnx.GraphDef, Any]] = {}  # (path, mtime) -> graph and host copy of the autoencoder


class LatentParameters(StrictConfig):
    """The frozen first stage, how its latents are taken, and the backbone trained on them."""

    autoencoder: str = pydantic.Field(
        description="The frozen autoencoder: converted weights (.safetensors) or an autoencoder run's workdir/checkpoint."
    )
    encode: Literal["mean", "sample"] = pydantic.Field(
        "mean", description="Train on the posterior mean, or on a fresh draw per example and step (its own key)."
    )
    backbone: dict[str, Any] = pydantic.Field(
        description="The backbone's model section (model_class, parameters, ...) for latents; input_dim, dtypes and "
        "remat come from this model."
    )


def _load(path: str, channels: int) -> nnx.Module:
    """The autoencoder at ``path``, loaded eagerly even inside a trace (its weights become constants there)."""
    with jax.ensure_compile_time_eval():
        if os.path.isfile(path):
            try:
                tensors, metadata = read_safetensors(path)
                if metadata.get("format") != FORMAT:
                    raise WeightsError(f"{path} holds no autoencoder weights (format {metadata.get('format')!r})")
                parameters = json.loads(metadata["parameters"])
                factor = 2 ** (len(parameters["block_out_channels"]) - 1)
                model = abstract_autoencoder(parameters, (factor, factor, int(metadata["channels"])))
                load_tensors(model, tensors, source=path)
            except WeightsError as err:
                raise ConfigError(f"model.parameters.autoencoder: {err}") from None
        elif LatentModel.run_loader is not None:
            model = LatentModel.run_loader(path, channels)
        else:
            raise ConfigError(f"model.parameters.autoencoder: {path} is no weights file, and reading an autoencoder run "
                              "needs workshop_dist.training imported")
        graphdef, state = nnx.split(model)
        return graphdef, jax.tree.map(_host, state)


def _host(value: Any) -> np.ndarray:
    """A host copy; a replicated array over several processes from this process's own copy of it."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        return np.asarray(value.addressable_data(0))
    return np.asarray(value)


def first_stage(path: str, channels: int) -> nnx.Module:
    """A fresh module of the (cached) autoencoder at ``path``."""
    key = (os.path.abspath(path), os.path.getmtime(path) if os.path.exists(path) else None)
    if key not in _STAGES:
        _STAGES.clear()  # one first stage at a time: no growing host copies
        _STAGES[key] = _load(path, channels)
    graphdef, state = _STAGES[key]
    return nnx.merge(graphdef, jax.tree.map(jnp.asarray, state))


@register_model("latent")
class LatentModel(GenerativeModel):
    """A frozen autoencoder (``autoencoder``) and a backbone (``backbone``) trained on its scaled latents."""

    Parameters = LatentParameters
    per_example_keys = True
    shards_samples: ClassVar[bool] = True
    frozen_params: ClassVar[tuple[str, ...]] = ("autoencoder",)
    run_loader: ClassVar[Callable[[str, int], nnx.Module] | None] = None  # set by workshop_dist.training

    def __init__(self, config: ModelConfiguration, *, rngs: nnx.Rngs):
        p: LatentParameters = validate_parameters(type(self), config)
        self.image_shape = tuple(config.input_dim)
        if len(self.image_shape) != 3:
            raise ConfigError(f"latent needs model.input_dim (H, W, C) of the pixels, got {list(self.image_shape)}")
        height, width, channels = self.image_shape
        self.autoencoder = first_stage(p.autoencoder, channels)
        ae = self.autoencoder
        factor, latent_channels = int(ae.factor), int(ae.params_config.latent_channels)
        if ae.image_shape[-1] != channels or height % factor or width % factor:
            raise ConfigError(f"the autoencoder {p.autoencoder} takes {ae.image_shape[-1]}-channel images whose sides "
                              f"divide by {factor}; model.input_dim is {list(self.image_shape)}")
        self.latent_shape = (height // factor, width // factor, latent_channels)
        self.scale = float(ae.scaling_factor)
        self.sample_latents = p.encode == "sample"
        self.max_value = config.data.max_value or 1.0  # this model's pixels; the autoencoder's own are ae.max_value
        self.levels = config.data.normalize == "levels"
        self.deterministic = False  # model.eval(): the posterior mean in evaluation
        backbone = {k: v for k, v in p.backbone.items() if k not in ("input_dim", "data")}
        inherited = {"input_dim": self.latent_shape, "dtype": config.dtype, "param_dtype": config.param_dtype,
                     "remat": config.remat, "data": DataSpec(num_levels=config.data.num_levels, normalize="latent")}
        self.backbone = create_model(ModelConfiguration.model_validate({"name": "backbone", **backbone, **inherited}),
                                     rngs=rngs)
        self.num_classes = getattr(self.backbone, "num_classes", None)

    def encode(self, images: jax.Array, rng: ExampleKeys | None = None) -> jax.Array:
        """Pixels (this model's data space) -> scaled latents: the mean, or (with ``rng``) a posterior draw."""
        ae = self.autoencoder
        mean, logvar = ae.moments(ae.to_network(images.astype(jnp.float32) * (ae.max_value / self.max_value)))
        z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * rng.normal(self.latent_shape, mean.dtype)
        return (z * self.scale).astype(jnp.float32)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Scaled latents -> pixels in this model's data space, clipped (levels rounded) like samples."""
        ae = self.autoencoder
        images = ae.decode(latents.astype(jnp.float32) / self.scale) * (self.max_value / ae.max_value)
        images = jnp.clip(images, 0.0, self.max_value)
        return jnp.round(images) if self.levels else images

    def example_losses(
        self, batch: dict[str, jax.Array], rng: jax.Array | ExampleKeys, *, step: jax.Array | None = None,
        group: str | None = None,
    ) -> dict[str, jax.Array]:
        """The backbone's per-example losses on the batch's latents (encoded here, inside the step)."""
        images = batch["image"]
        if tuple(images.shape[1:]) != self.image_shape:
            raise ConfigError(f"batch images have shape {tuple(images.shape[1:])}, model.input_dim is {list(self.image_shape)}")
        keys = ExampleKeys.of(rng, images.shape[0])
        draw = keys.fold_in(LATENT_STREAM) if self.sample_latents and not self.deterministic else None
        latents = self.encode(images, draw)  # of the frozen params only: nothing here is differentiated
        return self.backbone.example_losses({**batch, "image": latents}, keys, step=step, group=group)

    def sample(self, rng: jax.Array, num_samples: int, *, labels: jax.Array | None = None, **options: Any) -> jax.Array:
        """The backbone's latent samples decoded to pixels (``options`` go to the backbone's sampler)."""
        if not getattr(self.backbone, "shards_samples", False):
            options.pop("sharding", None)
        return self.decode(self.backbone.sample(rng, num_samples, labels=labels, **options))

    def network_evaluations(self, *args: Any, **kwargs: Any) -> int | None:
        evaluations = getattr(self.backbone, "network_evaluations", None)
        return evaluations(*args, **kwargs) if evaluations else None
