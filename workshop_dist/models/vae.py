"""Variational autoencoders (Kingma & Welling, 2014) with a Bernoulli likelihood on [0, 1] pixels.

``VAE`` is an MLP encoder/decoder; ``ConvVAE`` uses stride-2 convolutions. Both optimise the
negative ELBO with a ``beta`` weight on the KL term (beta-VAE).
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import optax
import pydantic
from flax import nnx

from workshop_dist.config import ConfigError, StrictConfig
from workshop_dist.models import layers
from workshop_dist.models.base import GenerativeModel
from workshop_dist.models.config import ModelConfiguration
from workshop_dist.models.registry import register_model, validate_parameters


class VAEParameters(StrictConfig):
    beta: float = pydantic.Field(1.0, ge=0, description="Weight of the KL term.")


class _VAEBase(GenerativeModel):
    """Shared ELBO, sampling and reparameterisation; subclasses define encode/decode."""

    Parameters = VAEParameters

    def __init__(self, config: ModelConfiguration):
        self.params_config: VAEParameters = validate_parameters(type(self), config)
        self.image_shape = tuple(config.input_dim)
        self.latent_dim = config.output_dim

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        raise NotImplementedError

    def decode(self, z: jax.Array) -> jax.Array:
        """Pixel logits of shape ``[B, *image_shape]``."""
        raise NotImplementedError

    def example_losses(
        self, batch: dict[str, jax.Array], rng: jax.Array, *, step: jax.Array | None = None, group: str | None = None
    ) -> dict[str, jax.Array]:
        """Per-example negative ELBO (reconstruction + beta * KL) and its parts."""
        x = batch["image"].astype(jnp.float32)
        if x.shape[1:] != self.image_shape:
            raise ValueError(f"batch images have shape {x.shape[1:]}, the model expects {self.image_shape}")
        mean, logvar = self.encode(x)
        eps = jax.random.normal(rng, mean.shape, mean.dtype)
        z = mean + jnp.exp(0.5 * logvar) * eps
        logits = self.decode(z)
        axes = tuple(range(1, x.ndim))
        reconstruction = optax.sigmoid_binary_cross_entropy(logits, x).sum(axes)
        kl = 0.5 * (jnp.exp(logvar) + mean**2 - 1.0 - logvar).sum(-1)
        loss = reconstruction + self.params_config.beta * kl
        return {"loss": loss, "reconstruction": reconstruction, "kl": kl, "elbo": -(reconstruction + kl)}

    def sample(self, rng: jax.Array, num_samples: int, *, labels: jax.Array | None = None, **options) -> jax.Array:
        """Mean images (Bernoulli probabilities) decoded from prior samples: ``[N, *image_shape]``."""
        z = jax.random.normal(rng, (num_samples, self.latent_dim))
        return jax.nn.sigmoid(self.decode(z))


@register_model("vae")
class VAE(_VAEBase):
    """MLP VAE: flatten -> hidden_dims -> (mean, logvar) of output_dim -> reversed hidden_dims -> pixels."""

    def __init__(self, config: ModelConfiguration, *, rngs: nnx.Rngs):
        super().__init__(config)
        sizes = [math.prod(self.image_shape), *config.hidden_dims]
        self.encoder = nnx.List(
            [layers.dense(a, b, _alternate(i), rngs=rngs) for i, (a, b) in enumerate(itertools.pairwise(sizes))]
        )
        last_axis = _alternate(len(config.hidden_dims) - 1)[1]
        self.mean = layers.dense(sizes[-1], self.latent_dim, (last_axis, "latent"), rngs=rngs)
        self.logvar = layers.dense(sizes[-1], self.latent_dim, (last_axis, "latent"), rngs=rngs)
        back = [self.latent_dim, *reversed(config.hidden_dims)]
        self.decoder = nnx.List(
            [
                layers.dense(a, b, ("latent", "mlp") if i == 0 else _alternate(i), rngs=rngs)
                for i, (a, b) in enumerate(itertools.pairwise(back))
            ]
        )
        last = ("latent", "mlp") if len(back) == 2 else _alternate(len(back) - 2)
        self.output = layers.dense(back[-1], sizes[0], _alternate(0 if last[1] == "embed" else 1), rngs=rngs)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = x.reshape(x.shape[0], -1)
        for layer in self.encoder:
            h = nnx.swish(layer(h))
        return self.mean(h), self.logvar(h)

    def decode(self, z: jax.Array) -> jax.Array:
        h = z
        for layer in self.decoder:
            h = nnx.swish(layer(h))
        return self.output(h).reshape(z.shape[0], *self.image_shape)


@register_model("conv_vae")
class ConvVAE(_VAEBase):
    """Convolutional VAE: one stride-2 3x3 conv per hidden_dims entry (channels), and back."""

    def __init__(self, config: ModelConfiguration, *, rngs: nnx.Rngs):
        super().__init__(config)
        if len(self.image_shape) != 3:
            raise ConfigError(f"conv_vae needs input_dim (H, W, C), got {self.image_shape}")
        height, width, channels = self.image_shape
        factor = 2 ** len(config.hidden_dims)
        if height % factor or width % factor:
            raise ConfigError(
                f"conv_vae halves the image {len(config.hidden_dims)} times: H and W ({height}x{width}) "
                f"must be divisible by {factor}; use fewer hidden_dims."
            )
        chans = [channels, *config.hidden_dims]
        self.encoder = nnx.List([layers.conv(a, b, strides=2, rngs=rngs) for a, b in itertools.pairwise(chans)])
        self.bottom = (height // factor, width // factor, chans[-1])
        flat = math.prod(self.bottom)
        self.mean = layers.dense(flat, self.latent_dim, ("embed", "latent"), rngs=rngs)
        self.logvar = layers.dense(flat, self.latent_dim, ("embed", "latent"), rngs=rngs)
        self.expand = layers.dense(self.latent_dim, flat, ("latent", "embed"), rngs=rngs)
        back = list(reversed(chans[1:]))
        self.decoder = nnx.List(
            [layers.conv(a, b, strides=2, transpose=True, rngs=rngs) for a, b in zip(back, [*back[1:], back[-1]], strict=False)]
        )
        self.output = layers.conv(back[-1], channels, rngs=rngs)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = x
        for layer in self.encoder:
            h = nnx.swish(layer(h))
        h = h.reshape(h.shape[0], -1)
        return self.mean(h), self.logvar(h)

    def decode(self, z: jax.Array) -> jax.Array:
        h = nnx.swish(self.expand(z)).reshape(z.shape[0], *self.bottom)
        for layer in self.decoder:
            h = nnx.swish(layer(h))
        return self.output(h)


def _alternate(index: int) -> tuple[str, str]:
    """Megatron-style alternation so consecutive matmuls shard compatibly over ``tensor``."""
    return ("embed", "mlp") if index % 2 == 0 else ("mlp", "embed")
