"""Small shared pieces for tests: the digits arrays and tiny configs."""

from __future__ import annotations

import numpy as np

from workshop_dist.data.digits import load_digits_split
from workshop_dist.models import ModelConfiguration


def digits_images(split: str = "train") -> np.ndarray:
    """Digits as float32 [N, 8, 8, 1] in [0, 1]."""
    return load_digits_split(split)["image"].astype(np.float32) / 16.0


def tiny_model_config(**overrides) -> ModelConfiguration:
    return ModelConfiguration(**{"hidden_dims": [64, 32], "output_dim": 8, **overrides})


import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402


class QuadraticModel(nnx.Module):
    """loss = mean_i ||x_i - w||^2, no randomness: tests can compute exact expected values."""

    def __init__(self, config: ModelConfiguration, *, rngs: nnx.Rngs):
        self.shape = tuple(config.input_dim)
        self.w = nnx.Param(jnp.full(self.shape, 0.25))

    def loss(self, batch, rng):
        x = batch["image"]
        per_example = ((x - self.w[...]) ** 2).reshape(x.shape[0], -1).sum(-1)
        return per_example.mean(), {"squared_error": per_example.mean()}

    def sample(self, rng, num_samples):
        return jnp.broadcast_to(self.w[...], (num_samples, *self.shape))
