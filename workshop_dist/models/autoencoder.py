"""A KL autoencoder in Stable Diffusion's layout (``AutoencoderKL``; Rombach et al., 2022).

Why this layout: latent diffusion trains on the latents of such an autoencoder, and published
weights (SD's VAE) load into it by name (:mod:`workshop_dist.models.autoencoder_weights`). The
module tree mirrors diffusers' attribute names (``encoder.down_blocks.0.resnets.0.conv1``,
``encoder.mid_block.attentions.0.to_q``, ``quant_conv``, ...), so a converted state dict needs
no renaming beyond PyTorch's layouts.

Encoder: ``conv_in``, one level per ``block_out_channels`` entry (``layers_per_block`` residual
blocks, then a stride-2 convolution after every level but the last), a mid block (residual,
single-head self-attention, residual), GroupNorm, SiLU and ``conv_out`` to the mean and
log-variance (``quant_conv`` after it). The decoder mirrors it with ``layers_per_block + 1``
blocks per level and nearest-neighbour upsampling. Images shrink by ``2 ** (levels - 1)``.
Every GroupNorm has ``norm_num_groups`` groups and epsilon 1e-6; the log-variance is clipped
to [-30, 20] (as diffusers' ``DiagonalGaussianDistribution``).

Loss per example, in the network's pixel range [-1, 1] (SD's): the L1 or L2 reconstruction
error summed over pixels plus ``kl_weight`` times the KL divergence to N(0, I) summed over the
latent (LDM's ``LPIPSWithDiscriminator`` without its perceptual and adversarial terms).

:meth:`Autoencoder.encode` and :meth:`Autoencoder.decode` take and give images in data space
(what the data pipeline feeds the model: [0, 1], or levels); ``scaling_factor`` (SD: 0.18215)
is what latent diffusion multiplies the latents by. :meth:`Autoencoder.sample` decodes draws
from the prior N(0, I): with a small ``kl_weight`` the latents are far from that prior, so an
autoencoder's samples are poor images; it is a first stage, not a generator on its own.
``parameters.discriminator: true`` adds LDM's adversarial patch discriminator
(:mod:`workshop_dist.models.autoencoder_gan`, two parameter groups).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import pydantic
from flax import nnx

from workshop_dist.config import ConfigError, StrictConfig
from workshop_dist.models import layers
from workshop_dist.models.base import GenerativeModel
from workshop_dist.models.config import ModelConfiguration
from workshop_dist.models.diffusion import remat_policy
from workshop_dist.models.keys import ExampleKeys
from workshop_dist.models.registry import register_model, validate_parameters

LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps the log-variance to this


class AutoencoderParameters(StrictConfig):
    """The autoencoder's sizes and objective (diffusers' ``AutoencoderKL`` names)."""

    block_out_channels: list[int] = pydantic.Field(
        [32, 64], min_length=1, description="Channels per resolution level; images shrink by 2**(levels - 1)."
    )
    layers_per_block: int = pydantic.Field(2, ge=1, description="Residual blocks per encoder level (decoder: one more).")
    latent_channels: int = pydantic.Field(4, ge=1, description="Channels of the latent (SD's z_channels).")
    norm_num_groups: int = pydantic.Field(32, ge=1, description="Groups of every GroupNorm (SD: 32).")
    mid_block_attention: bool = pydantic.Field(True, description="Self-attention in the encoder's and decoder's mid block.")
    use_quant_conv: bool = pydantic.Field(True, description="1x1 convolution on the encoder's moments (quant_conv).")
    use_post_quant_conv: bool = pydantic.Field(True, description="1x1 convolution on the latent before decoding.")
    reconstruction: Literal["l1", "l2"] = pydantic.Field("l1", description="Per-pixel reconstruction error, summed.")
    kl_weight: float = pydantic.Field(1e-6, ge=0, description="Weight of the KL term (SD: 1e-6).")
    scaling_factor: float = pydantic.Field(
        0.18215, gt=0, description="Latent diffusion trains on latents * scaling_factor (SD 1.x/2.x: 0.18215)."
    )
    discriminator: bool = pydantic.Field(
        False, description="true: train with a patch discriminator (workshop_dist.models.autoencoder_gan; its "
        "disc_* parameters, two training.optimizers: autoencoder and discriminator)."
    )


class ResnetBlock(nnx.Module):
    """GroupNorm-SiLU-conv twice plus the input (through a 1x1 ``conv_shortcut`` when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, **kw: Any):
        self.norm1 = _norm(in_channels, groups, kw)
        self.conv1 = layers.conv(in_channels, out_channels, **kw)
        self.norm2 = _norm(out_channels, groups, kw)
        self.conv2 = layers.conv(out_channels, out_channels, **kw)
        self.conv_shortcut = layers.conv(in_channels, out_channels, kernel=1, **kw) if in_channels != out_channels else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = self.conv2(nnx.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class AttentionBlock(nnx.Module):
    """Single-head self-attention over the pixels, residual (diffusers' ``Attention`` of the VAE mid block)."""

    def __init__(self, channels: int, groups: int, **kw: Any):
        self.group_norm = _norm(channels, groups, kw)
        self.to_q = layers.dense(channels, channels, ("embed", "heads"), **kw)
        self.to_k = layers.dense(channels, channels, ("embed", "heads"), **kw)
        self.to_v = layers.dense(channels, channels, ("embed", "heads"), **kw)
        self.to_out = nnx.List([layers.dense(channels, channels, ("heads", "embed"), **kw)])

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        h = self.group_norm(x).reshape(batch, height * width, 1, channels)  # [B, T, heads=1, C]
        out = jax.nn.dot_product_attention(self.to_q(h), self.to_k(h), self.to_v(h))  # softmax in float32
        return x + self.to_out[0](out.reshape(batch, height, width, channels))


class MidBlock(nnx.Module):
    """Residual block, self-attention (optional), residual block, at the lowest resolution."""

    def __init__(self, channels: int, groups: int, attention: bool, **kw: Any):
        self.resnets = nnx.List([ResnetBlock(channels, channels, groups, **kw) for _ in range(2)])
        self.attentions = nnx.List([AttentionBlock(channels, groups, **kw)] if attention else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Downsample(nnx.Module):
    """Stride-2 3x3 convolution after padding one row and column at the bottom and right (diffusers')."""

    def __init__(self, channels: int, **kw: Any):
        self.conv = layers.conv(channels, channels, strides=2, padding=((0, 1), (0, 1)), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour doubling, then a 3x3 convolution."""

    def __init__(self, channels: int, **kw: Any):
        self.conv = layers.conv(channels, channels, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Level(nnx.Module):
    """One resolution level: residual blocks, then a resampler unless it is the last level.

    The resampler sits in a one-element list (``downsamplers.0`` / ``upsamplers.0``) as in diffusers.
    """

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, kind: str, resample: bool, groups: int,
                 remat: str, **kw: Any):
        self.resnets = nnx.List(
            [ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, **kw) for i in range(num_layers)]
        )
        sampler = Downsample if kind == "down" else Upsample
        setattr(self, f"{kind}samplers", nnx.List([sampler(out_channels, **kw)] if resample else []))
        self.kind = kind
        self.remat = remat

    def __call__(self, x: jax.Array) -> jax.Array:
        wrap = remat_policy(self.remat)
        for resnet in self.resnets:
            x = wrap(lambda block, h: block(h))(resnet, x) if wrap else resnet(x)
        for sampler in getattr(self, f"{self.kind}samplers"):
            x = sampler(x)
        return x


class Encoder(nnx.Module):
    """Images ``[B, H, W, C]`` in [-1, 1] -> moments ``[B, H/f, W/f, 2 * latent_channels]``."""

    def __init__(self, p: AutoencoderParameters, in_channels: int, remat: str, **kw: Any):
        widths, groups = p.block_out_channels, p.norm_num_groups
        self.conv_in = layers.conv(in_channels, widths[0], **kw)
        self.down_blocks = nnx.List([
            Level(widths[max(i - 1, 0)], width, p.layers_per_block, "down", i < len(widths) - 1, groups, remat, **kw)
            for i, width in enumerate(widths)
        ])
        self.mid_block = MidBlock(widths[-1], groups, p.mid_block_attention, **kw)
        self.conv_norm_out = _norm(widths[-1], groups, kw)
        self.conv_out = layers.conv(widths[-1], 2 * p.latent_channels, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv_in(x)
        for level in self.down_blocks:
            h = level(h)
        return self.conv_out(nnx.silu(self.conv_norm_out(self.mid_block(h))))


class Decoder(nnx.Module):
    """Latents ``[B, H/f, W/f, latent_channels]`` -> images ``[B, H, W, C]`` in [-1, 1] (not clipped)."""

    def __init__(self, p: AutoencoderParameters, out_channels: int, remat: str, **kw: Any):
        widths, groups = list(reversed(p.block_out_channels)), p.norm_num_groups
        self.conv_in = layers.conv(p.latent_channels, widths[0], **kw)
        self.mid_block = MidBlock(widths[0], groups, p.mid_block_attention, **kw)
        self.up_blocks = nnx.List([
            Level(widths[max(i - 1, 0)], width, p.layers_per_block + 1, "up", i < len(widths) - 1, groups, remat, **kw)
            for i, width in enumerate(widths)
        ])
        self.conv_norm_out = _norm(widths[-1], groups, kw)
        self.conv_out = layers.conv(widths[-1], out_channels, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        h = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            h = level(h)
        return self.conv_out(nnx.silu(self.conv_norm_out(h)))


@register_model("autoencoder")
class Autoencoder(GenerativeModel):
    """SD-layout KL autoencoder: ``encode`` / ``decode`` in data space, ``example_losses``, ``sample``."""

    Parameters = AutoencoderParameters
    per_example_keys = True

    adversarial: ClassVar[type | None] = None  # set by workshop_dist.models.autoencoder_gan (imports one way)

    @classmethod
    def select_class(cls, config: ModelConfiguration) -> type:
        """This class, or with ``parameters.discriminator: true`` the adversarial one."""
        if config.parameters.get("discriminator"):
            if cls.adversarial is None:
                raise ConfigError("parameters.discriminator needs workshop_dist.models.autoencoder_gan imported")
            return cls.adversarial
        return cls

    def __init__(self, config: ModelConfiguration, *, rngs: nnx.Rngs):
        p: AutoencoderParameters = validate_parameters(type(self), config)
        if p.discriminator:
            raise ConfigError("Autoencoder has no discriminator: build it with create_model (AdversarialAutoencoder)")
        self.params_config = p
        self.image_shape = tuple(config.input_dim)
        if len(self.image_shape) != 3:
            raise ConfigError(f"autoencoder needs model.input_dim (H, W, C), got {list(self.image_shape)}")
        height, width, channels = self.image_shape
        self.factor = 2 ** (len(p.block_out_channels) - 1)
        if height % self.factor or width % self.factor:
            raise ConfigError(
                f"autoencoder: {len(p.block_out_channels)} levels shrink images by {self.factor}, but "
                f"{height}x{width} is not divisible by it: resize the data (data.image_size) or use fewer levels"
            )
        bad = [w for w in p.block_out_channels if w % p.norm_num_groups]
        if bad:
            raise ConfigError(
                f"autoencoder: block_out_channels {bad} are not divisible by norm_num_groups={p.norm_num_groups}"
            )
        self.latent_shape = (height // self.factor, width // self.factor, p.latent_channels)
        self.scaling_factor = p.scaling_factor
        self.max_value = config.data.max_value or 1.0  # a white pixel in data space
        self.levels = config.data.normalize == "levels"
        kw = {"rngs": rngs, **layers.dtypes(config)}
        self.encoder = Encoder(p, channels, config.remat, **kw)
        self.decoder = Decoder(p, channels, config.remat, **kw)
        z2 = 2 * p.latent_channels
        self.quant_conv = layers.conv(z2, z2, kernel=1, **kw) if p.use_quant_conv else None
        self.post_quant_conv = (
            layers.conv(p.latent_channels, p.latent_channels, kernel=1, **kw) if p.use_post_quant_conv else None
        )

    # --- the network's own pixel range, [-1, 1] ------------------------------------------------
    def to_network(self, images: jax.Array) -> jax.Array:
        """Data-space images -> the network's [-1, 1]."""
        return images.astype(jnp.float32) * (2.0 / self.max_value) - 1.0

    def to_data(self, x: jax.Array) -> jax.Array:
        """The network's [-1, 1] -> data space (not clipped)."""
        return (x.astype(jnp.float32) + 1.0) * (self.max_value / 2.0)

    def moments(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Network-range images -> ``(mean, logvar)`` ``[B, *latent_shape]`` (diffusers' ``encode``)."""
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode_network(self, latents: jax.Array) -> jax.Array:
        """Latents -> network-range images (diffusers' ``decode``)."""
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    # --- data space ----------------------------------------------------------------------------
    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Data-space images ``[B, H, W, C]`` -> the posterior's ``(mean, logvar)``, unscaled latents."""
        layers.check_images(images, self.image_shape)
        return self.moments(self.to_network(images))

    def decode(self, latents: jax.Array) -> jax.Array:
        """Unscaled latents ``[B, *latent_shape]`` -> data-space images (not clipped)."""
        return self.to_data(self.decode_network(latents))

    def reconstruct(
        self, batch: dict[str, jax.Array], rng: jax.Array | ExampleKeys
    ) -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
        """``(per-example losses, target, reconstruction)``, both images in [-1, 1]: one latent draw per example's key.

        ``loss`` = reconstruction (summed over pixels) + kl_weight * KL; ``mse`` per pixel in units of the data range.
        """
        images = batch["image"]
        layers.check_images(images, self.image_shape)
        target = self.to_network(images)
        mean, logvar = self.moments(target)
        eps = ExampleKeys.of(rng, images.shape[0]).normal(self.latent_shape, mean.dtype)
        reconstruction = self.decode_network(mean + jnp.exp(0.5 * logvar) * eps).astype(jnp.float32)
        error = reconstruction - target
        axes = tuple(range(1, error.ndim))
        summed = (jnp.abs(error) if self.params_config.reconstruction == "l1" else error**2).sum(axes)
        mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
        kl = 0.5 * (mean**2 + jnp.exp(logvar) - 1.0 - logvar).sum(axes)
        losses = {
            "loss": summed + self.params_config.kl_weight * kl,
            "reconstruction": summed,
            "kl": kl,
            "mse": ((0.5 * error) ** 2).mean(axes),
        }
        return losses, target, reconstruction

    def example_losses(
        self, batch: dict[str, jax.Array], rng: jax.Array | ExampleKeys, *, step: jax.Array | None = None,
        group: str | None = None,
    ) -> dict[str, jax.Array]:
        """Reconstruction (summed over pixels, in [-1, 1]) + kl_weight * KL, and their parts."""
        return self.reconstruct(batch, rng)[0]

    def sample(self, rng: jax.Array, num_samples: int, *, labels: jax.Array | None = None, **options: Any) -> jax.Array:
        """Decodes of prior draws z ~ N(0, I), clipped to the data range (levels rounded)."""
        z = jax.random.normal(rng, (num_samples, *self.latent_shape))
        images = jnp.clip(self.decode(z), 0.0, self.max_value)
        return jnp.round(images) if self.levels else images


def _norm(channels: int, groups: int, kw: dict[str, Any]) -> nnx.GroupNorm:
    return layers.group_norm(channels, groups=groups, epsilon=1e-6, fast_variance=False, **kw)
