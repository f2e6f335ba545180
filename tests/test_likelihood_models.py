"""Likelihood families (issue 10): PixelCNN, RealNVP flow, VAE with discrete decoders.

Each family's likelihood is checked to be a normalised distribution where it is small enough to
enumerate (2x2 images with 3 levels: 81 images), the PixelCNN's causality pixel by pixel, the
flow's log-determinant against a numerical Jacobian, and the IWAE bound against the exact
marginal likelihood of a VAE with a one-dimensional latent (quadrature).
"""

from __future__ import annotations

import itertools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from workshop_dist.models import DataSpec, ExampleKeys, ModelConfiguration, create_model
from workshop_dist.models.flow import RealNVP
from workshop_dist.models.pixelcnn import PixelCNN
from workshop_dist.models.vae import VAE, discretized_logistic_log_prob
from workshop_dist.parallel import MeshConfiguration, make_mesh, parameter_shardings

LEVELS = 3
ALL_2X2 = jnp.asarray(list(itertools.product(range(LEVELS), repeat=4)), jnp.int32).reshape(-1, 2, 2, 1)


def _pixelcnn(shape=(8, 8, 1), num_levels=17, **params) -> PixelCNN:
    params = {"channels": 8, "num_layers": 3, "kernel_size": 3, "output_channels": 8, **params}
    config = ModelConfiguration(model_class="pixelcnn", input_dim=shape, parameters=params, data=DataSpec(num_levels=num_levels))
    return create_model(config, rngs=0)


def _flow(shape=(8, 8, 1), num_levels=17, **params) -> RealNVP:
    params = {"channels": 8, "num_blocks": 1, "full_couplings": 2, "squeezed_couplings": 4, **params}
    config = ModelConfiguration(model_class="flow", input_dim=shape, parameters=params, data=DataSpec(num_levels=num_levels))
    return create_model(config, rngs=0)


def _vae(model_class="vae", shape=(8, 8, 1), hidden=(16,), latent=4, num_levels=17, **params) -> VAE:
    config = ModelConfiguration(
        model_class=model_class, input_dim=shape, hidden_dims=list(hidden), output_dim=latent, parameters=params,
        data=DataSpec(num_levels=num_levels),
    )
    return create_model(config, rngs=0)


def _perturb(model: nnx.Module, scale: float = 0.3, seed: int = 1) -> None:
    """Random parameters everywhere (the flow's couplings start as the identity)."""
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [leaf + scale * jax.random.normal(key, leaf.shape) for leaf, key in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, noisy))


def _digits(count: int = 16) -> dict[str, jax.Array]:
    from workshop_dist.data.digits import load_digits_split

    data = load_digits_split("train")
    return {"image": jnp.asarray(data["image"][:count], jnp.int32), "label": jnp.asarray(data["label"][:count], jnp.int32)}


# --- Shapes and samples -------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: _pixelcnn(), marks=pytest.mark.slow),
        pytest.param(lambda: _pixelcnn(num_classes=10), marks=pytest.mark.slow),  # over 10 s on 2 cores
        pytest.param(lambda: _flow(), marks=pytest.mark.slow),
        pytest.param(lambda: _flow(network="mlp", dequantization="variational"), marks=pytest.mark.slow),
        lambda: _vae(likelihood="categorical"),
        lambda: _vae(likelihood="discretized_logistic"),
        pytest.param(lambda: _vae("conv_vae", hidden=(8,), likelihood="categorical"), marks=pytest.mark.slow),
    ],
    ids=["pixelcnn", "pixelcnn_cond", "flow", "flow_mlp_vardeq", "vae_cat", "vae_logistic", "conv_vae_cat"],
)
def test_per_example_losses_nll_and_samples(build) -> None:
    model = build()
    batch = _digits(5)
    losses = model.example_losses(batch, jax.random.key(0))
    assert losses["loss"].shape == (5,) and losses["bits_per_dim"].shape == (5,)
    np.testing.assert_allclose(losses["bits_per_dim"], losses["loss"] / (64 * math.log(2)), rtol=1e-5)
    nll = model.nll(batch, jax.random.key(1), num_samples=3)
    assert nll.shape == (5,) and bool(jnp.all(jnp.isfinite(nll)))
    samples = model.sample(jax.random.key(2), 6)
    assert samples.shape == (6, 8, 8, 1) and samples.dtype == jnp.float32
    assert float(samples.min()) >= 0 and float(samples.max()) <= 16
    np.testing.assert_array_equal(samples, jnp.round(samples))  # levels


