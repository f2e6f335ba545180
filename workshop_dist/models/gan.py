"""A DCGAN-style GAN (Radford et al., 2016) for small images, optionally class-conditional.

Two parameter groups, each with its own optimizer (``training.optimizers.generator`` and
``.discriminator``); one training step makes ``d_steps`` discriminator updates, then one generator
update (``update_order``). Following DCGAN: strided (transposed) 4x4 convolutions instead of
pooling, ReLU in the generator and LeakyReLU(0.2) in the discriminator, Adam with beta1 = 0.5.
Unlike DCGAN there is no BatchNorm: its running statistics would be state shared by both
groups' updates and would make evaluation-mode samples differ from training-mode ones; the
nets here are small enough to train without it.

Losses (``loss`` parameter), per example with ``l_r = D(x)`` and ``l_f = D(G(z))`` (logits):

- ``non_saturating`` (Goodfellow et al., 2014): D minimises ``softplus(-l_r) + softplus(l_f)``
  (the binary cross-entropy of real vs fake), G minimises ``softplus(-l_f)`` (= ``-log D(G(z))``).
- ``hinge`` (Lim & Ye, 2017; Miyato et al., 2018): D minimises ``relu(1 - l_r) + relu(1 + l_f)``,
  G minimises ``-l_f``.

An optional R1 penalty (Mescheder et al., 2018), ``r1_gamma / 2 * |grad_x D(x)|^2`` on real
images, is added to the discriminator's loss. With ``num_classes`` the generator gets a
label embedding next to its noise and the discriminator is a projection discriminator
(Miyato & Koyama, 2018): ``D(x, y) = w.h(x) + embed(y).h(x)``.

``configs/gan_digits.yaml`` (widths 16-32-64, conditional, EMA samples) reaches FD 45.3 on the
digits, 1.80x the floor of real held-out data (``benchmarks/digits_quality.py``). Wider nets
(32-64-128) cost ~15x more per step on CPU (XLA:CPU's transposed convolutions) and R1 ~3x.
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Any, Literal

import jax
import jax.numpy as jnp
import pydantic
from flax import nnx

from workshop_dist.config import ConfigError, StrictConfig
from workshop_dist.models import layers
from workshop_dist.models.base import GenerativeModel
from workshop_dist.models.config import ModelConfiguration
from workshop_dist.models.keys import ExampleKeys
from workshop_dist.models.registry import register_model, validate_parameters


class GANParameters(StrictConfig):
    loss: Literal["non_saturating", "hinge"] = pydantic.Field(
        "non_saturating", description="The GAN objective."
    )
    d_steps: int = pydantic.Field(1, ge=1, description="Discriminator updates per generator update.")
    num_classes: int = pydantic.Field(0, ge=0, description="Classes to condition on (0: unconditional).")
    data_max: float | None = pydantic.Field(
        None, gt=0, description="Deprecated: a white pixel's value comes from the data section (model.data)."
    )
    r1_gamma: float = pydantic.Field(
        0.0, ge=0, description="Weight of the R1 penalty on real images (0: off)."
    )
    leak: float = pydantic.Field(
        0.2, ge=0, lt=1, description="Negative slope of the discriminator's LeakyReLU."
    )


class Generator(nnx.Module):
    """``z [B, latent] (+ label) -> dense -> bottom grid -> 4x4/2 transposed convs -> 3x3 conv -> sigmoid``."""

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        widths: list[int],
        latent_dim: int,
        p: GANParameters,
        data_max: float,
        **kw: Any,
    ):
        height, width, channels = image_shape
        factor = 2 ** (len(widths) - 1)
        self.bottom = (height // factor, width // factor, widths[-1])
        self.data_max = data_max
        self.label_embed = (
            layers.embed(p.num_classes, latent_dim, stddev=1.0 / math.sqrt(latent_dim), **kw) if p.num_classes else None
        )
        in_dim = latent_dim * (2 if p.num_classes else 1)
        self.project = layers.dense(in_dim, math.prod(self.bottom), ("latent", "embed"), **kw)
        back = list(reversed(widths))
        self.ups = nnx.List(
            [layers.conv(a, b, kernel=4, strides=2, transpose=True, **kw) for a, b in itertools.pairwise(back)]
        )
        self.out = layers.conv(widths[0], channels, **kw)

    def __call__(self, z: jax.Array, labels: jax.Array | None) -> jax.Array:
        if self.label_embed is not None:
            z = jnp.concatenate([z, self.label_embed(labels).astype(z.dtype)], -1)
        h = nnx.relu(self.project(z)).reshape(z.shape[0], *self.bottom)
        for layer in self.ups:
            h = nnx.relu(layer(h))
        return jax.nn.sigmoid(self.out(h).astype(jnp.float32)) * self.data_max


class Discriminator(nnx.Module):
    """``x -> 3x3 conv -> 4x4/2 convs (LeakyReLU) -> flatten -> logit`` (+ class projection)."""

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        widths: list[int],
        p: GANParameters,
        data_max: float,
        **kw: Any,
    ):
        height, width, channels = image_shape
        factor = 2 ** (len(widths) - 1)
        self.data_max, self.leak = data_max, p.leak
        self.stem = layers.conv(channels, widths[0], **kw)
        self.downs = nnx.List([layers.conv(a, b, kernel=4, strides=2, **kw) for a, b in itertools.pairwise(widths)])
        features = (height // factor) * (width // factor) * widths[-1]
        self.logit = layers.dense(features, 1, ("embed", None), **kw)
        self.label_embed = (
            layers.embed(p.num_classes, features, stddev=1.0 / math.sqrt(features), **kw) if p.num_classes else None
        )

    def __call__(self, x: jax.Array, labels: jax.Array | None) -> jax.Array:
        """Per-example logits ``[B]`` (positive: looks real)."""
        h = x.astype(jnp.float32) / self.data_max * 2.0 - 1.0
        h = nnx.leaky_relu(self.stem(h), self.leak)
        for layer in self.downs:
            h = nnx.leaky_relu(layer(h), self.leak)
        h = h.reshape(h.shape[0], -1)
        logits = self.logit(h)[:, 0]
        if self.label_embed is not None:
            logits = logits + (self.label_embed(labels).astype(h.dtype) * h).sum(-1)
        return logits.astype(jnp.float32)


def discriminator_loss(kind: str, real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """Per-example discriminator loss for ``kind`` (``non_saturating`` or ``hinge``)."""
    if kind == "hinge":
        return jax.nn.relu(1.0 - real_logits) + jax.nn.relu(1.0 + fake_logits)
    return jax.nn.softplus(-real_logits) + jax.nn.softplus(fake_logits)


def generator_loss(kind: str, fake_logits: jax.Array) -> jax.Array:
    """Per-example generator loss for ``kind``."""
    return -fake_logits if kind == "hinge" else jax.nn.softplus(-fake_logits)


@register_model("gan")
class GAN(GenerativeModel):
    """DCGAN-style generator/discriminator pair: ``hidden_dims`` are the widths from full resolution
    down (each further entry halves H and W), ``output_dim`` is the noise dimension."""

    Parameters = GANParameters
    per_example_keys = True
    param_groups = {"generator": "generator", "discriminator": "discriminator"}  # noqa: RUF012

    def __init__(self, config: ModelConfiguration, *, rngs: nnx.Rngs):
        self.hp: GANParameters = validate_parameters(type(self), config)
        self.image_shape = tuple(config.input_dim)
        if len(self.image_shape) != 3:
            raise ConfigError(f"gan needs input_dim (H, W, C), got {self.image_shape}")
        widths = list(config.hidden_dims)
        factor = 2 ** (len(widths) - 1)
        if self.image_shape[0] % factor or self.image_shape[1] % factor:
            raise ConfigError(
                f"gan halves the image {len(widths) - 1} times (one per hidden_dims entry after the first): "
                f"H and W ({self.image_shape[0]}x{self.image_shape[1]}) must be divisible by {factor}."
            )
        self.latent_dim = config.output_dim
        self.num_classes = self.hp.num_classes
        data_max = _data_max(config, self.hp)
        kw = {"rngs": rngs, **layers.dtypes(config)}
        self.generator = Generator(self.image_shape, widths, self.latent_dim, self.hp, data_max, **kw)
        self.discriminator = Discriminator(self.image_shape, widths, self.hp, data_max, **kw)

    @property
    def update_order(self) -> tuple[str, ...]:
        """``d_steps`` discriminator updates, then one generator update."""
        return ("discriminator",) * self.hp.d_steps + ("generator",)

    def _labels(self, batch: dict[str, jax.Array], keys: ExampleKeys) -> jax.Array | None:
        """The batch's labels for a conditional model (random ones when the data has none)."""
        if not self.num_classes:
            return None
        if "label" in batch:
            return batch["label"].astype(jnp.int32)
        return keys.randint(0, self.num_classes)

    def _fake(self, labels: jax.Array | None, keys: ExampleKeys) -> jax.Array:
        """One fake per example, from that example's noise key."""
        return self.generator(keys.normal((self.latent_dim,)), labels)

    def _r1(self, real: jax.Array, labels: jax.Array | None) -> jax.Array:
        """Per-example ``|grad_x D(x)|^2`` (examples are independent: no batch statistics in D)."""
        grads = jax.grad(lambda x: self.discriminator(x, labels).sum())(real)
        return (grads.reshape(real.shape[0], -1) ** 2).sum(-1)

    def example_losses(
        self,
        batch: dict[str, jax.Array],
        rng: jax.Array | ExampleKeys,
        *,
        step: jax.Array | None = None,
        group: str | None = None,
    ) -> dict[str, jax.Array]:
        """Per-example losses of ``group``; with ``group=None`` (evaluation) both, and ``loss`` = their sum.

        ``discriminator``: ``{"loss": D loss, "real_logit", "fake_logit"}`` (+ ``"r1"``); the fakes
        are constants here (``stop_gradient``), so this loss never reaches the generator.
        ``generator``: ``{"loss": G loss, "fake_logit"}``. ``None``: ``d_loss``, ``g_loss``,
        the logits, and ``loss = d_loss + g_loss`` (a sum that tracks training balance, not
        sample quality: judge a GAN by :mod:`workshop_dist.quality`).
        """
        if group not in (None, "generator", "discriminator"):
            raise ValueError(f"unknown parameter group '{group}' (generator, discriminator or None)")
        real = batch["image"].astype(jnp.float32)
        layers.check_images(real, self.image_shape)
        label_keys, noise_keys = ExampleKeys.of(rng, real.shape[0]).split(2)
        labels = self._labels(batch, label_keys)
        fake = self._fake(labels, noise_keys)
        kind = self.hp.loss
        if group == "generator":
            fake_logits = self.discriminator(fake, labels)
            return {"loss": generator_loss(kind, fake_logits), "fake_logit": fake_logits}
        fake_logits = self.discriminator(jax.lax.stop_gradient(fake), labels)
        real_logits = self.discriminator(real, labels)
        d_loss = discriminator_loss(kind, real_logits, fake_logits)
        out = {"real_logit": real_logits, "fake_logit": fake_logits}
        if self.hp.r1_gamma > 0:
            out["r1"] = self._r1(real, labels)
            d_loss = d_loss + 0.5 * self.hp.r1_gamma * out["r1"]
        if group == "discriminator":
            return {"loss": d_loss, **out}
        g_loss = generator_loss(kind, fake_logits)
        return {"loss": d_loss + g_loss, "d_loss": d_loss, "g_loss": g_loss, **out}

    def sample(
        self, rng: jax.Array, num_samples: int, *, labels: jax.Array | None = None, **options: Any
    ) -> jax.Array:
        """``[N, H, W, C]`` generator outputs in data space (0..``data_max``).

        A conditional model without ``labels`` cycles through the classes (``0, 1, ..., 9, 0, ...``).
        Option ``temperature`` (default 1) scales the noise (below 1: the truncation trick).
        """
        if self.num_classes:
            labels = (
                jnp.arange(num_samples) % self.num_classes
                if labels is None
                else jnp.asarray(labels, jnp.int32)
            )
        else:
            labels = None
        z = options.get("temperature", 1.0) * jax.random.normal(rng, (num_samples, self.latent_dim))
        return self.generator(z, labels)


def _data_max(config: ModelConfiguration, p: GANParameters) -> float:
    """A white pixel's value: from the data (``model.data``); the deprecated ``data_max`` still works."""
    if p.data_max is None:
        return config.data.max_value or 1.0
    warnings.warn(
        "model.parameters.data_max is deprecated and will be removed in the next release; the GAN takes a "
        "white pixel's value from the data section (data.normalize)",
        DeprecationWarning,
        stacklevel=3,
    )
    if config.data.max_value not in (None, p.data_max):
        raise ConfigError(
            f"model.parameters.data_max={p.data_max} disagrees with the data's white pixel {config.data.max_value}: remove it"
        )
    return p.data_max
