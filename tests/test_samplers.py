"""Samplers (workshop_dist/models/samplers.py) and the objectives' ``sample``: schedules and one
step by hand, convergence on Gaussian data where the exact ODE map is known (Heun converges
faster than Euler, the adaptive solver matches the exact solution), the SDE and EDM's churn
reproduce the data's moments, the reported network evaluations equal the counted ones, and
a sample does not depend on its batch."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.gaussian_toy import Gaussian
from workshop_dist.models import samplers
from workshop_dist.models.objectives import EDM, FlowMatching
from workshop_dist.models.objectives.base import normal_per_example, split_per_example

TOY = Gaussian([1.5, -0.5], [[0.25, 0.1], [0.1, 0.5]])


def keys(n: int, seed: int = 0) -> jax.Array:
    return jax.random.split(jax.random.key(seed), n)


def initial_noise(k: jax.Array) -> jax.Array:
    """The noise ``sample`` starts from for these keys (its first per-example stream)."""
    return normal_per_example(split_per_example(k, 2)[0], (2,))


# --- schedules and single steps by hand ------------------------------------------------------------
def test_karras_schedule_and_churn_by_hand():
    lo, hi = 0.002 ** (1 / 7), 80 ** (1 / 7)
    np.testing.assert_allclose(samplers.karras_sigmas(3), [80.0, ((lo + hi) / 2) ** 7, 0.002, 0.0], rtol=1e-5)
    np.testing.assert_allclose(samplers.karras_sigmas(1, sigma_max=5.0), [5.0, 0.0])
    sigmas = jnp.array([80.0, 10.0, 1.0, 0.1, 0.0])
    # gamma = min(S_churn / N, sqrt(2) - 1) inside [S_min, S_max]: 1 / 4 here, 40 / 4 is capped
    np.testing.assert_allclose(samplers.churn_gammas(sigmas, 1.0, s_min=0.5, s_max=20.0), [0, 0.25, 0.25, 0])
    np.testing.assert_allclose(samplers.churn_gammas(sigmas, 40.0), [math.sqrt(2) - 1] * 4, rtol=1e-6)
    np.testing.assert_allclose(samplers.uniform_grid(4, 0.1, 0.9), [0.9, 0.7, 0.5, 0.3, 0.1], rtol=1e-6)


def test_one_euler_and_one_heun_step_by_hand():
    field = lambda x, s: 0.5 * x / s  # noqa: E731  # D(x, sigma) = x / 2
    x, levels = jnp.ones((1, 1)), jnp.array([2.0, 1.0])
    # Euler: 1 + (1 - 2) * 0.25 = 0.75; Heun: d' = 0.5 * 0.75 / 1 = 0.375, 1 - (0.25 + 0.375) / 2 = 0.6875
    np.testing.assert_allclose(samplers.euler(field, x, levels), [[0.75]])
    np.testing.assert_allclose(samplers.heun(field, x, levels), [[0.6875]])
    # Heun to sigma = 0 ends with an Euler step: 0.6875 - 1 * 0.5 * 0.6875 / 1 = 0.34375
    np.testing.assert_allclose(samplers.heun(field, x, jnp.array([2.0, 1.0, 0.0]), euler_last=True), [[0.34375]])


# --- convergence on Gaussian data -----------------------------------------------------------------------
# Each test jits all its sampler runs into one call: XLA's compile is what costs (about 1.5 s of
# CPU per loop compiled alone), one compile with several loops costs little more than one.
def sweep(objective, network, k, runs):
    """``{(sampler, steps): samples}`` for all ``runs`` in one jitted call."""
    fn = jax.jit(lambda k: {run: objective.sample(network, k, (2,), sampler=run[0], steps=run[1]).x for run in runs})
    return fn(k)


def decreasing(values: list[float]) -> bool:
    return all(a > b for a, b in itertools.pairwise(values))


def max_errors(samples, exact, sampler, steps):
    return [float(jnp.abs(samples[sampler, n] - exact).max()) for n in steps]


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_flow_ode_samplers_converge_to_the_exact_transport(path):
    k, steps = keys(256), (8, 16, 32)
    samples = sweep(FlowMatching({"path": path}), TOY.flow_network(path, "velocity"), k,
                    [(s, n) for s in ("euler", "heun") for n in steps])
    exact = TOY.transport(initial_noise(k))
    euler, heun = max_errors(samples, exact, "euler", steps), max_errors(samples, exact, "heun", steps)
    assert decreasing(euler) and decreasing(heun)
    assert all(h < e / 4 for h, e in zip(heun, euler, strict=True))
    assert 1.7 < euler[1] / euler[2] < 2.3  # first order: halves with each doubling
    assert heun[1] / heun[2] > 3.0  # second order: quarters
    assert heun[2] < 3e-3
    # ... and the samples' mean and covariance approach the data's.
    out = samples["heun", 32]
    np.testing.assert_allclose(out.mean(0), exact.mean(0), atol=1e-3)
    np.testing.assert_allclose(jnp.cov(out.T), jnp.cov(exact.T), atol=2e-3)
    assert float(jnp.abs(exact.mean(0) - TOY.mu).max()) < 0.1  # the noise itself: 256 samples


def test_adaptive_solver_matches_the_exact_solution_and_counts_its_evaluations():
    velocity = FlowMatching({"rtol": 1e-6, "atol": 1e-6})
    count = {"calls": 0}

    def network(x, t, labels):
        jax.debug.callback(lambda: count.__setitem__("calls", count["calls"] + 1))
        return TOY.flow_views("linear", x, t)["velocity"]

    k = keys(1)
    one = jax.jit(lambda k: velocity.sample(network, k, (2,), sampler="adaptive"))(k)
    np.testing.assert_allclose(one.x, TOY.transport(initial_noise(k)), atol=2e-5)
    assert int(one.nfe[0]) == count["calls"] > 10


def test_edm_heun_converges_faster_than_euler_to_the_exact_solution():
    k, steps = keys(256), (16, 32, 64)
    runs = [(s, n) for s in ("euler", "heun") for n in steps] + [("stochastic", 32)]
    samples = sweep(EDM(), TOY.edm_network(0.5), k, runs)
    exact = TOY.edm_transport(80.0 * initial_noise(k), 80.0)
    euler, heun = max_errors(samples, exact, "euler", steps), max_errors(samples, exact, "heun", steps)
    assert decreasing(euler) and decreasing(heun)
    assert all(h < e for h, e in zip(heun, euler, strict=True))  # from 16 steps on (at 8, sigma_max = 80 is one huge step)
    assert 1.7 < euler[1] / euler[2] < 2.3 and heun[1] / heun[2] > 3.0
    # With no churn the stochastic sampler is the deterministic one (up to float32 rounding, which
    # the step to sigma_min = 0.002 amplifies by ~h / sigma_min; the samples themselves are O(1)).
    np.testing.assert_allclose(samples["stochastic", 32], samples["heun", 32], atol=2e-3)


def moments_close(out: jax.Array, atol_mean: float, atol_cov: float) -> None:
    np.testing.assert_allclose(out.mean(0), TOY.mu, atol=atol_mean)
    np.testing.assert_allclose(jnp.cov(out.T), TOY.cov, atol=atol_cov)


def test_stochastic_samplers_reproduce_the_data_moments():
    k = keys(4_000, seed=3)
    velocity = TOY.flow_network("linear", "velocity")
    sde = FlowMatching({"sampler": "sde"})
    # Churn adds O(1/N) error of its own (EDM section 4): at 32 steps the variance is 12% high, at 128 3%.
    # (Measured when this test was written; only the 128-step run is kept: each loop costs a compile.)
    churn = EDM({"sampler": "stochastic", "s_churn": 40.0, "s_min": 0.05, "s_max": 50.0})
    out = jax.jit(lambda k: {
        "sde": sde.sample(velocity, k, (2,), steps=100).x,
        "fine": churn.sample(TOY.edm_network(0.5), k, (2,), steps=128).x,
    })(k)
    # 4000 samples: the standard error of the mean is ~0.01, of the covariance ~0.01
    moments_close(out["sde"], 0.04, 0.04)
    assert float(jnp.abs(out["sde"] - TOY.transport(initial_noise(k))).mean()) > 0.1  # not the ODE's map
    moments_close(out["fine"], 0.04, 0.04)


# --- network evaluations and batch independence --------------------------------------------------------------
NFE_CASES = [
    (FlowMatching(), "euler", 5, 5), (FlowMatching(), "heun", 5, 10), (FlowMatching(), "sde", 5, 5),
    (EDM(), "heun", 5, 9), (EDM(), "euler", 5, 5), (EDM({"s_churn": 5.0}), "stochastic", 5, 9),
    (FlowMatching({"num_classes": 3, "guidance_scale": 2.0}), "heun", 3, 6),
]


def test_reported_network_evaluations_are_the_counted_ones():
    calls: list[list[int]] = [[] for _ in NFE_CASES]

    def counting(case: int):
        def network(x, t, labels):
            jax.debug.callback(lambda n: calls[case].append(int(n)), x.shape[0])
            return jnp.zeros_like(x) + 0.1 * x

        return network

    results = jax.jit(lambda k: [
        objective.sample(counting(i), k, (2,), jnp.array([0, 1]), sampler=sampler, steps=steps)
        for i, (objective, sampler, steps, _) in enumerate(NFE_CASES)
    ])(keys(2))
    for (objective, sampler, steps, expected), result, seen in zip(NFE_CASES, results, calls, strict=True):
        assert objective.network_evaluations(sampler, steps) == expected == len(seen), (objective, sampler)
        np.testing.assert_array_equal(result.nfe, [expected, expected])
        guided = objective.config.num_classes and objective.config.guidance_scale != 1.0
        assert set(seen) == {4 if guided else 2}  # a guided evaluation is one call on both branches


def test_a_sample_does_not_depend_on_its_batch():
    objectives = [
        FlowMatching({"sampler": "sde", "num_classes": 4, "guidance_scale": 2.5, "guidance_interval": (0.1, 0.8)}),
        FlowMatching({"sampler": "adaptive", "prediction": "noise"}),
        EDM({"sampler": "stochastic", "s_churn": 10.0, "num_classes": 4, "guidance_scale": 1.5}),
    ]

    def network(x, t, labels):
        emb = 0.1 * labels[:, None] if labels is not None else 0.0
        return jnp.tanh(x @ jnp.array([[0.5, -0.3], [0.2, 0.8]]) + t[:, None] + emb)

    # The same three examples (keys, labels) beside two different sets of companions.
    k, labels = keys(9, seed=4), jnp.array([0, 1, 2, 3, 0, 1, 3, 2, 2])
    first, second = jnp.array([0, 1, 2, 3, 4, 5]), jnp.array([6, 0, 7, 1, 8, 2])
    run = jax.jit(lambda k, lab: [o.sample(network, k, (2,), lab, steps=6) for o in objectives])
    a, b = run(k[first], labels[first]), run(k[second], labels[second])
    for objective, one, two in zip(objectives, a, b, strict=True):
        np.testing.assert_allclose(two.x[jnp.array([1, 3, 5])], one.x[:3], rtol=1e-5, atol=1e-6, err_msg=str(objective.config))
        np.testing.assert_array_equal(two.nfe[jnp.array([1, 3, 5])], one.nfe[:3])
