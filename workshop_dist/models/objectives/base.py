"""The interface every objective shares, and the pieces they have in common.

An objective (flow matching, EDM, ...) is pure maths around a *network*
``network(x, t, labels) -> out``: ``x`` is ``[B, ...]`` in model space, ``t`` holds one
conditioning value per example (``[B]``; the objective decides what it is: flow time in
[0, 1], EDM's ``c_noise = log(sigma) / 4``), ``labels`` is ``[B]`` int32 or None, and ``out``
has ``x``'s shape. Class ``num_classes`` is the "null" label (label dropout, the unconditional
branch of classifier-free guidance), so a conditional network embeds ``num_classes + 1``
classes.

Randomness comes as one key per example (typed ``key<...>`` of shape ``[B]`` or raw
``uint32[B, 2]``); every draw of an example comes from its own key under ``jax.vmap``, so an
example's loss or sample does not depend on which batch it is in.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import pydantic

from workshop_dist.config import StrictConfig
from workshop_dist.models import samplers as sampling

Network = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]


class Samples(NamedTuple):
    """What ``Objective.sample`` returns: the samples and the network evaluations per example."""

    x: jax.Array
    nfe: jax.Array  # int32 [B]: guided evaluations (each one network call, on 2B inputs when guided)


class ConditioningConfig(StrictConfig):
    """Class conditioning, label dropout and classifier-free guidance (shared by the objectives)."""

    num_classes: int | None = pydantic.Field(None, ge=0, description="Classes to condition on (0/null: none).")
    label_dropout: float = pydantic.Field(
        0.1, ge=0, le=1, description="Fraction of training labels replaced by the null label (for guidance)."
    )
    guidance_scale: float = pydantic.Field(
        1.0, description="Classifier-free guidance: 0 unconditional, 1 conditional, >1 guided."
    )
    guidance_interval: tuple[float, float] | None = pydantic.Field(
        None,
        description="Guide only where the noise level (flow time t, or EDM sigma) lies in [low, high] "
        "(Kynkaenniemi et al., 2024); elsewhere conditional. null: everywhere.",
    )

    @pydantic.field_validator("guidance_interval")
    @classmethod
    def _ordered(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0 <= value[0] < value[1]:
            raise ValueError(f"guidance_interval must be [low, high] with 0 <= low < high, got {list(value)}")
        return value


def as_keys(keys: jax.Array, batch_size: int | None = None) -> jax.Array:
    """Typed keys ``[B]`` from typed ``[B]`` or raw ``uint32[B, 2]`` keys (same draws either way)."""
    if not jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
        keys = jax.random.wrap_key_data(keys)
    if keys.ndim != 1:
        raise ValueError(f"expected one key per example (shape [B]), got keys of shape {keys.shape}")
    if batch_size is not None and keys.shape[0] != batch_size:
        raise ValueError(f"got {keys.shape[0]} keys for {batch_size} examples; pass one key per example")
    return keys


def split_per_example(keys: jax.Array, num: int) -> jax.Array:
    """``[B]`` keys -> ``[num, B]``: independent streams for each example."""
    return jax.vmap(lambda k: jax.random.split(k, num), out_axes=1)(keys)


def normal_per_example(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``[B, *shape]`` standard normals, example b drawn from ``keys[b]`` alone."""
    return jax.vmap(lambda k: jax.random.normal(k, shape))(keys)


def uniform_per_example(keys: jax.Array) -> jax.Array:
    return jax.vmap(lambda k: jax.random.uniform(k))(keys)


def right_broadcast(a: jax.Array, x: jax.Array) -> jax.Array:
    """``[B]`` -> ``[B, 1, ..., 1]`` to broadcast against ``x``."""
    a = jnp.asarray(a)
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def mean_per_example(a: jax.Array) -> jax.Array:
    return a.reshape(a.shape[0], -1).mean(-1)


