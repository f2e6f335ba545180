"""Flow matching with stochastic interpolants (SiT; rectified flow; SD3's time sampling).

Convention: flow time ``t`` in [0, 1] with ``t = 0`` the data and ``t = 1`` pure noise,
``x_t = alpha(t) x + sigma(t) eps``, ``eps ~ N(0, I)``; the velocity is
``u = d x_t / dt = alpha'(t) x + sigma'(t) eps``. Paths:

- ``linear`` (rectified flow): ``alpha = 1 - t``, ``sigma = t``;
- ``gvp`` (SiT's generalised variance preserving): ``alpha = cos(pi t / 2)``, ``sigma = sin(pi t / 2)``.

The network predicts the velocity, the noise or the data; any one of them and ``x_t`` give
the others (the 2x2 system ``[alpha sigma; alpha' sigma']`` has determinant
``alpha sigma' - sigma alpha'``: 1 for ``linear``, pi/2 for ``gvp``). Sampling integrates the
probability-flow ODE ``dx/dt = v(x, t)`` from t = 1 to 0, or SiT's SDE with diffusion
coefficient ``w(t)``: ``dx = [v + w eps_hat / sigma] dt + sqrt(2 w) dW`` (t decreasing; the score
is ``-eps_hat / sigma``).

Papers: Albergo & Vanden-Eijnden, 2023; Lipman et al., 2023; Liu et al., 2023; SiT (Ma et
al., 2024); SD3 (Esser et al., 2024: logit-normal and mode time sampling, the time shift).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import jax
import jax.numpy as jnp
import pydantic

from workshop_dist.models import samplers
from workshop_dist.models.objectives import likelihood
from workshop_dist.models.objectives.base import (
    ConditioningConfig,
    Network,
    Objective,
    Samples,
    as_keys,
    mean_per_example,
    normal_per_example,
    right_broadcast,
    split_per_example,
)

Path = Literal["linear", "gvp"]
Prediction = Literal["velocity", "noise", "data"]
MODE_SCALE_MAX = 2.0 / (math.pi - 2.0)  # SD3's mode density is monotone for scale in [-1, 2 / (pi - 2)]


class FlowMatchingConfig(ConditioningConfig):
    """Path, prediction target, training-time distribution, loss weighting and sampling defaults."""

    path: Path = pydantic.Field("linear", description="Interpolant: linear (rectified flow) or gvp (cosine).")
    prediction: Prediction = pydantic.Field("velocity", description="Network output: velocity, noise or data.")
    time_sampling: Literal["uniform", "logit_normal", "mode"] = pydantic.Field(
        "uniform", description="Training times: uniform, logit-normal (SD3's m, s) or mode (SD3, heavy tails)."
    )
    logit_mean: float = pydantic.Field(0.0, description="logit_normal: mean m of logit(t).")
    logit_std: float = pydantic.Field(1.0, gt=0, description="logit_normal: standard deviation s of logit(t).")
    mode_scale: float = pydantic.Field(
        1.29, ge=-1.0, le=MODE_SCALE_MAX, description="mode: SD3's scale s (0 is uniform; 1.29 in SD3)."
    )
    time_shift: float = pydantic.Field(
        1.0, gt=0, description="SD3's shift s t / (1 + (s - 1) t) of training and sampling times (1: none)."
    )
    time_eps: float | None = pydantic.Field(
        None, ge=0, lt=0.5,
        description="Times are kept in [eps, 1 - eps] (null: 0 for velocity, 1e-3 for noise/data, as SiT).",
    )
    loss_weighting: Literal["none", "velocity", "likelihood"] = pydantic.Field(
        "none",
        description="none: MSE of the prediction's own target; velocity: MSE of the implied velocity; "
        "likelihood: (-dlogSNR/dt)/2 x noise MSE (x dims = the diffusion term of VDM's bound).",
    )
    sampler: Literal["euler", "heun", "adaptive", "sde"] = pydantic.Field(
        "heun", description="Default sampler: Euler/Heun ODE, adaptive ODE (diffrax) or Euler-Maruyama SDE."
    )
    sampling_steps: int = pydantic.Field(50, ge=1, description="Steps of the fixed-step samplers.")
    sde_diffusion: Literal["sigma", "constant"] = pydantic.Field(
        "sigma", description="SDE diffusion coefficient w(t): sigma(t) x norm (SiT's choice) or norm."
    )
    sde_diffusion_norm: float = pydantic.Field(1.0, ge=0, description="Scale of w(t) (0: the ODE with Euler).")
    rtol: float = pydantic.Field(1e-3, gt=0, description="Adaptive solver's relative tolerance.")
    atol: float = pydantic.Field(1e-6, gt=0, description="Adaptive solver's absolute tolerance.")
    ode_solver: Literal["dopri5", "tsit5"] = pydantic.Field("dopri5", description="Adaptive Runge-Kutta pair.")


# --- paths and conversions ----------------------------------------------------------------------------
def path_coefficients(path: Path, t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(alpha, sigma, alpha', sigma')`` at ``t``."""
    if path == "linear":
        return 1.0 - t, t, -jnp.ones_like(t), jnp.ones_like(t)
    half_pi = 0.5 * math.pi
    c, s = jnp.cos(half_pi * t), jnp.sin(half_pi * t)
    return c, s, -half_pi * s, half_pi * c


