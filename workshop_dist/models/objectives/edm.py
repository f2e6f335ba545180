"""EDM: preconditioned denoising (Karras et al., 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models").

Noisy data ``x_sigma = x + sigma eps`` (variance exploding); the denoiser is the network
wrapped in EDM's preconditioning,

    D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma), labels),
    c_skip = sd^2 / (sigma^2 + sd^2),   c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2),    c_noise = log(sigma) / 4,

(``sd`` = ``sigma_data``), so the network's input and its effective target have unit
variance at every noise level. Training draws ``log sigma ~ N(P_mean, P_std^2)`` and weights
the denoising MSE by ``lambda = (sigma^2 + sd^2) / (sigma sd)^2 = 1 / c_out^2``, which makes
it the plain MSE of ``F`` against its effective target. Sampling integrates
``dx/dsigma = (x - D) / sigma`` from ``sigma_max`` down to 0 on the rho schedule.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import jax
import jax.numpy as jnp
import pydantic

from workshop_dist.models import samplers
from workshop_dist.models.objectives import base


class EDMConfig(base.ConditioningConfig):
    """Preconditioning, training noise levels and the sampler's schedule (EDM's defaults)."""

    sigma_data: float = pydantic.Field(0.5, gt=0, description="Standard deviation of the data (EDM's sigma_data).")
    p_mean: float = pydantic.Field(-1.2, description="Mean of log sigma in training (EDM's P_mean).")
    p_std: float = pydantic.Field(1.2, gt=0, description="Standard deviation of log sigma in training (P_std).")
    sigma_min: float = pydantic.Field(0.002, gt=0, description="Lowest noise level of the sampling schedule.")
    sigma_max: float = pydantic.Field(80.0, gt=0, description="Highest noise level: samples start at N(0, sigma_max^2).")
    rho: float = pydantic.Field(7.0, gt=0, description="Schedule curvature: levels equally spaced in sigma^(1/rho).")
    sampler: Literal["heun", "euler", "stochastic"] = pydantic.Field(
        "heun", description="Default sampler: deterministic Heun (EDM Alg. 1), Euler, or Heun with churn (Alg. 2)."
    )
    sampling_steps: int = pydantic.Field(18, ge=1, description="Noise levels N of the schedule (Heun: 2N-1 evaluations).")
    s_churn: float = pydantic.Field(0.0, ge=0, description="stochastic: total noise added (EDM's S_churn).")
    s_min: float = pydantic.Field(0.0, ge=0, description="stochastic: churn only where sigma >= S_min.")
    s_max: float | None = pydantic.Field(None, gt=0, description="stochastic: churn only where sigma <= S_max (null: inf).")
    s_noise: float = pydantic.Field(1.0, gt=0, description="stochastic: scale of the added noise (S_noise).")

    @pydantic.model_validator(mode="after")
    def _ordered_levels(self) -> EDMConfig:
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"sigma_min ({self.sigma_min}) must be below sigma_max ({self.sigma_max})")
        return self


def preconditioning(sigma: jax.Array, sigma_data: float) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(c_skip, c_out, c_in, c_noise)`` at ``sigma``."""
    total = sigma**2 + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data / jnp.sqrt(total), 1.0 / jnp.sqrt(total), jnp.log(sigma) / 4.0


def loss_weight(sigma: jax.Array, sigma_data: float) -> jax.Array:
    """EDM's ``lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2``."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


class EDM(base.Objective):
    """EDM (:class:`EDMConfig`); levels are noise levels ``sigma``, the network sees ``c_noise``."""

    Config = EDMConfig
    samplers: ClassVar[tuple[str, ...]] = ("heun", "euler", "stochastic")
    _sampler_kinds: ClassVar[dict[str, str]] = {"heun": "edm_heun", "euler": "euler", "stochastic": "edm_stochastic"}
    config: EDMConfig

    def precondition(
        self, network: base.Network, x: jax.Array, sigma: jax.Array, labels: jax.Array | None
    ) -> jax.Array:
        """The unguided denoiser ``D(x, sigma)`` (``sigma`` is ``[B]``)."""
        c_skip, c_out, c_in, c_noise = preconditioning(sigma, self.config.sigma_data)
        out = network(base.right_broadcast(c_in, x) * x, c_noise, labels).astype(jnp.float32)
        return base.right_broadcast(c_skip, x) * x + base.right_broadcast(c_out, x) * out

    def denoise(self, network, x, level, labels=None, *, guidance_scale=None):
        predict = lambda x, sigma, lab: self.precondition(network, x, sigma, lab)  # noqa: E731
        return self.conditioning.guided(predict, x, level, labels, guidance_scale)

    def ode_velocity(self, network, x, level, labels=None, *, guidance_scale=None):
        """``dx/dsigma = (x - D(x, sigma)) / sigma``."""
        denoised = self.denoise(network, x, level, labels, guidance_scale=guidance_scale)
        return (x - denoised) / base.right_broadcast(level, x)

    def example_losses(self, network, x, keys, labels=None):
        keys = base.as_keys(keys, x.shape[0])
        k_sigma, k_noise, k_label = base.split_per_example(keys, 3)
        sigma = jnp.exp(self.config.p_mean + self.config.p_std * jax.vmap(jax.random.normal)(k_sigma))
        noisy = x + base.right_broadcast(sigma, x) * base.normal_per_example(k_noise, x.shape[1:])
        labels = self.conditioning.training_labels(labels, k_label, x.shape[0])
        mse = base.mean_per_example((self.precondition(network, noisy, sigma, labels) - x) ** 2)
        return {"loss": loss_weight(sigma, self.config.sigma_data) * mse, "mse": mse}

    def sigmas(self, steps: int) -> jax.Array:
        """The sampling schedule: ``steps`` Karras levels from ``sigma_max`` to ``sigma_min``, then 0."""
        return samplers.karras_sigmas(steps, self.config.sigma_min, self.config.sigma_max, self.config.rho)

    def sample(self, network, keys, example_shape, labels=None, *, sampler=None, steps=None, guidance_scale=None):
        name, steps = self._sampler_and_steps(sampler, steps)
        keys = base.as_keys(keys)
        batch = keys.shape[0]
        k_init, k_steps = base.split_per_example(keys, 2)
        labels = self.conditioning.sampling_labels(labels, batch)
        x = self.config.sigma_max * base.normal_per_example(k_init, tuple(example_shape))
        sigmas = self.sigmas(steps)

        def field(x: jax.Array, sigma: jax.Array) -> jax.Array:
            return self.ode_velocity(network, x, jnp.full((x.shape[0],), sigma), labels, guidance_scale=guidance_scale)

        if name == "heun":
            out = samplers.heun(field, x, sigmas, euler_last=True)
        elif name == "euler":
            out = samplers.euler(field, x, sigmas)
        else:
            c = self.config
            out = samplers.edm_stochastic(
                field, x, sigmas, k_steps, s_churn=c.s_churn, s_min=c.s_min, s_max=c.s_max, s_noise=c.s_noise
            )
        nfe = samplers.network_evaluations(self._sampler_kinds[name], steps)
        return base.Samples(out, jnp.full((batch,), nfe, jnp.int32))
