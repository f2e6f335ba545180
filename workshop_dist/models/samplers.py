"""Samplers: ODE/SDE integrators as pure functions whose whole loop is one ``jax.lax`` loop.

Every sampler integrates a *field* ``field(x, level) -> dx/dlevel`` (``x`` is ``[B, ...]``,
``level`` a scalar: flow time ``t`` or EDM's ``sigma``) along a decreasing grid of levels,
from noise to data. Nothing leaves the device between steps, so a sampler jits as one call
and shards over the batch like any other batched function. The objectives
(:mod:`workshop_dist.models.objectives`) supply the fields and the grids.

Network evaluations (NFE) for ``N`` steps (:func:`network_evaluations`): Euler ``N``, Heun
``2N``, EDM's Heun and its stochastic variant ``2N - 1`` (the last step to ``sigma = 0`` is an
Euler step, as in EDM), Euler-Maruyama ``N``; the adaptive solver reports its own count.

Papers: EDM (Karras et al., 2022: Algorithms 1 and 2, the rho schedule); SiT (Ma et al.,
2024: the SDE with a free diffusion coefficient); diffrax (Kidger, 2021) for adaptive steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

Field = Callable[[jax.Array, jax.Array], jax.Array]

_NFE: dict[str, Callable[[int], int]] = {
    "euler": lambda n: n,
    "heun": lambda n: 2 * n,
    "edm_heun": lambda n: 2 * n - 1,
    "edm_stochastic": lambda n: 2 * n - 1,
    "euler_maruyama": lambda n: n,
}
# FSAL Runge-Kutta pairs: new field evaluations per attempted step (the first stage is the
# previous step's last), plus one evaluation at the start (measured in tests/test_samplers.py).
# diffrax's classes by name: diffrax (with equinox, optimistix, lineax) is imported only by the
# adaptive solve, which keeps it out of every process's start-up (about a third of the import).
_ADAPTIVE = {"dopri5": ("Dopri5", 6), "tsit5": ("Tsit5", 6)}
ADAPTIVE_SOLVERS = tuple(_ADAPTIVE)


def network_evaluations(sampler: str, steps: int) -> int:
    """Field evaluations of a fixed-step sampler (``euler``, ``heun``, ``edm_heun``, ``edm_stochastic``,
    ``euler_maruyama``) over ``steps`` steps."""
    if sampler not in _NFE:
        raise ValueError(f"unknown fixed-step sampler {sampler!r}; choose one of {sorted(_NFE)}")
    return _NFE[sampler](steps)


# --- grids ---------------------------------------------------------------------------------------
def shift_time(t: jax.Array, shift: float) -> jax.Array:
    """SD3's resolution shift ``s t / (1 + (s - 1) t)``: fixes 0 and 1, moves the middle towards noise for s > 1."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def uniform_grid(steps: int, t_min: float = 0.0, t_max: float = 1.0, shift: float = 1.0) -> jax.Array:
    """``steps + 1`` flow times from ``t_max`` (noise) down to ``t_min``: equally spaced, then shifted
    (:func:`shift_time`) and mapped onto ``[t_min, t_max]``."""
    return t_min + (t_max - t_min) * shift_time(jnp.linspace(1.0, 0.0, steps + 1, dtype=jnp.float32), shift)


def karras_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> jax.Array:
    """EDM's noise levels: ``steps`` values equally spaced in ``sigma^(1/rho)`` from max to min, then 0."""
    if steps == 1:
        return jnp.array([sigma_max, 0.0], jnp.float32)
    i = jnp.arange(steps, dtype=jnp.float32) / (steps - 1)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sigmas = (hi + i * (lo - hi)) ** rho
    return jnp.concatenate([sigmas, jnp.zeros((1,), jnp.float32)])


# --- deterministic ODE samplers -------------------------------------------------------------------
def euler(field: Field, x: jax.Array, levels: jax.Array) -> jax.Array:
    """First-order steps ``x += (l' - l) * field(x, l)`` over the grid ``levels``."""

    def step(i: jax.Array, x: jax.Array) -> jax.Array:
        return x + (levels[i + 1] - levels[i]) * field(x, levels[i])

    return jax.lax.fori_loop(0, levels.shape[0] - 1, step, x)


def _heun_step(field: Field, x: jax.Array, level: jax.Array, level_next: jax.Array, d: jax.Array) -> jax.Array:
    h = level_next - level
    return x + 0.5 * h * (d + field(x + h * d, level_next))


def heun(field: Field, x: jax.Array, levels: jax.Array, *, euler_last: bool = False) -> jax.Array:
    """Second-order (trapezoidal predictor-corrector) steps; ``euler_last`` ends with an Euler step,
    as EDM does for the step to ``sigma = 0`` where its field is undefined."""
    steps = levels.shape[0] - 1
    heun_steps = steps - 1 if euler_last else steps

    def step(i: jax.Array, x: jax.Array) -> jax.Array:
        return _heun_step(field, x, levels[i], levels[i + 1], field(x, levels[i]))

    x = jax.lax.fori_loop(0, heun_steps, step, x)
    if euler_last:
        x = x + (levels[-1] - levels[-2]) * field(x, levels[-2])
    return x


