"""Gaussian diffusion on discrete images, shared by ``ddpm_unet`` and ``dit``.

Papers: DDPM (Ho et al., 2020), the cosine schedule (Nichol & Dhariwal, 2021), DDIM (Song et
al., 2021), v-prediction (Salimans & Ho, 2022), classifier-free guidance (Ho & Salimans,
2022) and the continuous-time variational bound of VDM (Kingma et al., 2021).

Noise levels are ``gamma = -log SNR = log(sigma^2 / alpha^2)`` (VDM's convention) with
``z = alpha * x + sigma * eps``, ``alpha^2 = sigmoid(-gamma)``, ``sigma^2 = sigmoid(gamma)``.
A schedule maps ``t`` in [0, 1] to gamma; ``t = 0`` is the schedule's first DDPM step
(``1 / timesteps``), so the bound's ends are those of a ``timesteps``-step DDPM.

The bound (nats per image) is VDM's: prior KL at ``t = 1`` + the continuous-time diffusion
loss (estimated with one gamma per example, uniform in log-SNR: the variance-reducing
importance weight) + a discrete decoder ``p(x | z_0)`` over the data's grey levels. Why the
default ``prediction: levels``: at high SNR the posterior of a discrete pixel is exactly the
nearest level, which an eps/v network must learn as a sawtooth (it costs tens of nats on
8x8 digits); ``levels`` predicts per-pixel logits over the levels and adds the exact local
likelihood ``log N(z; alpha * level, sigma^2)``, so x-hat is exact at high SNR by
construction (score interpolation, Dieleman et al., 2022, with the local term added).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np
import pydantic
from flax import nnx

from workshop_dist.models import layers
from workshop_dist.models.base import GenerativeModel
from workshop_dist.models.config import LevelsParameters, ModelConfiguration, data_levels
from workshop_dist.models.keys import ExampleKeys
from workshop_dist.models.objective_model import model_class, objective_name
from workshop_dist.models.registry import register_model, validate_parameters

Schedule = Literal["linear", "cosine"]
GAMMA_MAX = 15.0  # clips the cosine schedule's end (alpha = 0 there): the prior KL is ~1e-7 nats


class DiffusionParameters(LevelsParameters):
    """Objective, noise schedule, conditioning and sampling options (networks add their sizes)."""

    objective: Literal["diffusion"] = pydantic.Field(
        "diffusion", description="diffusion (DDPM/VDM, these options), flow_matching or edm (their own options)."
    )
    schedule: Schedule = pydantic.Field("cosine", description="Noise schedule: linear (DDPM) or cosine.")
    timesteps: int = pydantic.Field(1000, ge=2, description="DDPM steps of the schedule; t=0 is its step 1.")
    prediction: Literal["eps", "v", "levels"] = pydantic.Field(
        "levels", description="Network output: noise, velocity, or logits over the grey levels."
    )
    loss: Literal["simple", "vlb"] = pydantic.Field(
        "vlb", description="simple: MSE of eps/v (cross-entropy for levels); vlb: the bound in nats."
    )
    num_classes: int | None = pydantic.Field(None, ge=0, description="Classes to condition on (0/null: none).")
    label_dropout: float = pydantic.Field(0.1, ge=0, le=1, description="Training labels replaced by 'null'.")
    guidance_scale: float = pydantic.Field(1.0, description="CFG default: 0 unconditional, 1 conditional.")
    sampler: Literal["ddpm", "ddim"] = pydantic.Field("ddpm", description="Ancestral DDPM or deterministic DDIM.")
    sampling_steps: int | None = pydantic.Field(None, ge=1, description="Sampling steps (default: timesteps).")


def gamma_schedule(schedule: Schedule, t: jax.Array, timesteps: int, xp: Any = jnp) -> jax.Array:
    """-log SNR at ``t`` in [0, 1]; monotone increasing (more noise). ``xp=np`` evaluates it on the host."""
    s = 1.0 / timesteps + t * (1.0 - 1.0 / timesteps)
    if schedule == "linear":  # continuous DDPM betas 1e-4..0.02 (x 1000 steps): the VP-SDE's
        return xp.log(xp.expm1(0.1 * s + 0.5 * (20.0 - 0.1) * s**2))
    offset = 0.008
    f0 = math.cos(offset / (1 + offset) * math.pi / 2) ** 2
    f = xp.cos((s + offset) / (1 + offset) * xp.pi / 2) ** 2
    return xp.minimum(xp.log(f0 / xp.maximum(f, 1e-30) - 1.0), GAMMA_MAX)


def alpha_sigma(gamma: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.sqrt(jax.nn.sigmoid(-gamma)), jnp.sqrt(jax.nn.sigmoid(gamma))


def v_target(x: jax.Array, eps: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
    return alpha * eps - sigma * x


def from_eps(z: jax.Array, eps: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
    """x-hat from an eps prediction."""
    return (z - sigma * eps) / alpha


def from_v(z: jax.Array, v: jax.Array, alpha: jax.Array, sigma: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x-hat, eps-hat) from a v prediction (alpha^2 + sigma^2 = 1)."""
    return alpha * z - sigma * v, sigma * z + alpha * v


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
    """Sinusoidal features of ``1000 * t`` (t in [0, 1]), as in DDPM/DiT."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = 1000.0 * t[:, None].astype(jnp.float32) * freqs[None]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def remat_policy(name: str) -> Callable[[Callable], Callable] | None:
    """``model.remat`` -> a wrapper for a block's call (None: no rematerialisation)."""
    if name == "none":
        return None
    policy = None if name == "full" else getattr(jax.checkpoint_policies, name)
    return lambda fn: nnx.remat(fn, policy=policy)


