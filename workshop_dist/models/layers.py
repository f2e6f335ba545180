"""The layer kit every model family builds from: logical axis names, zero-init, compute and storage dtypes.

Every parameter carries logical axis names (``nnx.with_partitioning(..., eager_sharding=False)``):
models are built before the mesh is known, and :mod:`workshop_dist.parallel` places parameters
from these names. ``dtype`` is the compute dtype (``None``: whatever the inputs and parameters
promote to, float32 by default) and ``param_dtype`` the storage dtype of the parameters; both
come from the :class:`~workshop_dist.models.config.ModelConfiguration` through :func:`dtypes`,
so a model computes in the dtype it was built with (nothing patches it afterwards).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from workshop_dist.config import ConfigError

Axes = Sequence[str | None]
CONV_AXES = ("spatial", "spatial", "conv_in", "conv_out")


def dtypes(config: Any) -> dict[str, Any]:
    """``{"dtype": compute, "param_dtype": storage}`` for the kit's layers, from ``model.dtype`` / ``model.param_dtype``."""
    compute = getattr(config, "dtype", "float32")
    return {
        "dtype": None if compute == "float32" else jnp.dtype(compute),
        "param_dtype": jnp.dtype(getattr(config, "param_dtype", "float32")),
    }


def named(init: Any, axes: Axes) -> Any:
    """``init`` with logical axis names (no eager sharding: the mesh comes later)."""
    return nnx.with_partitioning(init, tuple(axes), eager_sharding=False)


def _kernel_init(zero: bool) -> Any:
    return nnx.initializers.zeros_init() if zero else nnx.initializers.lecun_normal()


def param(
    shape: Sequence[int], axes: Axes, *, rngs: nnx.Rngs, init: Any = None, param_dtype: Any = jnp.float32
) -> nnx.Param:
    """A bare parameter (masked kernels, per-channel scales) with logical axes; lecun-normal by default."""
    init = init or nnx.initializers.lecun_normal()
    return nnx.Param(named(init, axes)(rngs.params(), tuple(shape), param_dtype))


def dense(
    in_features: int,
    out_features: int,
    axes: tuple[str | None, str | None],
    *,
    rngs: nnx.Rngs,
    zero: bool = False,
    use_bias: bool = True,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
) -> nnx.Linear:
    """Linear layer: kernel axes ``axes`` (in, out), bias axis ``axes[1]``; ``zero`` starts it at output 0."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=named(_kernel_init(zero), axes),
        bias_init=named(nnx.initializers.zeros_init(), (axes[1],)),
        rngs=rngs,
    )


def conv(
    in_features: int,
    out_features: int,
    *,
    rngs: nnx.Rngs,
    kernel: int = 3,
    strides: int = 1,
    transpose: bool = False,
    zero: bool = False,
    padding: str | Sequence[tuple[int, int]] = "SAME",
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
) -> nnx.Conv | nnx.ConvTranspose:
    """Square ``kernel`` x ``kernel`` convolution (or transposed convolution) with (spatial, spatial, in, out) axes.

    ``padding``: ``"SAME"``, ``"VALID"`` or explicit ``((top, bottom), (left, right))`` (PyTorch-style asymmetric pads).
    """
    layer = nnx.ConvTranspose if transpose else nnx.Conv
    return layer(
        in_features,
        out_features,
        kernel_size=(kernel, kernel),
        strides=(strides, strides),
        padding=padding,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=named(_kernel_init(zero), CONV_AXES),
        bias_init=named(nnx.initializers.zeros_init(), ("conv_out",)),
        rngs=rngs,
    )


def embed(
    num_embeddings: int,
    features: int,
    *,
    rngs: nnx.Rngs,
    stddev: float | None = None,
    axes: tuple[str | None, str | None] = ("vocab", "embed"),
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
) -> nnx.Embed:
    """Embedding table ``[num_embeddings, features]``; ``stddev`` None keeps NNX's default initialiser."""
    init = nnx.initializers.normal(stddev) if stddev is not None else nnx.initializers.variance_scaling(
        1.0, "fan_in", "normal", out_axis=0
    )
    return nnx.Embed(
        num_embeddings, features, dtype=dtype, param_dtype=param_dtype, embedding_init=named(init, axes), rngs=rngs
    )


def group_norm(
    features: int,
    *,
    rngs: nnx.Rngs,
    groups: int | None = None,
    epsilon: float = 1e-6,
    fast_variance: bool = True,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
) -> nnx.GroupNorm:
    """GroupNorm with ``groups`` groups (default: the largest of 8/4/2/1 that divides ``features``).

    ``fast_variance=False`` computes the variance as ``E[(x - mean)^2]`` (PyTorch's way), not
    ``E[x^2] - mean^2``: ports of PyTorch networks use it to match their originals closely.
    """
    if groups is None:
        groups = next(g for g in (8, 4, 2, 1) if features % g == 0)
    elif features % groups:
        raise ConfigError(f"GroupNorm: {features} channels are not divisible by {groups} groups")
    return nnx.GroupNorm(
        features,
        num_groups=groups,
        epsilon=epsilon,
        use_fast_variance=fast_variance,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=named(nnx.initializers.ones_init(), ("norm",)),
        bias_init=named(nnx.initializers.zeros_init(), ("norm",)),
        rngs=rngs,
    )


def layer_norm(features: int, *, rngs: nnx.Rngs, dtype: Any = None, param_dtype: Any = jnp.float32) -> nnx.LayerNorm:
    """LayerNorm without affine parameters (adaLN and similar supply shift and scale)."""
    return nnx.LayerNorm(
        features, epsilon=1e-6, use_scale=False, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )


def check_images(images: jax.Array, shape: Sequence[int]) -> None:
    """Raise a ConfigError unless a batch of images ``[B, *shape]`` fits the model's ``input_dim``."""
    if tuple(images.shape[1:]) != tuple(shape):
        raise ConfigError(
            f"batch images have shape {tuple(images.shape[1:])}, but the model was built for "
            f"model.input_dim={list(shape)}: set model.input_dim to the data's image shape"
        )


def compute_dtypes(model: nnx.Module) -> set[Any]:
    """The compute dtypes of a built model's layers (``None``: promoted from inputs and params)."""
    return {
        None if node.dtype is None else jnp.dtype(node.dtype)
        for _, node in nnx.iter_graph(model)
        if isinstance(node, nnx.Module) and hasattr(node, "dtype") and hasattr(node, "param_dtype")
    }


def check_compute_dtype(model: nnx.Module, dtype: Any) -> None:
    """A built model computes in the dtype it was built with: fail clearly if that is not ``dtype``."""
    wanted = jnp.dtype(dtype)
    found = compute_dtypes(model)
    if found != {wanted}:
        shown = sorted("float32" if d is None else str(d) for d in found) or ["no dtype-aware layers"]
        raise ConfigError(
            f"{type(model).__name__} was built to compute in {', '.join(shown)}, not {wanted}: a built model "
            f"computes in the dtype it was built with. Build it with ModelConfiguration(dtype='{wanted}') "
            "(model.dtype in a config file), or pass the ModelConfiguration itself to the Trainer."
        )