# --- stochastic samplers ----------------------------------------------------------------------------
def _noise(keys: jax.Array, step: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Step ``step``'s standard normals, each example's from its own key."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step), shape))(keys)


def euler_maruyama(
    drift: Field, diffusion: Callable[[jax.Array], jax.Array], x: jax.Array, levels: jax.Array, keys: jax.Array
) -> jax.Array:
    """``x += h * drift(x, l) + diffusion(l) * sqrt(|h|) * z`` along the grid, one key per example.

    The last step adds no noise (SiT's "mean" last step), so the result is the mean of the
    final transition rather than a noisy sample of it.
    """
    shape = x.shape[1:]

    def step(i: jax.Array, x: jax.Array) -> jax.Array:
        level, h = levels[i], levels[i + 1] - levels[i]
        return x + h * drift(x, level) + diffusion(level) * jnp.sqrt(jnp.abs(h)) * _noise(keys, i, shape)

    x = jax.lax.fori_loop(0, levels.shape[0] - 2, step, x)
    return x + (levels[-1] - levels[-2]) * drift(x, levels[-2])


def churn_gammas(
    sigmas: jax.Array, s_churn: float, s_min: float = 0.0, s_max: float | None = None
) -> jax.Array:
    """EDM's per-step noise increase ``gamma_i = min(S_churn / N, sqrt(2) - 1)`` where
    ``S_min <= sigma_i <= S_max``, else 0 (``N`` = steps = ``len(sigmas) - 1``)."""
    steps = sigmas.shape[0] - 1
    s_max = math.inf if s_max is None else s_max
    gamma = min(s_churn / steps, math.sqrt(2.0) - 1.0)
    current = sigmas[:-1]
    return jnp.where((current >= s_min) & (current <= s_max), gamma, 0.0).astype(jnp.float32)


def edm_stochastic(
    field: Field, x: jax.Array, sigmas: jax.Array, keys: jax.Array, *, s_churn: float = 0.0,
    s_min: float = 0.0, s_max: float | None = None, s_noise: float = 1.0,
) -> jax.Array:
    """EDM's Algorithm 2: raise the noise to ``sigma_hat = sigma (1 + gamma)`` with fresh noise
    (``S_noise`` scales it), then a Heun step to the next level (Euler for the last).

    ``field(x, sigma) = (x - D(x, sigma)) / sigma``; with ``s_churn = 0`` this is exactly
    :func:`heun` with ``euler_last=True``.
    """
    gammas = churn_gammas(sigmas, s_churn, s_min, s_max)
    steps, shape = sigmas.shape[0] - 1, x.shape[1:]

    def churn(i: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        sigma_hat = sigmas[i] * (1.0 + gammas[i])
        extra = jnp.sqrt(jnp.maximum(sigma_hat**2 - sigmas[i] ** 2, 0.0)) * s_noise
        return x + extra * _noise(keys, i, shape), sigma_hat

    def step(i: jax.Array, x: jax.Array) -> jax.Array:
        x_hat, sigma_hat = churn(i, x)
        return _heun_step(field, x_hat, sigma_hat, sigmas[i + 1], field(x_hat, sigma_hat))

    x = jax.lax.fori_loop(0, steps - 1, step, x)
    x_hat, sigma_hat = churn(jnp.asarray(steps - 1), x)
    return x_hat + (sigmas[-1] - sigma_hat) * field(x_hat, sigma_hat)


# --- adaptive ODE solver ------------------------------------------------------------------------------
def adaptive(
    field: Callable[[jax.Array, jax.Array, object], jax.Array], x: jax.Array, start: float, end: float, *,
    args: object = None, rtol: float = 1e-3, atol: float = 1e-6, solver: str = "dopri5", max_steps: int = 4096,
) -> tuple[jax.Array, jax.Array]:
    """Integrate ``field(x, level, args)`` from ``start`` to ``end`` with diffrax's error-controlled steps.

    Each example is solved with its own step sizes (``jax.vmap`` of the solve over ``x`` and the
    pytree ``args``, e.g. labels: the field sees batches of one, the batched network still runs
    once per stage on the whole batch), so a sample does not depend on its batch. Returns
    ``(x_end, nfe)``, ``nfe`` the field evaluations per example (``6 * attempted_steps + 1`` for
    the FSAL pairs ``dopri5`` / ``tsit5``).
    """
    if solver not in _ADAPTIVE:
        raise ValueError(f"unknown adaptive solver {solver!r}; choose one of {list(_ADAPTIVE)}")
    import diffrax

    solver_name, per_step = _ADAPTIVE[solver]
    solver_cls = getattr(diffrax, solver_name)

    def solve(y0: jax.Array, arg: object) -> tuple[jax.Array, jax.Array]:
        one = jax.tree.map(lambda a: a[None], arg)
        term = diffrax.ODETerm(lambda level, y, _: field(y[None], level, one)[0])
        solution = diffrax.diffeqsolve(
            term, solver_cls(), t0=start, t1=end, dt0=None, y0=y0, max_steps=max_steps,
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol), saveat=diffrax.SaveAt(t1=True),
        )
        return solution.ys[-1], per_step * solution.stats["num_steps"] + 1

    out, nfe = jax.vmap(solve)(x, args)
    return out, nfe.astype(jnp.int32)
