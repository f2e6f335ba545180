"""Gated PixelCNN (van den Oord et al., 2016, "Conditional Image Generation with PixelCNN Decoders").

An exact autoregressive likelihood over discrete pixel levels: p(x) = prod_i p(x_i | x_<i) in
raster order, each factor a categorical over ``num_levels`` values. Two stacks of masked
convolutions remove the blind spot of a plain masked stack: the vertical stack sees the rows
above a pixel, the horizontal stack the pixels to its left in its row (and the vertical stack's
features). Optionally class-conditional (a per-layer label embedding added to the gates).

Batches hold integer levels (``data.normalize: levels``); ``sample`` returns levels as floats.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pydantic
from flax import nnx

from workshop_dist.config import ConfigError
from workshop_dist.models import layers
from workshop_dist.models.base import GenerativeModel
from workshop_dist.models.config import LevelsParameters, ModelConfiguration, data_levels
from workshop_dist.models.keys import ExampleKeys
from workshop_dist.models.registry import register_model, validate_parameters


class PixelCNNParameters(LevelsParameters):
    channels: int = pydantic.Field(64, ge=1, description="Feature channels of each gated layer.")
    num_layers: int = pydantic.Field(6, ge=1, description="Gated layers (the first is the causal 'A' layer).")
    kernel_size: int = pydantic.Field(5, ge=3, description="Odd kernel width of the masked convolutions.")
    output_channels: int = pydantic.Field(128, ge=1, description="Width of the 1x1 output head.")
    num_classes: int = pydantic.Field(0, ge=0, description="Label classes for conditioning (0: unconditional).")
    dropout: float = pydantic.Field(0.0, ge=0, lt=1, description="Dropout on gated features in training mode.")

    @pydantic.field_validator("kernel_size")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {value}")
        return value


def _mask(kind: str, height: int, width: int) -> np.ndarray:
    """Which kernel taps a causal convolution may use.

    Kernels hold only the taps a stack can ever use, and the output pixel sits at the kernel's
    last row (vertical) or last column (horizontal), see :meth:`MaskedConv.__call__`.
    ``vertical_a``: the rows strictly above; ``vertical_b``: those and the pixel's own row (its
    input already depends only on the rows above); ``horizontal_a``: pixels strictly to the left
    in the same row; ``horizontal_b``: those and the pixel itself.
    """
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    allowed = {
        "vertical_a": rows < height - 1,
        "vertical_b": rows <= height - 1,
        "horizontal_a": cols < width - 1,
        "horizontal_b": cols <= width - 1,
    }[kind]
    return allowed.astype(np.float32)


class MaskedConv(nnx.Module):
    """Causal convolution: a ``(k//2+1, k)`` (vertical) or ``(1, k//2+1)`` (horizontal) kernel, padded
    so that it covers only rows above / pixels to the left, times a static mask (see :func:`_mask`)."""

    def __init__(
        self, in_features: int, out_features: int, kernel_size: int, kind: str, *, rngs: nnx.Rngs,
        dtype: Any = None, param_dtype: Any = jnp.float32,
    ):
        self.kind = kind
        half = kernel_size // 2
        vertical = kind.startswith("vertical")
        self.kernel_shape = (half + 1, kernel_size) if vertical else (1, half + 1)
        self.padding = ((half, 0), (half, half)) if vertical else ((0, 0), (half, 0))
        self.dtype, self.param_dtype = dtype, param_dtype
        shape = (*self.kernel_shape, in_features, out_features)
        self.kernel = layers.param(shape, layers.CONV_AXES, rngs=rngs, param_dtype=param_dtype)
        zeros = nnx.initializers.zeros_init()
        self.bias = layers.param((out_features,), ("conv_out",), rngs=rngs, init=zeros, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.dtype is not None:
            x = x.astype(self.dtype)
        mask = jnp.asarray(_mask(self.kind, *self.kernel_shape))[:, :, None, None]
        kernel = self.kernel[...] * mask
        out = jax.lax.conv_general_dilated(
            x, kernel.astype(x.dtype), (1, 1), self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return out + self.bias[...].astype(x.dtype)


class GatedLayer(nnx.Module):
    """One gated layer: vertical and horizontal stacks, v->h link, residual on the horizontal stack."""

    def __init__(self, in_features: int, channels: int, kernel_size: int, first: bool, num_classes: int, **kw: Any):
        suffix = "a" if first else "b"
        self.first = first
        self.vertical = MaskedConv(in_features, 2 * channels, kernel_size, f"vertical_{suffix}", **kw)
        self.horizontal = MaskedConv(in_features, 2 * channels, kernel_size, f"horizontal_{suffix}", **kw)
        self.v_to_h = layers.dense(2 * channels, 2 * channels, ("embed", "mlp"), **kw)
        self.h_out = layers.dense(channels, channels, ("mlp", "embed"), **kw)
        self.embed = layers.embed(num_classes, 4 * channels, stddev=0.02, **kw) if num_classes else None

    def __call__(
        self, v: jax.Array, h: jax.Array, labels: jax.Array | None, drop: tuple[float, ExampleKeys] | None
    ) -> tuple[jax.Array, jax.Array]:
        v_pre = self.vertical(v)
        h_pre = self.horizontal(h) + self.v_to_h(v_pre)
        if self.embed is not None:
            if labels is None:
                raise ValueError("this PixelCNN is class-conditional: pass batch['label'] / labels")
            cond = self.embed(labels)[:, None, None, :]
            cv, ch = jnp.split(cond, 2, axis=-1)
            v_pre, h_pre = v_pre + cv, h_pre + ch
        v_out = _gate(v_pre)
        gated = _gate(h_pre)
        if drop is not None:
            rate, keys = drop  # each example's dropout mask from its own key
            keep = keys.bernoulli(1.0 - rate, gated.shape[1:])
            gated = jnp.where(keep, gated / (1.0 - rate), 0.0)
        h_new = self.h_out(gated)
        return v_out, h_new if self.first else h + h_new


def _gate(x: jax.Array) -> jax.Array:
    a, b = jnp.split(x, 2, axis=-1)
    return jnp.tanh(a) * jax.nn.sigmoid(b)


@register_model("pixelcnn")
class PixelCNN(GenerativeModel):
    """Gated PixelCNN over single-channel images of integer levels (``input_dim`` = (H, W, 1)).

    ``config.hidden_dims`` and ``output_dim`` are unused; sizes live in ``parameters``.
    Dropout (``parameters.dropout``) acts only in training mode (``model.train()``, the NNX
    ``deterministic`` attribute) and never in :meth:`nll` or :meth:`sample`.
    """

    Parameters = PixelCNNParameters
    per_example_keys = True

    def __init__(self, config: ModelConfiguration, *, rngs: nnx.Rngs):
        self.params_config: PixelCNNParameters = validate_parameters(type(self), config)
        p = self.params_config
        self.image_shape = tuple(config.input_dim)
        if len(self.image_shape) != 3 or self.image_shape[2] != 1:
            raise ConfigError(f"pixelcnn models single-channel images (H, W, 1), got input_dim {self.image_shape}")
        self.num_levels = data_levels(config, p, "pixelcnn")
        self.num_classes = p.num_classes
        self.deterministic = False
        kw = {"rngs": rngs, **layers.dtypes(config)}
        self.layers = nnx.List(
            [
                GatedLayer(1 if i == 0 else p.channels, p.channels, p.kernel_size, i == 0, p.num_classes, **kw)
                for i in range(p.num_layers)
            ]
        )
        self.head = layers.dense(p.channels, p.output_channels, ("embed", "mlp"), **kw)
        self.logits_out = layers.dense(p.output_channels, self.num_levels, ("mlp", "vocab"), **kw)

    def logits(
        self, x: jax.Array, labels: jax.Array | None = None, rng: jax.Array | ExampleKeys | None = None
    ) -> jax.Array:
        """``[B, H, W, 1]`` levels (any float, for gradient checks) -> ``[B, H, W, num_levels]`` logits.

        The logits at a pixel depend only on the pixels before it in raster order. ``rng``
        enables dropout (only when the model is in training mode), one mask per example's key.
        """
        h = v = 2.0 * x.astype(jnp.float32) / (self.num_levels - 1) - 1.0
        rate = self.params_config.dropout
        use_dropout = rng is not None and rate > 0 and not self.deterministic
        keys = ExampleKeys.of(rng, x.shape[0]) if use_dropout else None
        for index, layer in enumerate(self.layers):
            drop = (rate, keys.fold_in(index)) if keys is not None else None
            v, h = layer(v, h, labels, drop)
        return self.logits_out(nnx.relu(self.head(nnx.relu(h))))

    def log_prob(self, batch: dict[str, jax.Array], rng: jax.Array | ExampleKeys | None = None) -> jax.Array:
        """Exact ``log p(x)`` in nats per image, ``[B]``."""
        x = batch["image"]
        layers.check_images(x, self.image_shape)
        levels = jnp.clip(jnp.round(x.astype(jnp.float32)), 0, self.num_levels - 1).astype(jnp.int32)
        labels = batch.get("label") if self.num_classes else None
        log_probs = jax.nn.log_softmax(self.logits(levels, labels, rng), axis=-1)
        picked = jnp.take_along_axis(log_probs, levels[..., 0][..., None], axis=-1)
        return picked.reshape(x.shape[0], -1).sum(-1)

    def example_losses(
        self, batch: dict[str, jax.Array], rng: jax.Array | ExampleKeys, *, step: jax.Array | None = None,
        group: str | None = None,
    ) -> dict[str, jax.Array]:
        """Per-example exact NLL (nats per image) and bits per dimension."""
        nll = -self.log_prob(batch, rng)
        return {"loss": nll, "bits_per_dim": nll / (math.prod(self.image_shape) * math.log(2.0))}

    def nll(self, batch: dict[str, jax.Array], rng: jax.Array, **options: Any) -> jax.Array:
        """The exact negative log-likelihood in nats per image (no dropout), ``[B]``."""
        return -self.log_prob(batch)

    def sample(self, rng: jax.Array, num_samples: int, *, labels: jax.Array | None = None, **options: Any) -> jax.Array:
        """Ancestral sampling, one pixel per network pass: ``[N, H, W, 1]`` levels as floats.

        ``temperature`` (option, default 1) divides the logits. A conditional model without
        ``labels`` cycles through the classes.
        """
        temperature = options.get("temperature", 1.0)
        height, width, _ = self.image_shape
        if self.num_classes and labels is None:
            labels = jnp.arange(num_samples) % self.num_classes
        elif not self.num_classes:
            labels = None

        def body(index: jax.Array, image: jax.Array) -> jax.Array:
            row, col = index // width, index % width
            logits = self.logits(image, labels)[:, row, col, :] / temperature
            value = jax.random.categorical(jax.random.fold_in(rng, index), logits)
            return image.at[:, row, col, 0].set(value.astype(image.dtype))

        image = jnp.zeros((num_samples, *self.image_shape), jnp.float32)
        return jax.lax.fori_loop(0, height * width, body, image)