class Conditioning:
    """Labels for training (dropout) and guided predictions for sampling, for one config."""

    def __init__(self, config: ConditioningConfig):
        self.config = config
        self.num_classes = config.num_classes or 0

    def training_labels(self, labels: jax.Array | None, keys: jax.Array, batch_size: int) -> jax.Array | None:
        """Labels with ``label_dropout`` of them (per example, from its key) set to the null class."""
        if not self.num_classes:
            return None
        if labels is None:
            return jnp.full((batch_size,), self.num_classes, jnp.int32)
        labels = labels.astype(jnp.int32)
        if self.config.label_dropout > 0:
            drop = jax.vmap(lambda k: jax.random.bernoulli(k, self.config.label_dropout))(keys)
            labels = jnp.where(drop, self.num_classes, labels)
        return labels

    def sampling_labels(self, labels: jax.Array | None, batch_size: int) -> jax.Array | None:
        if not self.num_classes:
            return None
        if labels is None:
            return jnp.full((batch_size,), self.num_classes, jnp.int32)
        return labels.astype(jnp.int32)

    def guided(
        self, predict: Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array],
        x: jax.Array, level: jax.Array, labels: jax.Array | None, guidance_scale: float | None,
    ) -> jax.Array:
        """``uncond + w * (cond - uncond)`` of ``predict(x, level, labels)`` (any linear view of the output).

        Both branches run in one call on ``2B`` inputs; ``level`` ([B]: t or sigma) outside
        ``guidance_interval`` gets the conditional prediction. Without classes, labels or with
        ``w == 1`` (a Python number) it is one plain call; ``w`` may also be a traced scalar.
        """
        scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        plain = isinstance(scale, int | float) and scale == 1.0  # a traced scale always runs both branches
        if not self.num_classes or labels is None or plain:
            return predict(x, level, labels)
        null = jnp.full_like(labels, self.num_classes)
        both = predict(
            jnp.concatenate([x, x]), jnp.concatenate([level, level]), jnp.concatenate([labels, null])
        )
        cond, uncond = jnp.split(both, 2)
        guided = uncond + scale * (cond - uncond)
        if self.config.guidance_interval is None:
            return guided
        low, high = self.config.guidance_interval
        inside = (level >= low) & (level <= high)
        return jnp.where(right_broadcast(inside, x), guided, cond)


class Objective(abc.ABC):
    """A training objective over ``network(x, t, labels)`` with the views samplers need.

    Subclasses set ``Config`` (their validated :class:`StrictConfig`) and ``samplers`` (the
    names ``sample`` accepts). ``level`` below is the objective's own noise coordinate:
    flow time ``t`` (1 = noise) or EDM's ``sigma``.
    """

    Config: ClassVar[type[ConditioningConfig]]
    samplers: ClassVar[tuple[str, ...]]

    def __init__(self, config: ConditioningConfig | dict[str, Any] | None = None):
        if config is None:
            config = self.Config()
        elif isinstance(config, dict):
            config = self.Config.from_dict(config)
        elif not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} takes a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config
        self.conditioning = Conditioning(config)

    @abc.abstractmethod
    def example_losses(
        self, network: Network, x: jax.Array, keys: jax.Array, labels: jax.Array | None = None
    ) -> dict[str, jax.Array]:
        """Per-example (``[B]``) training loss ``"loss"`` and metrics; noise/levels drawn from ``keys``."""

    @abc.abstractmethod
    def denoise(
        self, network: Network, x: jax.Array, level: jax.Array, labels: jax.Array | None = None,
        *, guidance_scale: float | None = None,
    ) -> jax.Array:
        """The (guided) estimate of the clean data ``E[x_0 | x_level]``; ``level`` is ``[B]``."""

    @abc.abstractmethod
    def ode_velocity(
        self, network: Network, x: jax.Array, level: jax.Array, labels: jax.Array | None = None,
        *, guidance_scale: float | None = None,
    ) -> jax.Array:
        """``dx / d level`` of the probability-flow ODE (what the ODE samplers integrate)."""

    @abc.abstractmethod
    def sample(
        self, network: Network, keys: jax.Array, example_shape: tuple[int, ...], labels: jax.Array | None = None,
        *, sampler: str | None = None, steps: int | None = None, guidance_scale: float | None = None,
    ) -> Samples:
        """Samples ``[B, *example_shape]`` from noise drawn from ``keys`` (one per sample); jit-able."""

    def network_evaluations(self, sampler: str | None = None, steps: int | None = None) -> int | None:
        """Guided evaluations of ``sample`` for a fixed-step sampler (None: adaptive, see ``Samples.nfe``)."""
        name, steps = self._sampler_and_steps(sampler, steps)
        kind = self._sampler_kinds.get(name)
        return None if kind is None else sampling.network_evaluations(kind, steps)

    _sampler_kinds: ClassVar[dict[str, str]]

    def _sampler_and_steps(self, sampler: str | None, steps: int | None) -> tuple[str, int]:
        name = sampler or self.config.sampler  # type: ignore[attr-defined]
        if name not in self.samplers:
            raise ValueError(f"{type(self).__name__}: unknown sampler {name!r}; choose one of {list(self.samplers)}")
        steps = self.config.sampling_steps if steps is None else steps  # type: ignore[attr-defined]
        if steps < 1:
            raise ValueError(f"sampling steps must be >= 1, got {steps}")
        return name, steps
