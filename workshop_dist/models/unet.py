"""The DDPM U-Net (Ho et al., 2020), small enough for 8x8 digits on a CPU.

Residual blocks with a time (and class) embedding added after the first convolution, one
stride-2 downsampling between resolution levels, self-attention at the lowest resolution,
and skip connections concatenated on the way up. The objective is ``parameters.objective``:
DDPM/VDM (:mod:`workshop_dist.models.diffusion`), flow matching or EDM
(:mod:`workshop_dist.models.objective_model`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import pydantic
from flax import nnx

from workshop_dist.config import ConfigError, StrictConfig
from workshop_dist.models import layers
from workshop_dist.models.diffusion import (
    DiffusionParameters,
    register_backbone,
    remat_policy,
    timestep_embedding,
)
from workshop_dist.models.layers import conv, dense, group_norm


class UNetNetworkParameters(StrictConfig):
    """The U-Net's sizes."""

    widths: list[int] = pydantic.Field([32, 64], min_length=1, description="Channels per resolution level.")
    num_res_blocks: int = pydantic.Field(1, ge=1, description="Residual blocks per level (down path).")
    attention_heads: int = pydantic.Field(4, ge=1, description="Heads of the lowest-resolution attention.")


class UNetParameters(DiffusionParameters, UNetNetworkParameters):
    """The diffusion options plus the U-Net's sizes."""


class ResBlock(nnx.Module):
    """GroupNorm-swish-conv twice, time embedding added in between; the second conv starts at 0."""

    def __init__(self, in_features: int, out_features: int, embed_dim: int, **kw: Any):
        self.norm1 = group_norm(in_features, **kw)
        self.conv1 = conv(in_features, out_features, **kw)
        self.embed = dense(embed_dim, out_features, ("embed", "mlp"), **kw)
        self.norm2 = group_norm(out_features, **kw)
        self.conv2 = conv(out_features, out_features, zero=True, **kw)
        self.skip = conv(in_features, out_features, kernel=1, **kw) if in_features != out_features else None

    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        h = self.conv1(nnx.swish(self.norm1(x)))
        h = h + self.embed(nnx.swish(emb))[:, None, None, :]
        h = self.conv2(nnx.swish(self.norm2(h)))
        return h + (self.skip(x) if self.skip is not None else x)


class Attention(nnx.Module):
    """Multi-head self-attention over the pixels of a feature map (residual, output starts at 0).

    Used in the middle of the U-Net, i.e. at the lowest resolution only, where it is cheap.
    """

    def __init__(self, features: int, heads: int, **kw: Any):
        if features % heads:
            raise ConfigError(f"ddpm_unet: attention width {features} is not divisible by {heads} heads")
        self.heads = heads
        self.norm = group_norm(features, **kw)
        # the key projection has no bias: softmax is invariant to it (its gradient is exactly zero)
        self.qkv = nnx.List(
            [dense(features, features, ("embed", "heads"), use_bias=name != "key", **kw) for name in ("query", "key", "value")]
        )
        self.out = dense(features, features, ("heads", "embed"), zero=True, **kw)

    def __call__(self, x: jax.Array, emb: jax.Array | None = None) -> jax.Array:
        batch, height, width, features = x.shape
        h = self.norm(x).reshape(batch, height * width, features)
        q, k, v = (layer(h).reshape(batch, height * width, self.heads, -1) for layer in self.qkv)
        attended = jax.nn.dot_product_attention(q, k, v).reshape(batch, height * width, features)
        return x + self.out(attended).reshape(x.shape)


class UNet(nnx.Module):
    """``(z, t, labels) -> out``: the denoising network."""

    def __init__(self, hp: UNetNetworkParameters, channels: int, out_features: int, num_classes: int, remat: str, **kw: Any):
        widths, base = hp.widths, hp.widths[0]
        self.embed_dim = embed = 4 * base
        self.remat = remat
        self.time = nnx.List([dense(base, embed, ("embed", "mlp"), **kw), dense(embed, embed, ("mlp", "embed"), **kw)])
        self.classes = layers.embed(num_classes + 1, embed, **kw) if num_classes else None
        self.stem = conv(channels, base, **kw)
        down: list[nnx.Module] = []
        skips, width = [base], base
        for level, out in enumerate(widths):
            for _ in range(hp.num_res_blocks):
                down.append(ResBlock(width, out, embed, **kw))
                width = out
                skips.append(width)
            if level < len(widths) - 1:
                down.append(conv(width, width, strides=2, **kw))
                skips.append(width)
        self.down = nnx.List(down)
        self.middle = nnx.List(
            [ResBlock(width, width, embed, **kw), Attention(width, hp.attention_heads, **kw), ResBlock(width, width, embed, **kw)]
        )
        up: list[nnx.Module] = []
        for level, out in reversed(list(enumerate(widths))):
            for _ in range(hp.num_res_blocks + 1):
                up.append(ResBlock(width + skips.pop(), out, embed, **kw))
                width = out
            if level > 0:
                up.append(conv(width, width, **kw))  # after nearest-neighbour upsampling
        self.up = nnx.List(up)
        self.head_norm = group_norm(width, **kw)
        self.head = conv(width, out_features, zero=True, **kw)

    def _block(self, block: nnx.Module, h: jax.Array, emb: jax.Array) -> jax.Array:
        wrap = remat_policy(self.remat)
        return wrap(lambda b, x, e: b(x, e))(block, h, emb) if wrap else block(h, emb)

    def __call__(self, z: jax.Array, t: jax.Array, labels: jax.Array | None) -> jax.Array:
        emb = self.time[1](nnx.swish(self.time[0](timestep_embedding(t, self.time[0].in_features))))
        if self.classes is not None:
            emb = emb + self.classes(labels)
        h = self.stem(z)
        skips = [h]
        for layer in self.down:
            h = self._block(layer, h, emb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        for layer in self.middle:
            h = self._block(layer, h, emb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = self._block(layer, jnp.concatenate([h, skips.pop()], axis=-1), emb)
            else:
                h = layer(jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2))
        return self.head(nnx.swish(self.head_norm(h)))


def build_unet(hp: UNetNetworkParameters, image_shape: tuple[int, ...], out_features: int, num_classes: int,
               remat: str, **kw: Any) -> UNet:
    """The U-Net for ``image_shape`` (H, W, C), after checking that its levels halve the image evenly."""
    height, width, channels = image_shape
    factor = 2 ** (len(hp.widths) - 1)
    if height % factor or width % factor:
        raise ConfigError(
            f"ddpm_unet: {len(hp.widths)} widths halve the image {len(hp.widths) - 1} times, "
            f"but {height}x{width} is not divisible by {factor}; use fewer widths"
        )
    return UNet(hp, channels, out_features, num_classes, remat, **kw)


DDPMUNet = register_backbone("ddpm_unet", UNetParameters, UNetNetworkParameters, build_unet)
