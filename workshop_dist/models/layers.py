"""Layer constructors whose parameters carry logical axis names for the sharding layer.

Eager sharding is off (``eager_sharding=False``): models are built before the mesh is known,
and the trainer places parameters from these names (see :mod:`workshop_dist.parallel`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from flax import nnx


def _named(init, axes: Sequence[str | None]):
    return nnx.with_partitioning(init, tuple(axes), eager_sharding=False)


def dense(
    in_features: int, out_features: int, axes: tuple[str, str], *, rngs: nnx.Rngs, param_dtype: Any = jnp.float32
) -> nnx.Linear:
    """Linear layer with kernel axes ``axes`` (in, out) and bias axis ``axes[1]``."""
    return nnx.Linear(
        in_features,
        out_features,
        kernel_init=_named(nnx.initializers.lecun_normal(), axes),
        bias_init=_named(nnx.initializers.zeros_init(), (axes[1],)),
        param_dtype=param_dtype,
        rngs=rngs,
    )


def conv(in_features: int, out_features: int, *, strides: int = 1, transpose: bool = False, rngs: nnx.Rngs):
    """3x3 SAME convolution (or transposed convolution) with (spatial, spatial, in, out) kernel axes."""
    layer = nnx.ConvTranspose if transpose else nnx.Conv
    return layer(
        in_features,
        out_features,
        kernel_size=(3, 3),
        strides=(strides, strides),
        padding="SAME",
        kernel_init=_named(nnx.initializers.lecun_normal(), ("spatial", "spatial", "conv_in", "conv_out")),
        bias_init=_named(nnx.initializers.zeros_init(), ("conv_out",)),
        rngs=rngs,
    )
