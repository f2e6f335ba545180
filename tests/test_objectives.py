"""Objectives (workshop_dist/models/objectives): flow-matching paths, targets and conversions
against closed forms, time sampling, loss weightings by hand, EDM's preconditioning by hand,
per-example independence, label dropout and guidance, configs, and the ODE likelihood
(Gaussian closed form; normalisation by enumeration)."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.gaussian_toy import Gaussian
from workshop_dist.config import ConfigError
from workshop_dist.models import samplers
from workshop_dist.models.objectives import (
    EDM,
    OBJECTIVES,
    EDMConfig,
    FlowMatching,
    FlowMatchingConfig,
    create_objective,
    edm,
    flow_matching,
    likelihood,
)

PATHS = ("linear", "gvp")
PREDICTIONS = ("velocity", "noise", "data")


def keys(n: int, seed: int = 0) -> jax.Array:
    return jax.random.split(jax.random.key(seed), n)


# --- flow matching: paths, targets, conversions ----------------------------------------------------
def test_paths_match_their_closed_forms_and_the_velocity_is_the_time_derivative():
    x, eps = jnp.array([[2.0, -1.0]]), jnp.array([[0.5, 3.0]])
    t = jnp.array([0.25])
    np.testing.assert_allclose(flow_matching.interpolate("linear", x, eps, t), 0.75 * x + 0.25 * eps, rtol=1e-6)
    c, s = math.cos(math.pi / 8), math.sin(math.pi / 8)
    np.testing.assert_allclose(flow_matching.interpolate("gvp", x, eps, t), c * x + s * eps, rtol=1e-6)
    np.testing.assert_allclose(flow_matching.target_velocity("linear", x, eps, t), eps - x, rtol=1e-6)
    np.testing.assert_allclose(
        flow_matching.target_velocity("gvp", x, eps, t), math.pi / 2 * (c * eps - s * x), rtol=1e-6
    )
    for path in PATHS:
        for point in (0.0, 0.3, 0.9):
            tt = jnp.array([point])
            _, derivative = jax.jvp(lambda t, path=path: flow_matching.interpolate(path, x, eps, t), (tt,), (jnp.ones(1),))
            np.testing.assert_allclose(derivative, flow_matching.target_velocity(path, x, eps, tt), atol=1e-6)
        np.testing.assert_allclose(flow_matching.interpolate(path, x, eps, jnp.zeros(1)), x, atol=1e-7)
        np.testing.assert_allclose(flow_matching.interpolate(path, x, eps, jnp.ones(1)), eps, atol=1e-7)


@pytest.mark.parametrize("path", PATHS)
def test_each_prediction_converts_to_the_true_velocity_noise_and_data(path):
    key_x, key_e = jax.random.split(jax.random.key(1))
    x, eps = jax.random.normal(key_x, (5, 2, 2, 1)), jax.random.normal(key_e, (5, 2, 2, 1))
    t = jnp.array([0.05, 0.3, 0.5, 0.7, 0.95])
    x_t = flow_matching.interpolate(path, x, eps, t)
    truth = {"velocity": flow_matching.target_velocity(path, x, eps, t), "noise": eps, "data": x}
    for prediction in PREDICTIONS:
        views = flow_matching.convert(path, prediction, truth[prediction], x_t, t)
        for name, value in truth.items():
            np.testing.assert_allclose(views[name], value, atol=2e-5, err_msg=f"{prediction} -> {name}")


# --- flow matching: time sampling and loss weighting ---------------------------------------------------
def test_time_sampling_densities():
    k = keys(20_000)
    uniform = flow_matching.sample_time(FlowMatchingConfig(), k)
    assert float(uniform.min()) >= 0 and float(uniform.max()) <= 1 and abs(float(uniform.mean()) - 0.5) < 0.01
    logit = flow_matching.sample_time(FlowMatchingConfig(time_sampling="logit_normal", logit_mean=0.5, logit_std=0.8), k)
    z = jnp.log(logit / (1 - logit))
    assert float(z.mean()) == pytest.approx(0.5, abs=0.02) and float(z.std()) == pytest.approx(0.8, abs=0.02)
    # mode with scale 0 is the uniform draw itself; with SD3's 1.29 it is f(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u)
    np.testing.assert_allclose(flow_matching.sample_time(FlowMatchingConfig(time_sampling="mode", mode_scale=0.0), k),
                               1 - uniform, atol=1e-6)
    mode = flow_matching.sample_time(FlowMatchingConfig(time_sampling="mode"), k)
    np.testing.assert_allclose(mode, 1 - uniform - 1.29 * (jnp.cos(math.pi / 2 * uniform) ** 2 - 1 + uniform), atol=1e-6)
    middle = lambda t: float(jnp.mean(jnp.abs(t - 0.5) < 0.25))  # noqa: E731
    assert middle(mode) > middle(uniform) + 0.1  # more mass in the middle
    # shift s t / (1 + (s - 1) t): 0.5 -> 0.75 for s = 3; eps maps [0, 1] onto [eps, 1 - eps]
    np.testing.assert_allclose(samplers.shift_time(jnp.array([0.0, 0.5, 1.0]), 3.0), [0, 0.75, 1])
    shifted = flow_matching.sample_time(FlowMatchingConfig(time_shift=3.0, time_eps=0.01), k)
    np.testing.assert_allclose(shifted, 0.01 + 0.98 * 3 * uniform / (1 + 2 * uniform), atol=1e-6)


# The weight on the MSE of the network's own target, by hand for the linear path
# (alpha = 1 - t, sigma = t, det = 1; likelihood weight -dlogSNR/dt / 2 = 1 / (t (1 - t)) on the noise MSE).
HAND_WEIGHTS = {
    ("velocity", "none"): lambda t: 1.0, ("velocity", "velocity"): lambda t: 1.0,
    ("velocity", "likelihood"): lambda t: (1 - t) / t,
    ("noise", "none"): lambda t: 1.0, ("noise", "velocity"): lambda t: 1 / (1 - t) ** 2,
    ("noise", "likelihood"): lambda t: 1 / (t * (1 - t)),
    ("data", "none"): lambda t: 1.0, ("data", "velocity"): lambda t: 1 / t**2,
    ("data", "likelihood"): lambda t: (1 - t) / t**3,
}


@pytest.mark.parametrize(("prediction", "weighting"), list(HAND_WEIGHTS))
def test_loss_weightings_against_hand_formulas(prediction, weighting):
    """Data 0 makes the targets known to the network (x_t = t eps): it outputs target + delta."""
    config = FlowMatchingConfig(prediction=prediction, loss_weighting=weighting, time_eps=0.05)
    seen = {}
    delta = jnp.array([0.3, -0.2, 0.1, 0.4])

    def network(x_t, t, labels):
        seen["t"] = t
        eps = x_t / t[:, None]
        return {"velocity": eps, "noise": eps, "data": jnp.zeros_like(x_t)}[prediction] + delta

    losses = FlowMatching(config).example_losses(network, jnp.zeros((6, 4)), keys(6))
    t = np.asarray(seen["t"], np.float64)
    mse = float(jnp.mean(delta**2))
    np.testing.assert_allclose(losses["mse"], mse, rtol=1e-4)
    np.testing.assert_allclose(losses["loss"], [HAND_WEIGHTS[prediction, weighting](s) * mse for s in t], rtol=1e-4)


# --- EDM ---------------------------------------------------------------------------------------------
def test_edm_preconditioning_by_hand():
    c_skip, c_out, c_in, c_noise = edm.preconditioning(jnp.array([1.0, 2.0]), 0.5)
    np.testing.assert_allclose(c_skip, [0.25 / 1.25, 0.25 / 4.25], rtol=1e-6)
    np.testing.assert_allclose(c_out, [0.5 / math.sqrt(1.25), 1.0 / math.sqrt(4.25)], rtol=1e-6)
    np.testing.assert_allclose(c_in, [1 / math.sqrt(1.25), 1 / math.sqrt(4.25)], rtol=1e-6)
    np.testing.assert_allclose(c_noise, [0.0, math.log(2) / 4], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(edm.loss_weight(jnp.array([1.0]), 0.5), [5.0])  # = 1 / c_out^2
    # D = c_skip x + c_out F(c_in x, c_noise): F = 2 x_in + c_noise at sigma = 1, x = 1 gives
    # 0.2 + 0.4472 * (2 * 0.8944) = 0.2 + 0.8 = 1.0.
    network = lambda x_in, c, labels: 2 * x_in + c[:, None]  # noqa: E731
    denoised = EDM().denoise(network, jnp.ones((1, 1)), jnp.ones(1))
    np.testing.assert_allclose(denoised, [[1.0]], rtol=1e-6)


def test_edm_loss_is_the_plain_mse_of_the_network_against_its_effective_target():
    seen = {}

    def network(x_in, c_noise, labels):
        seen.update(x_in=x_in, c_noise=c_noise)
        return jnp.tanh(x_in)

    x = jax.random.normal(jax.random.key(3), (4_000, 3))
    losses = EDM().example_losses(network, x, keys(4_000))
    sigma = jnp.exp(4 * seen["c_noise"])
    log_sigma = jnp.log(sigma)
    assert float(log_sigma.mean()) == pytest.approx(-1.2, abs=0.06) and float(log_sigma.std()) == pytest.approx(1.2, abs=0.05)
    c_skip, c_out, c_in, _ = (c[:, None] for c in edm.preconditioning(sigma, 0.5))
    noisy = seen["x_in"] / c_in
    effective = (x - c_skip * noisy) / c_out  # lambda |D - x|^2 = |F - effective|^2 since lambda = 1 / c_out^2
    np.testing.assert_allclose(losses["loss"], jnp.mean((jnp.tanh(seen["x_in"]) - effective) ** 2, -1), rtol=2e-4)


# --- per-example randomness, labels, guidance -------------------------------------------------------------
def tiny_network(x, t, labels):
    """Nonlinear and per-example, with a class embedding (11 rows: 10 classes + null)."""
    flat = x.reshape(x.shape[0], -1)
    w = jnp.sin(jnp.arange(flat.shape[1] ** 2, dtype=jnp.float32)).reshape(flat.shape[1], -1)
    emb = jnp.cos(jnp.arange(11.0))[labels][:, None] if labels is not None else 0.0
    return jnp.tanh(flat @ w + 3 * t[:, None] + emb).reshape(x.shape)


@pytest.mark.parametrize("objective", [
    FlowMatching({"num_classes": 10, "time_sampling": "logit_normal"}),
    FlowMatching({"num_classes": 10, "prediction": "noise", "path": "gvp", "loss_weighting": "likelihood"}),
    EDM({"num_classes": 10, "label_dropout": 0.5}),
], ids=["fm_velocity", "fm_noise_gvp", "edm"])
def test_an_examples_loss_does_not_depend_on_its_batch(objective):
    """The same three examples (data, keys, labels) beside two different sets of companions."""
    data = jax.random.normal(jax.random.key(5), (9, 2, 2, 1))
    labels, k = jnp.arange(9) % 10, keys(9, seed=7)
    first, second = jnp.array([0, 1, 2, 3, 4, 5]), jnp.array([6, 0, 7, 1, 8, 2])
    losses = jax.jit(lambda d, kk, lab: objective.example_losses(tiny_network, d, kk, lab)["loss"])
    alone, together = losses(data[first], k[first], labels[first]), losses(data[second], k[second], labels[second])
    np.testing.assert_allclose(together[jnp.array([1, 3, 5])], alone[:3], rtol=1e-5)
    raw = losses(data[first], jax.random.key_data(k[first]), labels[first])
    np.testing.assert_array_equal(raw, alone)  # raw uint32 keys draw the same as typed ones
    with pytest.raises(ValueError, match="one key per example"):
        objective.example_losses(tiny_network, data[:3], k[:2], labels[:3])


def test_label_dropout_and_unconditional_models():
    seen = []
    network = lambda x, t, labels: (seen.append(labels), x)[1]  # noqa: E731
    x, labels = jnp.zeros((4_000, 1)), jnp.full((4_000,), 3)
    FlowMatching({"num_classes": 10, "label_dropout": 0.25}).example_losses(network, x, keys(4_000), labels)
    assert float(jnp.mean(seen[-1] == 10)) == pytest.approx(0.25, abs=0.02) and set(np.unique(seen[-1])) == {3, 10}
    FlowMatching({"num_classes": 10, "label_dropout": 0.0}).example_losses(network, x, keys(4_000), labels)
    assert bool(jnp.all(seen[-1] == 3))
    FlowMatching({"num_classes": 10}).example_losses(network, x, keys(4_000))  # no labels: the null class
    assert bool(jnp.all(seen[-1] == 10))
    FlowMatching().example_losses(network, x, keys(4_000), labels)
    assert seen[-1] is None  # unconditional: the network gets no labels


def test_guidance_mixes_conditional_and_unconditional_inside_the_interval():
    network = lambda x, t, labels: jnp.zeros_like(x) + (labels != 10)[:, None] * (labels + 1.0)[:, None]  # noqa: E731
    x, labels = jnp.zeros((3, 1)), jnp.array([0, 2, 4])
    t = jnp.array([0.1, 0.5, 0.9])
    plain = FlowMatching({"num_classes": 10, "guidance_scale": 3.0})
    np.testing.assert_allclose(plain.ode_velocity(network, x, t, labels)[:, 0], [3.0, 9.0, 15.0])
    np.testing.assert_allclose(plain.ode_velocity(network, x, t, labels, guidance_scale=0.0)[:, 0], [0, 0, 0])
    traced = jax.jit(lambda w: plain.ode_velocity(network, x, t, labels, guidance_scale=w))(jnp.float32(1.0))
    np.testing.assert_allclose(traced[:, 0], [1.0, 3.0, 5.0])  # a traced scale: both branches, mixed at w = 1
    interval = FlowMatching({"num_classes": 10, "guidance_scale": 3.0, "guidance_interval": (0.2, 0.6)})
    np.testing.assert_allclose(interval.ode_velocity(network, x, t, labels)[:, 0], [1.0, 9.0, 5.0])
    # EDM guides the denoiser: D_u + w (D_c - D_u) = c_skip x + c_out (F_u + w (F_c - F_u)); sigma = 1, x = 0.
    guided = EDM({"num_classes": 10, "guidance_scale": 2.0}).denoise(network, x, jnp.ones(3), labels)
    np.testing.assert_allclose(guided[:, 0], 0.5 / math.sqrt(1.25) * 2.0 * np.array([1.0, 3.0, 5.0]), rtol=1e-6)


# --- configs ------------------------------------------------------------------------------------------------
def test_configs_validate_and_describe_every_field():
    for cls in (FlowMatchingConfig, EDMConfig):
        assert all(field.description for field in cls.model_fields.values()), cls
    assert set(OBJECTIVES) == {"flow_matching", "edm"}
    assert isinstance(create_objective("edm", {"sigma_data": 0.7}).config, EDMConfig)
    bad = [
        ("flow_matching", {"predicton": "noise"}, "did you mean 'prediction'"),
        ("flow_matching", {"mode_scale": 2.0}, "mode_scale"),
        ("flow_matching", {"guidance_interval": [0.6, 0.2]}, "0 <= low < high"),
        ("edm", {"sigma_min": 90.0}, "must be below sigma_max"),
        ("diffusion3", {}, "unknown objective"),
    ]
    for name, fields, message in bad:
        with pytest.raises(ConfigError, match=message):
            create_objective(name, fields)
    with pytest.raises(ValueError, match="unknown sampler 'ddim'"):
        FlowMatching().sample(tiny_network, keys(2), (1,), sampler="ddim")
    assert EDM().network_evaluations() == 35  # EDM's 18 Heun steps: 35 evaluations, as in the paper
    assert FlowMatching().network_evaluations("adaptive") is None


# --- likelihood -----------------------------------------------------------------------------------------------
CORRELATED = Gaussian([0.5, -1.0, 0.2], [[1.0, 0.6, 0.2], [0.6, 0.8, -0.1], [0.2, -0.1, 0.5]])


def test_ode_log_density_of_a_gaussian_matches_the_closed_form():
    x = jax.random.normal(jax.random.key(2), (6, 3)) * 1.5
    x1 = jnp.repeat(x[:1], 256, axis=0)

    # One path suffices: the likelihood sees only a velocity field (each diffrax solve costs a ~2 s compile).
    velocity = lambda x, t, args: CORRELATED.flow_views("gvp", x, jnp.full((x.shape[0],), t))["velocity"]  # noqa: E731
    exact, estimates = jax.jit(lambda x, x1, k: (
        likelihood.log_density(velocity, x, exact=True), likelihood.log_density(velocity, x1, k, exact=False),
    ))(x, x1, keys(256))
    np.testing.assert_allclose(exact, CORRELATED.log_density(x), atol=2e-3)
    # Hutchinson: one probe is off (the Jacobian is not diagonal), the average over 256 probes is not.
    assert float(estimates.std()) > 0.01
    truth = float(CORRELATED.log_density(x[:1])[0])
    assert float(estimates.mean()) == pytest.approx(truth, abs=3 * float(estimates.std()) / 16 + 2e-3)


def test_dequantized_bound_normalises_over_all_levels():
    """2 dims x 13 levels (bin width 0.5, centres -3..3) under the exact N(0, I) flow.

    exp(-bound) summed over all 169 level pairs is at most 1 (the bound), and close to it:
    the cubes hold 0.995 of the mass, Jensen's gap costs Delta^2 / 24 nats per dim, so the
    exact bound (closed form: E_u of the Gaussian's quadratic) sums to 0.977.
    """
    standard = Gaussian([0.0, 0.0], np.eye(2))
    objective = FlowMatching()
    levels = np.array(list(itertools.product(range(13), repeat=2)), np.float32)
    centres = jnp.asarray(np.repeat(levels, 16, axis=0) * 0.5 - 3.0)  # 16 dequantisation draws per pair
    nll = objective.nll(standard.flow_network("linear", "velocity"), centres, 0.5, keys(centres.shape[0]))
    bound = np.asarray(nll).reshape(169, 16).mean(1)
    total = float(np.exp(-bound).sum())
    closed = -standard.log_density(centres[::16]) + 2 * 0.5**2 / 24 - 2 * math.log(0.5)  # E_u of the quadratic
    closed_total = float(np.exp(-closed).sum())
    assert 0.95 < closed_total < 1.0
    # 16 draws per pair leave ~0.005 of Monte-Carlo spread in the estimated total
    assert total <= 1.0 and total == pytest.approx(closed_total, abs=0.02)