def interpolate(path: Path, x: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
    """``x_t = alpha x + sigma eps`` (``t`` is ``[B]``)."""
    alpha, sigma, _, _ = (right_broadcast(c, x) for c in path_coefficients(path, t))
    return alpha * x + sigma * eps


def target_velocity(path: Path, x: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
    """``u = d x_t / dt = alpha' x + sigma' eps``."""
    _, _, d_alpha, d_sigma = (right_broadcast(c, x) for c in path_coefficients(path, t))
    return d_alpha * x + d_sigma * eps


def convert(path: Path, prediction: Prediction, out: jax.Array, x_t: jax.Array, t: jax.Array) -> dict[str, jax.Array]:
    """All three views (``velocity``, ``noise``, ``data``) of one prediction at ``(x_t, t)``.

    From the velocity they are exact everywhere; from noise the data view divides by ``alpha``
    (undefined at t = 1), from data the noise view divides by ``sigma`` (undefined at t = 0).
    """
    alpha, sigma, d_alpha, d_sigma = (right_broadcast(c, x_t) for c in path_coefficients(path, t))
    if prediction == "velocity":
        det = alpha * d_sigma - sigma * d_alpha
        data, noise = (d_sigma * x_t - sigma * out) / det, (alpha * out - d_alpha * x_t) / det
        return {"velocity": out, "noise": noise, "data": data}
    if prediction == "noise":
        data = (x_t - sigma * out) / alpha
        return {"velocity": d_alpha * data + d_sigma * out, "noise": out, "data": data}
    noise = (x_t - alpha * out) / sigma
    return {"velocity": d_alpha * out + d_sigma * noise, "noise": noise, "data": out}


def sample_time(config: FlowMatchingConfig, keys: jax.Array) -> jax.Array:
    """Training times ``[B]``, one per key: the chosen density, then the shift, then ``[eps, 1 - eps]``."""
    if config.time_sampling == "logit_normal":
        t = jax.nn.sigmoid(config.logit_mean + config.logit_std * jax.vmap(jax.random.normal)(keys))
    else:
        t = jax.vmap(jax.random.uniform)(keys)
        if config.time_sampling == "mode":
            s = config.mode_scale
            t = 1.0 - t - s * (jnp.cos(0.5 * math.pi * t) ** 2 - 1.0 + t)
    eps = resolved_time_eps(config)
    return eps + (1.0 - 2.0 * eps) * samplers.shift_time(t, config.time_shift)


def resolved_time_eps(config: FlowMatchingConfig) -> float:
    if config.time_eps is not None:
        return config.time_eps
    return 0.0 if config.prediction == "velocity" else 1e-3


def loss_factor(config: FlowMatchingConfig, t: jax.Array) -> jax.Array:
    """Weight ``[B]`` on the MSE of the network's own target that gives the chosen weighting.

    The errors of the three views are proportional: ``e_noise = k e_own`` with ``k = 1`` (noise),
    ``alpha / det`` (velocity), ``-alpha / sigma`` (data), and ``e_velocity = (det / alpha) e_noise``.
    """
    alpha, sigma, d_alpha, d_sigma = path_coefficients(config.path, t)
    if config.loss_weighting == "none":
        return jnp.ones_like(t)
    det = alpha * d_sigma - sigma * d_alpha
    to_noise = {"noise": jnp.ones_like(t), "velocity": alpha / det, "data": -alpha / sigma}[config.prediction]
    if config.loss_weighting == "velocity":
        return (det / alpha * to_noise) ** 2
    return (d_sigma / sigma - d_alpha / alpha) * to_noise**2  # -(d/dt log SNR) / 2 on the noise MSE


class FlowMatching(Objective):
    """Flow matching (:class:`FlowMatchingConfig`); levels are flow times, the network sees ``t``."""

    Config = FlowMatchingConfig
    samplers: ClassVar[tuple[str, ...]] = ("euler", "heun", "adaptive", "sde")
    _sampler_kinds: ClassVar[dict[str, str]] = {"euler": "euler", "heun": "heun", "sde": "euler_maruyama"}
    config: FlowMatchingConfig

    @property
    def time_range(self) -> tuple[float, float]:
        """``(t_min, t_max)`` of training and sampling."""
        eps = resolved_time_eps(self.config)
        return eps, 1.0 - eps

    def predictions(
        self, network: Network, x: jax.Array, t: jax.Array, labels: jax.Array | None = None,
        *, guidance_scale: float | None = None,
    ) -> dict[str, jax.Array]:
        """The (guided) velocity, noise and data predictions at ``(x, t)``, ``t`` in ``[B]``."""
        out = self.conditioning.guided(network, x, t, labels, guidance_scale).astype(jnp.float32)
        return convert(self.config.path, self.config.prediction, out, x, t)

    def denoise(self, network, x, level, labels=None, *, guidance_scale=None):
        return self.predictions(network, x, level, labels, guidance_scale=guidance_scale)["data"]

    def ode_velocity(self, network, x, level, labels=None, *, guidance_scale=None):
        return self.predictions(network, x, level, labels, guidance_scale=guidance_scale)["velocity"]

    def sde_diffusion(self, t: jax.Array) -> jax.Array:
        """SiT's ``w(t)``; the SDE's noise per unit time is ``sqrt(2 w)``."""
        norm = self.config.sde_diffusion_norm
        if self.config.sde_diffusion == "constant":
            return jnp.full_like(t, norm)
        return norm * path_coefficients(self.config.path, t)[1]

    def example_losses(self, network, x, keys, labels=None):
        keys = as_keys(keys, x.shape[0])
        k_time, k_noise, k_label = split_per_example(keys, 3)
        t = sample_time(self.config, k_time)
        eps = normal_per_example(k_noise, x.shape[1:])
        x_t = interpolate(self.config.path, x, eps, t)
        labels = self.conditioning.training_labels(labels, k_label, x.shape[0])
        out = network(x_t, t, labels).astype(jnp.float32)
        target = {"velocity": target_velocity(self.config.path, x, eps, t), "noise": eps, "data": x}
        mse = mean_per_example((out - target[self.config.prediction]) ** 2)
        return {"loss": loss_factor(self.config, t) * mse, "mse": mse}

    def sample(self, network, keys, example_shape, labels=None, *, sampler=None, steps=None, guidance_scale=None):
        name, steps = self._sampler_and_steps(sampler, steps)
        keys = as_keys(keys)
        batch = keys.shape[0]
        k_init, k_steps = split_per_example(keys, 2)
        x = normal_per_example(k_init, tuple(example_shape))
        labels = self.conditioning.sampling_labels(labels, batch)
        t_min, t_max = self.time_range

        def views(x: jax.Array, t: jax.Array, lab: jax.Array | None) -> dict[str, jax.Array]:
            return self.predictions(network, x, jnp.full((x.shape[0],), t), lab, guidance_scale=guidance_scale)

        if name == "adaptive":
            out, nfe = samplers.adaptive(
                lambda x, t, lab: views(x, t, lab)["velocity"], x, t_max, t_min, args=labels,
                rtol=self.config.rtol, atol=self.config.atol, solver=self.config.ode_solver,
            )
            return Samples(out, nfe)
        grid = samplers.uniform_grid(steps, t_min, t_max, self.config.time_shift)
        velocity = lambda x, t: views(x, t, labels)["velocity"]  # noqa: E731
        if name == "euler":
            out = samplers.euler(velocity, x, grid)
        elif name == "heun":
            out = samplers.heun(velocity, x, grid)
        else:
            def drift(x: jax.Array, t: jax.Array) -> jax.Array:
                v = views(x, t, labels)
                sigma = path_coefficients(self.config.path, t)[1]
                return v["velocity"] + self.sde_diffusion(t) * v["noise"] / sigma

            diffusion = lambda t: jnp.sqrt(2.0 * self.sde_diffusion(t))  # noqa: E731
            out = samplers.euler_maruyama(drift, diffusion, x, grid, k_steps)
        nfe = samplers.network_evaluations(self._sampler_kinds[name], steps)
        return Samples(out, jnp.full((batch,), nfe, jnp.int32))

    def nll(
        self, network: Network, x_centers: jax.Array, bin_width: float, keys: jax.Array,
        labels: jax.Array | None = None, *, exact: bool | None = None, rtol: float = 1e-5, atol: float = 1e-5,
    ) -> jax.Array:
        """Upper bound on ``-log P(levels)`` in nats per example, via the probability-flow ODE.

        ``x_centers`` are the data's levels mapped into model space, ``bin_width`` the spacing
        of adjacent levels there (see :func:`likelihood.dequantized_nll` for the bound). Labels
        (or the null label) condition the unguided velocity, so with labels this bounds
        ``-log P(levels | label)``. ``exact`` (default: at most 256 dims) picks the exact
        divergence over Hutchinson's estimate.
        """
        keys = as_keys(keys, x_centers.shape[0])
        labels = self.conditioning.sampling_labels(labels, x_centers.shape[0])
        t_min, t_max = self.time_range

        def velocity(x: jax.Array, t: jax.Array, lab: jax.Array | None) -> jax.Array:
            return self.ode_velocity(network, x, jnp.full((x.shape[0],), t), lab, guidance_scale=1.0)

        return likelihood.dequantized_nll(
            velocity, x_centers, bin_width, keys, args=labels, t_min=t_min, t_max=t_max,
            exact=exact, rtol=rtol, atol=atol,
        )
