"""Exact networks for Gaussian data, where every objective's optimum is analytic.

Data ``x ~ N(mu, Sigma)`` (per example, over the flattened trailing dims). For flow matching,
``x_t = alpha x + sigma eps`` is Gaussian with covariance ``C = alpha^2 Sigma + sigma^2 I``, so
``E[x | x_t] = mu + alpha Sigma C^-1 (x_t - alpha mu)`` and ``E[eps | x_t] = sigma C^-1 (x_t - alpha mu)``;
for EDM ``D(x_sigma) = mu + Sigma (Sigma + sigma^2 I)^-1 (x_sigma - mu)``. The probability-flow
ODE then maps noise ``z`` to data by ``mu + Sigma^(1/2) z`` (all matrices are functions of
``Sigma``, so each eigen-direction is a 1-D monotone transport).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from workshop_dist.models.objectives import edm, flow_matching


class Gaussian:
    def __init__(self, mu, cov):
        self.mu = jnp.asarray(mu, jnp.float32)
        self.cov = jnp.asarray(cov, jnp.float32)
        self.dims = self.mu.shape[0]
        eigvals, eigvecs = np.linalg.eigh(np.asarray(cov, np.float64))
        self.eigvals, self.eigvecs = jnp.asarray(eigvals, jnp.float32), jnp.asarray(eigvecs, jnp.float32)

    def _apply(self, x: jnp.ndarray, scale: jnp.ndarray) -> jnp.ndarray:
        """``Q diag(scale) Q^T x`` per example (``scale`` is ``[B, D]``)."""
        return ((x @ self.eigvecs) * scale) @ self.eigvecs.T

    def transport(self, z: jnp.ndarray) -> jnp.ndarray:
        """The exact ODE map from standard-normal noise to data: ``mu + Sigma^(1/2) z``."""
        flat = z.reshape(z.shape[0], -1)
        return (self.mu + self._apply(flat, jnp.sqrt(self.eigvals)[None])).reshape(z.shape)

    def log_density(self, x: jnp.ndarray) -> jnp.ndarray:
        flat = np.asarray(x, np.float64).reshape(x.shape[0], -1) - np.asarray(self.mu, np.float64)
        cov = np.asarray(self.cov, np.float64)
        _, logdet = np.linalg.slogdet(cov)
        quad = np.einsum("bi,ij,bj->b", flat, np.linalg.inv(cov), flat)
        return -0.5 * (quad + logdet + self.dims * math.log(2 * math.pi))

    # --- flow matching ------------------------------------------------------------------------------
    def flow_views(self, path: str, x_t: jnp.ndarray, t: jnp.ndarray) -> dict[str, jnp.ndarray]:
        flat = x_t.reshape(x_t.shape[0], -1)
        alpha, sigma, d_alpha, d_sigma = (c[:, None] for c in flow_matching.path_coefficients(path, t))
        inv = 1.0 / (alpha**2 * self.eigvals[None] + sigma**2)  # C^-1 in the eigenbasis
        centred = flat - alpha * self.mu
        data = self.mu + alpha * self._apply(centred, self.eigvals[None] * inv)
        noise = sigma * self._apply(centred, inv)
        views = {"data": data, "noise": noise, "velocity": d_alpha * data + d_sigma * noise}
        return {k: v.reshape(x_t.shape) for k, v in views.items()}

    def flow_network(self, path: str, prediction: str):
        """``network(x_t, t, labels)`` predicting ``prediction`` exactly."""
        return lambda x, t, labels: self.flow_views(path, x, t)[prediction]

    # --- EDM ------------------------------------------------------------------------------------------
    def edm_denoiser(self, x: jnp.ndarray, sigma: jnp.ndarray) -> jnp.ndarray:
        flat = x.reshape(x.shape[0], -1)
        scale = self.eigvals[None] / (self.eigvals[None] + sigma[:, None] ** 2)
        return (self.mu + self._apply(flat - self.mu, scale)).reshape(x.shape)

    def edm_network(self, sigma_data: float):
        """``F(c_in x, c_noise)`` whose preconditioned denoiser is the exact one."""

        def network(x_in, c_noise, labels):
            sigma = jnp.exp(4.0 * c_noise)
            c_skip, c_out, c_in, _ = edm.preconditioning(sigma, sigma_data)
            shape = (-1,) + (1,) * (x_in.ndim - 1)
            x = x_in / c_in.reshape(shape)
            return (self.edm_denoiser(x, sigma) - c_skip.reshape(shape) * x) / c_out.reshape(shape)

        return network

    def edm_transport(self, x_start: jnp.ndarray, sigma_max: float) -> jnp.ndarray:
        """The exact ODE map from ``x`` at ``sigma_max`` to ``sigma = 0``: per eigen-direction,
        ``x - mu`` scales by ``sqrt(lambda / (lambda + sigma_max^2))``."""
        flat = x_start.reshape(x_start.shape[0], -1) - self.mu
        scale = jnp.sqrt(self.eigvals / (self.eigvals + sigma_max**2))[None]
        return (self.mu + self._apply(flat, scale)).reshape(x_start.shape)