def test_bernoulli_vae_default_unchanged() -> None:
    """The packaged default (Bernoulli on [0, 1]) keeps its parameter shapes and metric names."""
    model = _vae(hidden=(32, 16))
    assert model.output.kernel.shape == (32, 64)
    batch = {"image": _digits(4)["image"].astype(jnp.float32) / 16}
    losses = model.example_losses(batch, jax.random.key(0))
    assert set(losses) == {"loss", "reconstruction", "kl", "elbo"}
    samples = model.sample(jax.random.key(0), 3)
    assert samples.shape == (3, 8, 8, 1) and float(samples.min()) > 0 and float(samples.max()) < 1


def test_parameters_are_validated() -> None:
    from workshop_dist.config import ConfigError

    with pytest.raises(ConfigError, match="likelihood"):
        _vae(likelihood="gaussian")
    with pytest.raises(ConfigError, match="kernel_size"):
        _pixelcnn(kernel_size=4)
    with pytest.raises(ConfigError, match="even"):
        _flow(shape=(5, 5, 1))


# --- PixelCNN -------------------------------------------------------------------------------


@pytest.mark.slow
def test_pixelcnn_is_causal_without_blind_spot() -> None:
    """d logits[i] / d x[j] is zero exactly for j >= i (raster order) and nonzero for every j < i."""
    model = _pixelcnn((4, 4, 1), num_layers=4)
    _perturb(model, 0.1)
    x = jax.random.uniform(jax.random.key(0), (4, 4, 1), maxval=2.0)
    per_pixel = jax.jit(jax.jacrev(lambda image: model.logits(image[None]).sum(-1).reshape(16)))(x)
    jacobian = np.abs(np.asarray(per_pixel).reshape(16, 16))  # [output pixel, input pixel], raster order
    for i in range(16):
        assert jacobian[i, i:].max() == 0.0, f"pixel {i} sees pixels >= {i}: {jacobian[i]}"
        assert i == 0 or jacobian[i, :i].min() > 0, f"pixel {i} misses earlier pixels: {jacobian[i]}"


@pytest.mark.slow  # sums over every 8x8 image of a few levels
@pytest.mark.parametrize("num_classes", [0, 2])
def test_pixelcnn_probabilities_sum_to_one_over_all_images(num_classes: int) -> None:
    model = _pixelcnn((2, 2, 1), num_levels=LEVELS, num_classes=num_classes)
    _perturb(model, 0.2)
    for label in range(max(num_classes, 1)):
        batch = {"image": ALL_2X2, "label": jnp.full((len(ALL_2X2),), label, jnp.int32)}
        total = jnp.exp(-model.nll(batch, jax.random.key(0))).sum()
        np.testing.assert_allclose(total, 1.0, rtol=1e-5)


# --- Flow ----------------------------------------------------------------------------------