class DiffusionModel(GenerativeModel):
    """The diffusion objective and samplers over ``self.network(z, t, labels) -> out``.

    ``out`` has ``channels`` (eps, v) or ``channels * num_levels`` (levels) features per pixel.
    A backbone subclass sets ``family``, ``network_parameters`` (its sizes) and ``build_network``
    ``(hp, image_shape, out_features, num_classes, remat, **layer_kwargs) -> network``; with
    ``parameters.objective`` flow_matching or edm, :meth:`select_class` gives the same network
    under that objective instead (:mod:`workshop_dist.models.objective_model`).
    """

    Parameters = DiffusionParameters
    per_example_keys = True
    family: ClassVar[str]
    network_parameters: ClassVar[type]
    build_network: ClassVar[Callable[..., nnx.Module]]

    @classmethod
    def select_class(cls, config: ModelConfiguration) -> type:
        """This class for ``parameters.objective: diffusion``; flow matching or EDM over the same network."""
        objective = objective_name(config, cls.family)
        if objective == "diffusion":
            return cls
        return model_class(cls.family, cls.network_parameters, cls.build_network, objective)

    def __init__(self, config: ModelConfiguration, *, rngs: nnx.Rngs):
        self.hp = validate_parameters(type(self), config)
        self.image_shape = tuple(config.input_dim)
        self.channels = self.image_shape[-1]
        self.num_classes = self.hp.num_classes or 0
        self.num_levels = data_levels(config, self.hp, config.model_class)
        self.out_features = self.channels * (self.num_levels if self.hp.prediction == "levels" else 1)
        self.remat = config.remat
        self.deterministic = False  # set by model.train() / model.eval(): label dropout only in training
        # on the host: concrete even when the model is built abstractly or inside a jitted init
        ends = gamma_schedule(self.hp.schedule, np.array([0.0, 1.0], np.float32), self.hp.timesteps, xp=np)
        self.gamma_ends = (float(ends[0]), float(ends[1]))
        self.network = type(self).build_network(
            self.hp, self.image_shape, self.out_features, self.num_classes, self.remat, rngs=rngs, **layers.dtypes(config)
        )

    # --- noise levels and data scaling -------------------------------------------------------
    def gamma(self, t: jax.Array) -> jax.Array:
        return gamma_schedule(self.hp.schedule, t, self.hp.timesteps)

    def to_unit(self, levels: jax.Array) -> jax.Array:
        """Integer levels 0..L-1 -> [-1, 1]."""
        return levels.astype(jnp.float32) * (2.0 / (self.num_levels - 1)) - 1.0

    def to_levels(self, x: jax.Array) -> jax.Array:
        """[-1, 1] -> nearest level as float 0..L-1 (data space)."""
        return jnp.clip(jnp.round((x + 1.0) * (self.num_levels - 1) / 2.0), 0, self.num_levels - 1)

    # --- the denoiser ----------------------------------------------------------------------------
    def denoise(self, z: jax.Array, gamma: jax.Array, labels: jax.Array | None) -> dict[str, jax.Array]:
        """x-hat and eps-hat at noise level ``gamma`` [B] (``logits`` too for levels)."""
        g0, g1 = self.gamma_ends
        shape = (-1,) + (1,) * (z.ndim - 1)
        alpha, sigma = (a.reshape(shape) for a in alpha_sigma(gamma))
        out = self.network(z, (gamma - g0) / (g1 - g0), labels).astype(jnp.float32)
        if self.hp.prediction == "eps":
            return {"x": from_eps(z, out, alpha, sigma), "eps": out, "out": out}
        if self.hp.prediction == "v":
            x, eps = from_v(z, out, alpha, sigma)
            return {"x": x, "eps": eps, "out": out}
        values = jnp.linspace(-1.0, 1.0, self.num_levels)
        local = -0.5 * (z[..., None] - alpha[..., None] * values) ** 2 / sigma[..., None] ** 2
        logits = out.reshape(*z.shape, self.num_levels) + local
        x = jax.nn.softmax(logits, axis=-1) @ values
        return {"x": x, "eps": (z - alpha * x) / sigma, "logits": logits, "out": out}

    def _labels(self, batch: dict[str, jax.Array], keys: ExampleKeys, *, drop: bool) -> jax.Array | None:
        if not self.num_classes:
            return None
        if "label" not in batch:
            return jnp.full(batch["image"].shape[:1], self.num_classes, jnp.int32)
        labels = batch["label"].astype(jnp.int32)
        if drop and self.hp.label_dropout > 0:
            labels = jnp.where(keys.bernoulli(self.hp.label_dropout), self.num_classes, labels)
        return labels

    # --- the bound's closed-form terms ---------------------------------------------------------
    def prior_kl(self, x: jax.Array) -> jax.Array:
        """KL(q(z_1 | x) || N(0, I)) per example."""
        alpha, sigma = alpha_sigma(jnp.float32(self.gamma_ends[1]))
        kl = 0.5 * (sigma**2 + alpha**2 * x**2 - 1.0 - 2.0 * jnp.log(sigma))
        return kl.reshape(x.shape[0], -1).sum(-1)

    def reconstruction(self, x: jax.Array, rng: jax.Array | ExampleKeys) -> jax.Array:
        """-log p(x | z_0) with VDM's discrete decoder over the levels (one sample of z_0 per example)."""
        gamma0 = jnp.float32(self.gamma_ends[0])
        alpha, sigma = alpha_sigma(gamma0)
        z0 = alpha * x + sigma * ExampleKeys.of(rng, x.shape[0]).normal(x.shape[1:])
        values = jnp.linspace(-1.0, 1.0, self.num_levels)
        logits = -0.5 * (z0[..., None] / alpha - values) ** 2 * jnp.exp(-gamma0)
        index = jnp.round((x + 1.0) * (self.num_levels - 1) / 2.0).astype(jnp.int32)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), index[..., None], -1)[..., 0]
        return -logp.reshape(x.shape[0], -1).sum(-1)

    # --- the contract ----------------------------------------------------------------------------
    def example_losses(
        self, batch: dict[str, jax.Array], rng: jax.Array | ExampleKeys, *, step: jax.Array | None = None,
        group: str | None = None,
    ) -> dict[str, jax.Array]:
        """Per-example training loss, a one-sample estimate of the bound (``vlb``) and its terms.

        Each example's time, noise, label dropout and decoder noise come from its own key.
        """
        layers.check_images(batch["image"], self.image_shape)
        x = self.to_unit(batch["image"])
        batch_size = x.shape[0]
        k_t, k_eps, k_drop, k_rec = ExampleKeys.of(rng, batch_size).split(4)
        labels = self._labels(batch, k_drop, drop=not self.deterministic)
        g0, g1 = self.gamma_ends
        u = k_t.uniform()
        if self.hp.loss == "vlb":  # uniform in log-SNR: importance weight g1 - g0
            gamma, weight = g0 + u * (g1 - g0), jnp.full((batch_size,), g1 - g0)
        else:  # uniform in schedule time: weight d gamma / dt
            gamma, weight = self.gamma(u), jax.vmap(jax.grad(self.gamma))(u)
        eps = k_eps.normal(x.shape[1:])
        shape = (-1,) + (1,) * (x.ndim - 1)
        alpha, sigma = (a.reshape(shape) for a in alpha_sigma(gamma))
        z = alpha * x + sigma * eps
        pred = self.denoise(z, gamma, labels)
        per_dim = lambda a: a.reshape(batch_size, -1)  # noqa: E731
        diffusion = 0.5 * weight * jnp.sum(per_dim(eps - pred["eps"]) ** 2, -1)
        prior, recon = self.prior_kl(x), self.reconstruction(x, k_rec)
        vlb = prior + recon + diffusion
        if self.hp.loss == "vlb":
            loss = vlb
        elif self.hp.prediction == "levels":
            index = jnp.round((x + 1.0) * (self.num_levels - 1) / 2.0).astype(jnp.int32)
            logp = jnp.take_along_axis(jax.nn.log_softmax(pred["logits"], -1), index[..., None], -1)
            loss = -per_dim(logp).mean(-1)
        else:
            target = eps if self.hp.prediction == "eps" else v_target(x, eps, alpha, sigma)
            loss = jnp.mean(per_dim(target - pred["out"]) ** 2, -1)
        mse = jnp.mean(per_dim(x - pred["x"]) ** 2, -1)
        return {"loss": loss, "vlb": vlb, "diffusion": diffusion, "prior": prior, "reconstruction": recon, "mse": mse}

    def nll(
        self, batch: dict[str, jax.Array], rng: jax.Array, *, time_samples: int = 1, conditional: bool | None = None
    ) -> jax.Array:
        """Upper bound on -log p(x) in nats per image: averages ``time_samples`` draws of gamma.

        A conditional model is the mixture ``p(x) = sum_y p(y) p(x | y)`` with uniform ``p(y)``:
        with the batch's labels, ``-log p(x) <= bound(x | y) + log num_classes`` (``conditional``
        default). ``conditional=False`` bounds the null-label (unconditional) model instead.
        """
        x = self.to_unit(batch["image"])
        use_labels = bool(self.num_classes) and "label" in batch and conditional is not False
        labels = None
        if self.num_classes:
            labels = batch["label"].astype(jnp.int32) if use_labels else jnp.full(x.shape[:1], self.num_classes)
        k_rec, k_diff = jax.random.split(rng)
        g0, g1 = self.gamma_ends
        shape = (-1,) + (1,) * (x.ndim - 1)
        graphdef, state = nnx.split(self)

        def one(total: jax.Array, key: jax.Array) -> tuple[jax.Array, None]:
            k_g, k_e = jax.random.split(key)
            gamma = g0 + jax.random.uniform(k_g, x.shape[:1]) * (g1 - g0)
            eps = jax.random.normal(k_e, x.shape)
            alpha, sigma = (a.reshape(shape) for a in alpha_sigma(gamma))
            eps_hat = nnx.merge(graphdef, state).denoise(alpha * x + sigma * eps, gamma, labels)["eps"]
            return total + 0.5 * (g1 - g0) * jnp.sum((eps - eps_hat).reshape(x.shape[0], -1) ** 2, -1), None

        total, _ = jax.lax.scan(one, jnp.zeros(x.shape[:1]), jax.random.split(k_diff, time_samples))
        bound = self.prior_kl(x) + self.reconstruction(x, k_rec) + total / time_samples
        return bound + (math.log(self.num_classes) if use_labels else 0.0)

    def sample(
        self, rng: jax.Array, num_samples: int, *, labels: jax.Array | None = None, guidance_scale: float | None = None,
        sampling_steps: int | None = None, sampler: str | None = None, **options: Any,
    ) -> jax.Array:
        """Images in data space (levels 0..L-1 as floats): ancestral DDPM or DDIM from t=1 to 0.

        ``guidance_scale`` s mixes ``x_u + s (x_c - x_u)``: 0 is unconditional, 1 conditional.
        ``labels=None`` on a conditional model samples unconditionally (the null label).
        """
        if options:
            raise TypeError(f"unknown sampling options {sorted(options)}")
        steps = sampling_steps or self.hp.sampling_steps or self.hp.timesteps
        sampler = sampler or self.hp.sampler
        scale = self.hp.guidance_scale if guidance_scale is None else float(guidance_scale)
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
        null = jnp.full((num_samples,), self.num_classes, jnp.int32) if self.num_classes else None
        guided = self.num_classes and labels is not None and scale != 1.0
        labels = (null if labels is None else jnp.asarray(labels, jnp.int32)) if self.num_classes else None
        graphdef, state = nnx.split(self)

        def predict(z: jax.Array, gamma: jax.Array) -> dict[str, jax.Array]:
            model = nnx.merge(graphdef, state)
            gammas = jnp.full((num_samples,), gamma)
            if not guided:
                return model.denoise(z, gammas, labels)
            both = model.denoise(jnp.concatenate([z, z]), jnp.concatenate([gammas, gammas]), jnp.concatenate([labels, null]))
            x_cond, x_uncond = jnp.split(both["x"], 2)
            return {"x": x_uncond + scale * (x_cond - x_uncond)}

        def step(i: jax.Array, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            z, key = carry
            key, k_noise = jax.random.split(key)
            gamma_t, gamma_s = self.gamma((steps - i) / steps), self.gamma((steps - i - 1) / steps)
            (alpha_t, sigma_t), (alpha_s, sigma_s) = alpha_sigma(gamma_t), alpha_sigma(gamma_s)
            x = jnp.clip(predict(z, gamma_t)["x"], -1.0, 1.0)
            eps = (z - alpha_t * x) / sigma_t
            if sampler == "ddim":
                return alpha_s * x + sigma_s * eps, key
            c = -jnp.expm1(gamma_s - gamma_t)  # VDM's stable ancestral step
            mean = alpha_s / alpha_t * (z - sigma_t * c * eps)
            return mean + sigma_s * jnp.sqrt(c) * jax.random.normal(k_noise, z.shape), key

        k_init, k_loop = jax.random.split(rng)
        z = jax.random.normal(k_init, (num_samples, *self.image_shape))
        z, _ = jax.lax.fori_loop(0, steps, step, (z, k_loop))
        return self.to_levels(predict(z, self.gamma(jnp.float32(0.0)))["x"])


def register_backbone(family: str, parameters: type, network_parameters: type, build: Callable[..., nnx.Module]) -> type:
    """Register ``model_class: <family>``: diffusion over the network ``build`` makes (``parameters``:
    its sizes plus the diffusion options; ``network_parameters``: its sizes alone, for the other objectives)."""
    attributes = {"Parameters": parameters, "family": family, "network_parameters": network_parameters,
                  "build_network": staticmethod(build), "__module__": build.__module__,
                  "__doc__": f"Diffusion over the ``{family}`` network (``model.parameters``: :class:`{parameters.__name__}`)."}
    return register_model(family)(type(f"{parameters.__name__.removesuffix('Parameters')}Model", (DiffusionModel,), attributes))
