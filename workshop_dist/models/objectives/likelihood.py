"""Log-likelihoods through the probability-flow ODE (continuous normalising flow view).

Along a solution of ``dx/dt = v(x, t)`` the density obeys ``d log p_t(x_t) / dt = -div v``, so

    log p_{t_min}(x) = log N(x_{t_max}; 0, I) + integral_{t_min}^{t_max} div v(x_t, t) dt,

solved forwards (data to noise) together with ``x_t`` by diffrax, one adaptive solve per
example (``jax.vmap``). The divergence is exact (the trace of the Jacobian, ``jax.jacfwd``:
one forward pass per dimension, fine for 8x8 digits' 64) or Hutchinson's estimate
``z^T (dv/dx) z`` with one Rademacher probe ``z`` per example held fixed along the solve
(FFJORD, Grathwohl et al., 2019): unbiased for the log-density, one JVP per evaluation.

The prior at ``t_max`` is N(0, I), exact for flow matching's paths at t = 1 (``alpha = 0``).
Papers: Chen et al., 2018; Song et al., 2021 (probability-flow ODE likelihoods).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from workshop_dist.models.objectives.base import as_keys, split_per_example

Velocity = Callable[[jax.Array, jax.Array, object], jax.Array]  # (x [B, ...], t scalar, args) -> v
EXACT_MAX_DIMS = 256


def log_density(
    velocity: Velocity, x: jax.Array, keys: jax.Array | None = None, *, args: object = None,
    t_min: float = 0.0, t_max: float = 1.0, exact: bool | None = None, rtol: float = 1e-5,
    atol: float = 1e-5, max_steps: int = 4096,
) -> jax.Array:
    """``log p_{t_min}(x)`` in nats per example (``[B]``) of the flow ``velocity(x, t, args)``.

    ``args`` (e.g. labels) is a pytree batched like ``x``; ``keys`` (one per example) draw the
    Hutchinson probes and are needed only when ``exact`` is False (default: exact up to
    256 dimensions).
    """
    import diffrax  # here, not at the top: only likelihood evaluation needs it (a slow import)

    dims = math.prod(x.shape[1:])
    exact = dims <= EXACT_MAX_DIMS if exact is None else exact
    if not exact and keys is None:
        raise ValueError("Hutchinson's divergence estimate needs keys (one per example)")
    probes = (
        jax.vmap(lambda k: jax.random.rademacher(k, x.shape[1:], jnp.float32))(as_keys(keys, x.shape[0]))
        if not exact else jnp.zeros_like(x)
    )

    def solve(x0: jax.Array, probe: jax.Array, arg: object) -> jax.Array:
        one = jax.tree.map(lambda a: a[None], arg)

        def field(t: jax.Array, state: tuple[jax.Array, jax.Array], _: object) -> tuple[jax.Array, jax.Array]:
            y, _ = state
            f = lambda z: velocity(z[None], t, one)[0]  # noqa: E731
            if exact:
                v = f(y)
                div = jnp.trace(jax.jacfwd(f)(y).reshape(dims, dims))
            else:
                v, jvp = jax.jvp(f, (y,), (probe,))
                div = jnp.sum(probe * jvp)
            return v, div

        solution = diffrax.diffeqsolve(
            diffrax.ODETerm(field), diffrax.Dopri5(), t0=t_min, t1=t_max, dt0=None,
            y0=(x0, jnp.zeros((), jnp.float32)), max_steps=max_steps,
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol), saveat=diffrax.SaveAt(t1=True),
        )
        z, integral = solution.ys[0][-1], solution.ys[1][-1]
        prior = -0.5 * jnp.sum(z**2) - 0.5 * dims * math.log(2.0 * math.pi)
        return prior + integral

    return jax.vmap(solve)(x.astype(jnp.float32), probes, args)


def dequantized_nll(
    velocity: Velocity, x_centers: jax.Array, bin_width: float, keys: jax.Array, *, args: object = None,
    t_min: float = 0.0, t_max: float = 1.0, exact: bool | None = None, rtol: float = 1e-5,
    atol: float = 1e-5, max_steps: int = 4096,
) -> jax.Array:
    """A one-sample estimate of an upper bound on the discrete NLL ``-log P(k)`` (nats per example).

    Integer levels ``k`` map to bin centres ``c_k`` (``x_centers``) in model space, with adjacent
    levels ``bin_width`` apart (``Delta``); level ``k`` owns the cube ``B_k = c_k + Delta [-1/2, 1/2)^D``.
    The cubes are disjoint, so ``P(k) = integral_{B_k} p(x) dx`` sums to at most 1 over all ``k``,
    and by Jensen's inequality (uniform dequantisation, ``u ~ U[0, 1)^D``)

        -log P(k) <= E_u[-log p(c_k + Delta (u - 1/2))] - D log Delta.

    Each call draws one ``u`` per example from its key (and the Hutchinson probe, if used), so
    the average over examples or repeated calls estimates the bound without bias.
    """
    keys = as_keys(keys, x_centers.shape[0])
    k_dequant, k_probe = split_per_example(keys, 2)
    u = jax.vmap(lambda k: jax.random.uniform(k, x_centers.shape[1:]))(k_dequant)
    x = x_centers.astype(jnp.float32) + bin_width * (u - 0.5)
    dims = math.prod(x_centers.shape[1:])
    logp = log_density(
        velocity, x, k_probe, args=args, t_min=t_min, t_max=t_max, exact=exact,
        rtol=rtol, atol=atol, max_steps=max_steps,
    )
    return -logp - dims * math.log(bin_width)
