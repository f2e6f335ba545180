"""Variational autoencoders (Kingma & Welling, 2014) with Bernoulli or discrete pixel likelihoods.

``VAE`` is an MLP encoder/decoder; ``ConvVAE`` uses stride-2 convolutions. Both optimise the
negative ELBO with a ``beta`` weight on the KL term (beta-VAE). ``parameters.likelihood`` picks
the decoder: ``bernoulli`` (default) on [0, 1] pixels, or, over integer levels 0..L-1
(``data.normalize: levels``), ``categorical`` (L logits per pixel) or ``discretized_logistic``
(Salimans et al., 2017). :meth:`nll` is the importance-weighted bound of Burda et al. (2016).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
import pydantic
from flax import nnx

from workshop_dist.config import ConfigError
from workshop_dist.models import layers
from workshop_dist.models.base import GenerativeModel
from workshop_dist.models.config import LevelsParameters, ModelConfiguration, data_levels
from workshop_dist.models.keys import ExampleKeys
from workshop_dist.models.registry import register_model, validate_parameters


class VAEParameters(LevelsParameters):
    beta: float = pydantic.Field(1.0, ge=0, description="Weight of the KL term.")
    likelihood: Literal["bernoulli", "categorical", "discretized_logistic"] = pydantic.Field(
        "bernoulli",
        description="Decoder: 'bernoulli' on [0, 1] pixels, or over the data's integer levels "
        "'categorical' or 'discretized_logistic' (data.normalize: levels).",
    )


class _VAEBase(GenerativeModel):
    """Shared ELBO, sampling and reparameterisation; subclasses define encode/decode."""

    Parameters = VAEParameters
    per_example_keys = True

    def __init__(self, config: ModelConfiguration):
        self.params_config: VAEParameters = validate_parameters(type(self), config)
        self.image_shape = tuple(config.input_dim)
        self.latent_dim = config.output_dim
        likelihood = self.params_config.likelihood
        if likelihood == "bernoulli":
            if config.data.normalize == "levels":
                raise ConfigError(
                    "vae likelihood 'bernoulli' models pixels in [0, 1], but the data holds integer levels: set "
                    "data.normalize: unit, or model.parameters.likelihood: categorical / discretized_logistic"
                )
            self.num_levels = 2
        else:
            self.num_levels = data_levels(config, self.params_config, f"vae likelihood '{likelihood}'")
        self.outputs_per_pixel = {"bernoulli": 1, "categorical": self.num_levels}.get(likelihood, 2)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        raise NotImplementedError

    def decode(self, z: jax.Array) -> jax.Array:
        """Decoder outputs: Bernoulli logits ``[B, *image_shape]``; for the discrete likelihoods
        ``[B, *image_shape, K]`` (K = num_levels logits, or a logistic's mean and log-scale)."""
        raise NotImplementedError

    def _decoder_shape(self, batch_size: int) -> tuple[int, ...]:
        extra = () if self.params_config.likelihood == "bernoulli" else (self.outputs_per_pixel,)
        return (batch_size, *self.image_shape, *extra)

    def _inputs(self, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """``(target, encoder input)``: [0, 1] pixels for Bernoulli; levels and levels / (L - 1) otherwise."""
        x = batch["image"].astype(jnp.float32)
        layers.check_images(x, self.image_shape)
        if self.params_config.likelihood == "bernoulli":
            return x, x
        top = self.num_levels - 1
        levels = jnp.clip(jnp.round(x), 0, top)
        return levels, levels / top

    def log_likelihood(self, outputs: jax.Array, target: jax.Array) -> jax.Array:
        """``log p(x | z)`` per example, from the decoder outputs."""
        p = self.params_config
        axes = tuple(range(1, target.ndim))
        if p.likelihood == "bernoulli":
            return -optax.sigmoid_binary_cross_entropy(outputs, target).sum(axes)
        levels = target.astype(jnp.int32)
        if p.likelihood == "categorical":
            log_probs = jax.nn.log_softmax(outputs, axis=-1)
            return jnp.take_along_axis(log_probs, levels[..., None], axis=-1)[..., 0].sum(axes)
        return discretized_logistic_log_prob(outputs[..., 0], outputs[..., 1], levels, self.num_levels).sum(axes)

    def example_losses(
        self, batch: dict[str, jax.Array], rng: jax.Array | ExampleKeys, *, step: jax.Array | None = None,
        group: str | None = None,
    ) -> dict[str, jax.Array]:
        """Per-example negative ELBO (reconstruction + beta * KL) and its parts (one z per example's key)."""
        target, x = self._inputs(batch)
        mean, logvar = self.encode(x)
        eps = ExampleKeys.of(rng, x.shape[0]).normal(mean.shape[1:], mean.dtype)
        z = mean + jnp.exp(0.5 * logvar) * eps
        reconstruction = -self.log_likelihood(self.decode(z), target)
        kl = 0.5 * (jnp.exp(logvar) + mean**2 - 1.0 - logvar).sum(-1)
        loss = reconstruction + self.params_config.beta * kl
        out = {"loss": loss, "reconstruction": reconstruction, "kl": kl, "elbo": -(reconstruction + kl)}
        if self.params_config.likelihood != "bernoulli":
            out["bits_per_dim"] = -out["elbo"] / (math.prod(self.image_shape) * math.log(2.0))
        return out

    def nll(self, batch: dict[str, jax.Array], rng: jax.Array, **options: Any) -> jax.Array:
        """Importance-weighted bound (Burda et al., 2016) on ``-log p(x)``, nats per example ``[B]``.

        ``-log (1/K) sum_k p(x | z_k) p(z_k) / q(z_k | x)`` with ``K = num_samples`` (default 128)
        draws from the encoder; K=1 is a one-sample ELBO, and the bound tightens as K grows. The
        K samples go through the decoder ``chunk`` (default 16) at a time. ``beta`` plays no part.
        """
        num_samples = int(options.get("num_samples", 128))
        chunk = int(options.get("chunk", 16))
        target, x = self._inputs(batch)
        mean, logvar = self.encode(x)
        std = jnp.exp(0.5 * logvar)

        def log_weight(key: jax.Array) -> jax.Array:
            eps = jax.random.normal(key, mean.shape, mean.dtype)
            z = mean + std * eps
            log_prior = -0.5 * (z**2 + math.log(2 * math.pi)).sum(-1)
            log_q = -0.5 * (eps**2 + math.log(2 * math.pi) + logvar).sum(-1)
            return self.log_likelihood(self.decode(z), target) + log_prior - log_q

        log_w = jax.lax.map(log_weight, jax.random.split(rng, num_samples), batch_size=min(chunk, num_samples))
        return -(jax.nn.logsumexp(log_w, axis=0) - math.log(num_samples))

    def sample(self, rng: jax.Array, num_samples: int, *, labels: jax.Array | None = None, **options: Any) -> jax.Array:
        """Images decoded from prior samples, ``[N, *image_shape]``.

        Bernoulli: the mean images (probabilities in [0, 1]). Discrete likelihoods: levels as
        floats, drawn from ``p(x | z)``, or its mean with the option ``decoder_mean=True``.
        """
        z_key, x_key = jax.random.split(rng)
        z = jax.random.normal(z_key, (num_samples, self.latent_dim))
        outputs = self.decode(z)
        p = self.params_config
        if p.likelihood == "bernoulli":
            return jax.nn.sigmoid(outputs)
        top = self.num_levels - 1
        if p.likelihood == "categorical":
            if options.get("decoder_mean", False):
                return (jax.nn.softmax(outputs, axis=-1) * jnp.arange(self.num_levels)).sum(-1)
            return jax.random.categorical(x_key, outputs).astype(jnp.float32)
        mu, log_scale = outputs[..., 0], jnp.maximum(outputs[..., 1], _MIN_LOG_SCALE)
        if options.get("decoder_mean", False):
            return jnp.clip(jnp.round((mu + 1) * top / 2), 0, top)
        u = jax.random.uniform(x_key, mu.shape, minval=1e-5, maxval=1 - 1e-5)
        scaled = mu + jnp.exp(log_scale) * (jnp.log(u) - jnp.log1p(-u))
        return jnp.clip(jnp.round((scaled + 1) * top / 2), 0, top)


_MIN_LOG_SCALE = -7.0


def discretized_logistic_log_prob(mu: jax.Array, log_scale: jax.Array, levels: jax.Array, num_levels: int) -> jax.Array:
    """``log P(level)`` under a logistic(mu, exp(log_scale)) on [-1, 1] binned into ``num_levels``.

    Level k covers ``[c_k - h, c_k + h]`` with centre ``c_k = 2k/(L-1) - 1`` and ``h = 1/(L-1)``;
    the end bins extend to -inf / +inf, so the probabilities sum to one (PixelCNN++ style).
    """
    log_scale = jnp.maximum(log_scale, _MIN_LOG_SCALE)
    inv_scale = jnp.exp(-log_scale)
    half = 1.0 / (num_levels - 1)
    centred = 2.0 * levels / (num_levels - 1) - 1.0 - mu
    upper = inv_scale * (centred + half)
    lower = inv_scale * (centred - half)
    # log(sigmoid(a) - sigmoid(b)) = log_sigmoid(a) + log_sigmoid(-b) + log(1 - exp(b - a)), stable for a > b.
    middle = jax.nn.log_sigmoid(upper) + jax.nn.log_sigmoid(-lower) + jnp.log(-jnp.expm1(-2.0 * half * inv_scale))
    first = jax.nn.log_sigmoid(upper)  # P(x <= c_0 + h)
    last = jax.nn.log_sigmoid(-lower)  # P(x >= c_top - h)
    return jnp.where(levels == 0, first, jnp.where(levels == num_levels - 1, last, middle))


@register_model("vae")
class VAE(_VAEBase):
    """MLP VAE: flatten -> hidden_dims -> (mean, logvar) of output_dim -> reversed hidden_dims -> pixels."""

    def __init__(self, config: ModelConfiguration, *, rngs: nnx.Rngs):
        super().__init__(config)
        sizes = [math.prod(self.image_shape), *config.hidden_dims]
        kw = {"rngs": rngs, **layers.dtypes(config)}
        self.encoder = nnx.List(
            [layers.dense(a, b, _alternate(i), **kw) for i, (a, b) in enumerate(itertools.pairwise(sizes))]
        )
        last_axis = _alternate(len(config.hidden_dims) - 1)[1]
        self.mean = layers.dense(sizes[-1], self.latent_dim, (last_axis, "latent"), **kw)
        self.logvar = layers.dense(sizes[-1], self.latent_dim, (last_axis, "latent"), **kw)
        back = [self.latent_dim, *reversed(config.hidden_dims)]
        self.decoder = nnx.List(
            [
                layers.dense(a, b, ("latent", "mlp") if i == 0 else _alternate(i), **kw)
                for i, (a, b) in enumerate(itertools.pairwise(back))
            ]
        )
        last = ("latent", "mlp") if len(back) == 2 else _alternate(len(back) - 2)
        self.output = layers.dense(
            back[-1], sizes[0] * self.outputs_per_pixel, _alternate(0 if last[1] == "embed" else 1), **kw
        )

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = x.reshape(x.shape[0], -1)
        for layer in self.encoder:
            h = nnx.swish(layer(h))
        return self.mean(h), self.logvar(h)

    def decode(self, z: jax.Array) -> jax.Array:
        h = z
        for layer in self.decoder:
            h = nnx.swish(layer(h))
        return self.output(h).reshape(self._decoder_shape(z.shape[0]))


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
        kw = {"rngs": rngs, **layers.dtypes(config)}
        chans = [channels, *config.hidden_dims]
        self.encoder = nnx.List([layers.conv(a, b, strides=2, **kw) for a, b in itertools.pairwise(chans)])
        self.bottom = (height // factor, width // factor, chans[-1])
        flat = math.prod(self.bottom)
        self.mean = layers.dense(flat, self.latent_dim, ("embed", "latent"), **kw)
        self.logvar = layers.dense(flat, self.latent_dim, ("embed", "latent"), **kw)
        self.expand = layers.dense(self.latent_dim, flat, ("latent", "embed"), **kw)
        back = list(reversed(chans[1:]))
        self.decoder = nnx.List(
            [layers.conv(a, b, strides=2, transpose=True, **kw) for a, b in zip(back, [*back[1:], back[-1]], strict=False)]
        )
        self.output = layers.conv(back[-1], channels * self.outputs_per_pixel, **kw)

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
        return self.output(h).reshape(self._decoder_shape(z.shape[0]))


def _alternate(index: int) -> tuple[str, str]:
    """Megatron-style alternation so consecutive matmuls shard compatibly over ``tensor``."""
    return ("embed", "mlp") if index % 2 == 0 else ("mlp", "embed")