@pytest.mark.parametrize("network", [pytest.param("conv", marks=pytest.mark.slow), "mlp"])
def test_flow_log_det_matches_numerical_jacobian_and_inverts(network: str) -> None:
    model = _flow((4, 4, 1), num_levels=17, network=network)
    _perturb(model, 0.1)
    v = jax.random.uniform(jax.random.key(0), (1, 4, 4, 1), minval=0.5, maxval=16.5)
    z, log_det = model.forward(v)
    jacobian = jax.jit(jax.jacfwd(lambda flat: model.forward(flat.reshape(1, 4, 4, 1))[0].reshape(-1)))(v.reshape(-1))
    np.testing.assert_allclose(jnp.linalg.slogdet(jacobian)[1], log_det[0], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(model.inverse(z), v, atol=1e-3)


@pytest.mark.slow
def test_variational_dequantizer_density_matches_its_jacobian() -> None:
    """log q(u | x) = log N(eps) - log|det du/deps| for the conditional flow u = g(eps; x)."""
    model = _flow((4, 4, 1), dequantization="variational")
    _perturb(model, 0.1)
    x = jnp.asarray(np.random.default_rng(0).integers(0, 17, (1, 4, 4, 1)), jnp.float32)
    key = jax.random.key(3)
    u, log_q = model.dequantize(x, key)
    eps = ExampleKeys.of(key, 1).normal(x.shape[1:])  # each example's noise comes from its own key
    np.testing.assert_allclose(model.dequantize_noise(x, eps)[0], u)

    def g(flat_eps: jax.Array) -> jax.Array:
        return model.dequantize_noise(x, flat_eps.reshape(x.shape))[0].reshape(-1)

    jacobian = jax.jit(jax.jacfwd(g))(eps.reshape(-1))
    expected = -0.5 * (eps**2 + math.log(2 * math.pi)).sum() - jnp.linalg.slogdet(jacobian)[1]
    np.testing.assert_allclose(log_q[0], expected, rtol=1e-4, atol=1e-3)
    assert float(u.min()) > 0 and float(u.max()) < 1


@pytest.mark.slow
def test_flow_discrete_probabilities_sum_to_one() -> None:
    """exp(-nll) with K samples is an unbiased estimate of P(x), the integral of p_V over x's cell, so
    its sum over all 81 images estimates the flow's mass on (0, L)^D: 1 up to the Gaussian tails the
    logit preprocessing cuts off (tiny with a small alpha). Leaving out the 1/L Jacobian would give
    81, a wrong logit Jacobian something far from 1 as well."""
    model = _flow((2, 2, 1), num_levels=LEVELS, alpha=1e-3)
    _perturb(model, 0.05)
    per_image = jnp.exp(-model.nll({"image": ALL_2X2}, jax.random.key(0), num_samples=1024))
    np.testing.assert_allclose(float(per_image.sum()), 1.0, atol=0.03)
    # with a learned q(u | x) (its density is checked above) the bounds still sum to at most 1
    model = _flow((2, 2, 1), num_levels=LEVELS, alpha=1e-3, dequantization="variational", network="mlp")
    _perturb(model, 0.05)
    bounds = jnp.exp(-model.nll({"image": ALL_2X2}, jax.random.key(0), num_samples=256))
    assert 0.5 < float(bounds.sum()) < 1.03


# --- VAE -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_discrete_decoders_are_normalised_per_pixel() -> None:
    levels = jnp.arange(17)
    mu = jax.random.normal(jax.random.key(0), (5, 1)) * 1.5
    log_scale = jax.random.normal(jax.random.key(1), (5, 1)) - 2.0
    probs = jnp.exp(discretized_logistic_log_prob(mu, log_scale, levels[None, :], 17))
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    for likelihood in ("categorical", "discretized_logistic"):
        model = _vae(shape=(1, 1, 1), latent=2, likelihood=likelihood, num_levels=17)
        outputs = model.decode(jax.random.normal(jax.random.key(2), (3, 2)))
        log_p = jnp.stack([model.log_likelihood(outputs, jnp.full((3, 1, 1, 1), k)) for k in range(17)])
        np.testing.assert_allclose(jnp.exp(log_p).sum(0), 1.0, rtol=1e-5)


@pytest.mark.slow  # compiles an importance-weighted bound per likelihood
@pytest.mark.parametrize("likelihood", ["categorical", "discretized_logistic"])
def test_iwae_bound_tightens_towards_exact_likelihood(likelihood: str) -> None:
    """A 1-d latent makes log p(x) computable by quadrature: the IWAE bound is <= it on average,
    increases with K, K=1 averages to the ELBO, and the exact p(x) sums to one over all images."""
    model = _vae(shape=(2, 2, 1), hidden=(16,), latent=1, likelihood=likelihood, num_levels=LEVELS)
    _perturb(model, 0.2)
    batch = {"image": ALL_2X2}
    grid = jnp.linspace(-9.0, 9.0, 4001)
    outputs = model.decode(grid[:, None])
    log_px_given_z = jax.vmap(lambda out: model.log_likelihood(jnp.broadcast_to(out, (81, *out.shape[1:])), ALL_2X2))(
        outputs[:, None]
    )  # [grid, 81]
    log_prior = -0.5 * (grid**2 + math.log(2 * math.pi))
    exact = jax.nn.logsumexp(log_px_given_z + log_prior[:, None], axis=0) + jnp.log(grid[1] - grid[0])
    np.testing.assert_allclose(jnp.exp(exact).sum(), 1.0, rtol=1e-3)

    def bounds(k: int, repeats: int) -> jax.Array:
        keys = jax.random.split(jax.random.key(k), repeats)
        return jax.vmap(lambda key: -model.nll(batch, key, num_samples=k))(keys)  # [repeats, 81]

    b1_draws = bounds(1, 400)
    elbo_draws = jax.vmap(lambda key: model.example_losses(batch, key)["elbo"])(jax.random.split(jax.random.key(9), 400))
    # K=1 is a one-sample ELBO: same expectation as the ELBO with the analytic KL (within 4 standard errors)
    difference = float(b1_draws.mean() - elbo_draws.mean())
    stderr = math.sqrt(float(b1_draws.mean(1).var() + elbo_draws.mean(1).var()) / 400)
    assert abs(difference) < 4 * stderr + 1e-4, (difference, stderr)
    b1, b10, b200 = b1_draws.mean(0), bounds(10, 100).mean(0), bounds(200, 8).mean(0)
    assert float(b1.mean()) < float(b10.mean()) < float(b200.mean()) <= float(exact.mean()) + 1e-3
    assert float((exact - b200).mean()) < 0.25 * float((exact - b1).mean())


# --- Sharding and training -----------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: _pixelcnn(channels=32, output_channels=64),
        pytest.param(lambda: _flow(channels=32, dequantization="variational"), marks=pytest.mark.slow),  # conv couplings: 10+ s
        lambda: _flow(network="mlp", channels=64),
        lambda: _vae(hidden=(64,), likelihood="categorical"),
    ],
    ids=["pixelcnn", "flow", "flow_mlp", "vae"],
)
def test_large_parameters_are_sharded_over_fsdp(build) -> None:
    mesh_config = MeshConfiguration(data=1, fsdp=8, tensor=1)
    mesh = make_mesh(mesh_config)
    params_state = nnx.state(build(), nnx.Param)
    params = nnx.to_pure_dict(params_state)
    logical = nnx.to_pure_dict(nnx.get_partition_spec(params_state))
    shardings = parameter_shardings(params, logical, mesh, mesh_config)
    large = [
        (jax.tree_util.keystr(path), sharding)
        for (path, value), sharding in zip(jax.tree.leaves_with_path(params), jax.tree.leaves(shardings), strict=True)
        if value.size >= mesh_config.fsdp_min_size
    ]
    assert large
    for name, sharding in large:
        assert "fsdp" in sharding.spec, f"{name} is not sharded: {sharding.spec}"
    # every parameter carries logical axis names
    assert all(spec is not None for spec in jax.tree.leaves(logical, is_leaf=lambda s: s is None))


@pytest.mark.slow
@pytest.mark.parametrize(
    "build",
    [
        lambda: _pixelcnn(),
        lambda: _flow(network="mlp", channels=32),
        lambda: _vae(hidden=(64,), likelihood="discretized_logistic"),
    ],
    ids=["pixelcnn", "flow", "vae"],
)
def test_short_optax_loop_lowers_the_loss(build) -> None:
    started = time.monotonic()
    model = build()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(3e-3)
    opt_state = tx.init(params)
    batch = _digits(64)

    def loss_fn(p, key):
        return nnx.merge(graphdef, p, rest).loss(batch, key, step=jnp.int32(0))[0]

    @jax.jit
    def step(p, o, key):
        loss, grads = jax.value_and_grad(loss_fn)(p, key)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    losses = []
    for i in range(40):
        params, opt_state, loss = step(params, opt_state, jax.random.key(i))
        losses.append(float(loss))
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:3]), losses
    assert time.monotonic() - started < 60
