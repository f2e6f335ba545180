"""Post-hoc EMA maths (workshop_dist/training/posthoc_ema.py, EDM2): widths <-> exponents, the
tracked update against its closed-form weights, and least-squares reconstruction against
EMAs tracked directly on the same parameter trajectory."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from workshop_dist.training import posthoc_ema as phema


def trajectory(steps: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """A drifting, noisy parameter trajectory (two leaves, float32): params after each update."""
    rng = np.random.default_rng(seed)
    drift = np.cumsum(rng.normal(size=(steps, 6)) * 0.05, axis=0) + np.sin(np.arange(steps) / 37.0)[:, None]
    noise = rng.normal(size=(steps, 6)) * 0.3
    w = (drift + noise).astype(np.float32)
    b = (np.cos(np.arange(steps) / 23.0) + rng.normal(size=steps) * 0.2).astype(np.float32)
    return [{"w": w[i].reshape(2, 3), "b": b[i : i + 1]} for i in range(steps)]


def track(params: list[dict[str, np.ndarray]], sigma_rels: list[float], every: int):
    """Run the jitted per-step update for each width; snapshot every ``every`` steps."""
    gammas = [float(g) for g in phema.sigma_rel_to_gamma(sigma_rels)]
    update = jax.jit(phema.power_ema_update, static_argnums=3)
    emas = [jax.tree.map(jnp.asarray, params[0]) for _ in gammas]
    snapshots, steps, widths = [], [], []
    for t, p in enumerate(params, start=1):
        emas = [update(e, p, jnp.int32(t), g) for e, g in zip(emas, gammas, strict=True)]
        if t % every == 0:
            for e, s in zip(emas, sigma_rels, strict=True):
                snapshots.append(jax.tree.map(np.asarray, e))
                steps.append(t)
                widths.append(s)
    return emas, snapshots, steps, widths


def test_sigma_rel_and_gamma_are_inverse_with_edm2_values():
    # gamma = 0 is the running mean (uniform profile on [0, t]: std t / sqrt(12)); gamma = 1 by hand.
    assert phema.gamma_to_sigma_rel(0.0) == pytest.approx(1 / math.sqrt(12))
    assert phema.gamma_to_sigma_rel(1.0) == pytest.approx(math.sqrt(2 / (9 * 4)))
    # EDM2 quotes gamma = 16.97 and 6.94 for its tracked widths 0.05 and 0.10.
    np.testing.assert_allclose(phema.sigma_rel_to_gamma([0.05, 0.10]), [16.97, 6.94], atol=0.01)
    widths = np.array([0.01, 0.03, 0.07, 0.15, 0.25, phema.SIGMA_REL_MAX])
    np.testing.assert_allclose(phema.gamma_to_sigma_rel(phema.sigma_rel_to_gamma(widths)), widths, rtol=1e-10)
    for bad in (0.0, -0.1, 0.3):
        with pytest.raises(ValueError, match="sigma_rel must lie in"):
            phema.sigma_rel_to_gamma(bad)


def test_tracked_update_puts_the_closed_form_weights_on_the_trajectory():
    steps, gamma = 300, 6.94
    params = trajectory(steps)
    ema = params[0]
    for t, p in enumerate(params, start=1):
        ema = phema.power_ema_update(ema, p, t, gamma)
    weights = phema.power_ema_weights(steps, gamma)
    assert weights.sum() == pytest.approx(1.0) and np.all(weights > 0) and np.all(np.diff(weights) > 0)
    expected = phema.reconstruct(params, weights)
    for name in ("w", "b"):
        np.testing.assert_allclose(np.asarray(ema[name]), expected[name], atol=2e-5)
    # The discrete profile's relative width is the continuous one's (to O(1/t)).
    tau = np.arange(1, steps + 1) - 0.5
    mean = np.sum(weights * tau)
    width = math.sqrt(np.sum(weights * (tau - mean) ** 2)) / steps
    assert width == pytest.approx(float(phema.gamma_to_sigma_rel(gamma)), rel=0.01)
    assert float(phema.power_ema_beta(1, gamma)) == 0.0  # the first update copies the params


def test_profile_inner_products_match_numerical_integrals():
    grid = np.linspace(0.0, 500.0, 2_000_001)
    for t_a, g_a, t_b, g_b in [(300.0, 6.94, 500.0, 16.97), (500.0, 2.0, 200.0, 0.0), (400.0, 3.0, 400.0, 3.0)]:
        p_a = np.where(grid <= t_a, (g_a + 1) * grid**g_a / t_a ** (g_a + 1), 0.0)
        p_b = np.where(grid <= t_b, (g_b + 1) * grid**g_b / t_b ** (g_b + 1), 0.0)
        numeric = np.trapezoid(p_a * p_b, grid)
        assert phema.profile_inner_products(t_a, g_a, t_b, g_b) == pytest.approx(numeric, rel=1e-4)


def test_reconstructing_a_tracked_width_returns_the_tracked_ema():
    params = trajectory(400)
    emas, snapshots, steps, widths = track(params, [0.05, 0.10], every=40)
    weights = phema.reconstruction_weights(steps, widths, [0.05, 0.10])
    assert weights.shape == (20, 2)
    np.testing.assert_allclose(weights.sum(0), 1.0)
    rebuilt = phema.reconstruct(iter(snapshots), weights)  # a lazy iterable: one pass
    for got, tracked in zip(rebuilt, emas, strict=True):
        for name in ("w", "b"):
            assert got[name].dtype == np.float32
            np.testing.assert_allclose(got[name], np.asarray(tracked[name]), atol=1e-5)
    # At an earlier snapshot time, later snapshots get no weight and the snapshot comes back.
    early = phema.reconstruction_weights(steps, widths, 0.05, target_step=200)[:, 0]
    assert np.all(early[np.asarray(steps) > 200] == 0)
    index = steps.index(200) + widths[steps.index(200):].index(0.05)
    np.testing.assert_allclose(phema.reconstruct(snapshots, early)["w"], snapshots[index]["w"], atol=1e-5)


def test_a_width_between_the_tracked_ones_is_close_to_its_directly_tracked_ema():
    params = trajectory(400, seed=1)
    _, snapshots, steps, widths = track(params, [0.05, 0.10], every=40)
    direct, _, _, _ = track(params, [0.05, 0.07, 0.10], every=400)
    rebuilt = phema.reconstruct(snapshots, phema.reconstruction_weights(steps, widths, 0.07)[:, 0])
    for name in ("w", "b"):
        error = np.abs(rebuilt[name] - np.asarray(direct[1][name])).max()
        spread = np.abs(np.asarray(direct[0][name]) - np.asarray(direct[2][name])).max()  # 0.05 vs 0.10
        assert error < 0.03 * spread, (name, error, spread)


def test_bad_snapshot_lists_are_refused():
    with pytest.raises(ValueError, match="one step and one sigma_rel per snapshot"):
        phema.reconstruction_weights([10, 20], [0.05], 0.07)
    with pytest.raises(ValueError, match="no snapshot at or before step"):
        phema.reconstruction_weights([10, 20], [0.05, 0.05], 0.07, target_step=5)
    with pytest.raises(ValueError, match="snapshots for 2 weights"):
        phema.reconstruct([{"w": np.ones(2)}], np.array([0.5, 0.5]))
