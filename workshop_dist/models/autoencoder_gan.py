"""The autoencoder with an adversarial patch discriminator (``model.parameters.discriminator: true``).

Why: L1/L2 reconstructions are blurry; LDM's first stages add a PatchGAN discriminator (Isola et
al., 2017) whose hinge loss sharpens them (Esser et al., 2021; Rombach et al., 2022). Two
parameter groups train through the engine's ``training.optimizers`` (as :mod:`workshop_dist.models.gan`):
``autoencoder`` (everything under ``self.autoencoder``) and ``discriminator``; one step updates the
discriminator, then the autoencoder.

Losses per example: the discriminator minimises ``mean(relu(1 - D(x))) + mean(relu(1 + D(x_rec)))``
over its patch logits; the autoencoder adds ``disc_weight * (-mean D(x_rec)) * pixels`` to its
reconstruction + KL loss. The adversarial term is scaled by the pixel count because the
reconstruction error is summed over pixels: ``disc_weight`` is a ratio per pixel, not LDM's
adaptive weight (a batch-level gradient-norm ratio). Both adversarial terms are off before step
``disc_start`` (LDM starts the discriminator late, once reconstructions are fair). No BatchNorm in
the discriminator: its statistics would be state shared by both groups' updates.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
import pydantic
from flax import nnx

from workshop_dist.models import layers
from workshop_dist.models.autoencoder import Autoencoder, AutoencoderParameters
from workshop_dist.models.base import GenerativeModel
from workshop_dist.models.config import ModelConfiguration
from workshop_dist.models.keys import ExampleKeys
from workshop_dist.models.registry import validate_parameters


class AdversarialParameters(AutoencoderParameters):
    """The autoencoder's parameters plus its discriminator's."""

    discriminator: bool = pydantic.Field(True, description="Train with an adversarial patch discriminator.")
    disc_width: int = pydantic.Field(32, ge=1, description="Channels of the discriminator's first layer (doubling).")
    disc_layers: int = pydantic.Field(2, ge=1, description="Stride-2 4x4 layers: each logit sees a patch.")
    disc_weight: float = pydantic.Field(0.1, ge=0, description="Adversarial weight per pixel in the autoencoder's loss.")
    disc_start: int = pydantic.Field(0, ge=0, description="Optimizer step from which the adversarial terms count.")


class PatchDiscriminator(nnx.Module):
    """4x4 stride-2 convolutions with LeakyReLU(0.2), then a 4x4 convolution to one logit per patch."""

    def __init__(self, channels: int, width: int, num_layers: int, **kw: Any):
        widths = [channels] + [width * min(2**i, 8) for i in range(num_layers)]
        self.convs = nnx.List([layers.conv(a, b, kernel=4, strides=2, **kw) for a, b in itertools.pairwise(widths)])
        self.head = layers.conv(widths[-1], 1, kernel=4, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        for conv in self.convs:
            x = jax.nn.leaky_relu(conv(x), 0.2)
        return self.head(x).astype(jnp.float32).reshape(x.shape[0], -1)  # [B, patches]


class AdversarialAutoencoder(GenerativeModel):
    """:class:`Autoencoder` (under ``autoencoder``) plus a :class:`PatchDiscriminator`; same encode/decode/sample."""

    Parameters = AdversarialParameters
    per_example_keys = True
    param_groups = {"autoencoder": "autoencoder", "discriminator": "discriminator"}  # noqa: RUF012
    update_order = ("discriminator", "autoencoder")

    def __init__(self, config: ModelConfiguration, *, rngs: nnx.Rngs):
        p: AdversarialParameters = validate_parameters(type(self), config)
        self.params_config = p
        own = {"discriminator"} | (set(AdversarialParameters.model_fields) - set(AutoencoderParameters.model_fields))
        inner = {k: v for k, v in config.parameters.items() if k not in own}
        self.autoencoder = Autoencoder(config.model_copy(update={"parameters": inner}), rngs=rngs)
        kw = {"rngs": rngs, **layers.dtypes(config)}
        self.discriminator = PatchDiscriminator(config.input_dim[-1], p.disc_width, p.disc_layers, **kw)
        self.latent_shape = self.autoencoder.latent_shape
        self.scaling_factor = self.autoencoder.scaling_factor

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.autoencoder.encode(images)

    def decode(self, latents: jax.Array) -> jax.Array:
        return self.autoencoder.decode(latents)

    def sample(self, rng: jax.Array, num_samples: int, *, labels: jax.Array | None = None, **options: Any) -> jax.Array:
        return self.autoencoder.sample(rng, num_samples, **options)

    def example_losses(
        self, batch: dict[str, jax.Array], rng: jax.Array | ExampleKeys, *, step: jax.Array | None = None,
        group: str | None = None,
    ) -> dict[str, jax.Array]:
        """``discriminator``: its hinge loss; ``autoencoder``: reconstruction + KL + adversarial; None (evaluation):
        the autoencoder's losses (``loss`` without the adversarial term, comparable with the plain family) and both
        adversarial values."""
        if group not in (None, "autoencoder", "discriminator"):
            raise ValueError(f"unknown parameter group '{group}' (autoencoder, discriminator or None)")
        ae, p = self.autoencoder, self.params_config
        out, target, reconstruction = ae.reconstruct(batch, rng)
        on = jnp.float32(1.0) if step is None else (step >= p.disc_start).astype(jnp.float32)
        fake = self.discriminator(jax.lax.stop_gradient(reconstruction) if group == "discriminator" else reconstruction)
        if group != "autoencoder":
            real = self.discriminator(target)
            d_loss = jax.nn.relu(1.0 - real).mean(-1) + jax.nn.relu(1.0 + fake).mean(-1)
            if group == "discriminator":
                return {"loss": on * d_loss, "real_logit": real.mean(-1), "fake_logit": fake.mean(-1)}
            out["d_loss"] = d_loss
        g_loss = -fake.mean(-1) * math.prod(ae.image_shape)
        out["g_loss"] = g_loss
        if group == "autoencoder":
            out["loss"] = out["loss"] + p.disc_weight * on * g_loss
        return out


Autoencoder.adversarial = AdversarialAutoencoder  # `parameters.discriminator: true` selects it
