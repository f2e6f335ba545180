"""Diffusion family (models/diffusion.py, unet.py, dit.py): schedules, parameterisations,
per-example losses, samplers and guidance, the likelihood bound, tensor-parallel sharding
of the DiT, rematerialisation, a short training run, and the shipped configs."""

from __future__ import annotations

import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from workshop_dist import parallel
from workshop_dist.config import ConfigError
from workshop_dist.data.digits import load_digits_split
from workshop_dist.models import ModelConfiguration, create_model
from workshop_dist.models.diffusion import alpha_sigma, from_eps, from_v, gamma_schedule, v_target

REPO = Path(__file__).resolve().parents[1]
UNIFORM_NATS = 64 * math.log(17)  # 181.3: uniform over 17 levels on 8x8 pixels

TINY = {
    "ddpm_unet": {"widths": [8, 16], "attention_heads": 2},
    "dit": {"hidden_size": 32, "depth": 2, "num_heads": 4, "mlp_ratio": 2.0},
}


def build(kind: str, seed: int = 0, remat: str = "none", **parameters) -> nnx.Module:
    config = ModelConfiguration(
        model_class=kind, input_dim=(8, 8, 1), remat=remat, parameters={**TINY[kind], **parameters}
    )
    return create_model(config, rngs=nnx.Rngs(seed))


def digits_batch(size: int = 8, split: str = "train") -> dict[str, jax.Array]:
    data = load_digits_split(split)
    return {"image": jnp.asarray(data["image"][:size]), "label": jnp.asarray(data["label"][:size], jnp.int32)}


def loss_and_grads(model: nnx.Module, batch: dict[str, jax.Array], key: jax.Array):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def f(p):
        return nnx.merge(graphdef, p, rest).loss(batch, key)[0]

    return jax.jit(jax.value_and_grad(f))(params)


# --- schedules and parameterisations -------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_monotone_with_ddpm_endpoints(schedule):
    t = jnp.linspace(0.0, 1.0, 2001)
    gamma = gamma_schedule(schedule, t, 1000)
    alpha_bar = jax.nn.sigmoid(-gamma)
    assert np.all(np.diff(np.asarray(gamma)) >= 0) and np.all(np.diff(np.asarray(alpha_bar)) <= 0)
    assert np.all(np.isfinite(np.asarray(gamma)))
    assert 1 - float(alpha_bar[0]) < 3e-4  # t=0 is DDPM's first step: almost no noise
    assert float(alpha_bar[-1]) < 1e-4  # t=1: almost pure noise
    if schedule == "linear":  # DDPM's first beta is 1e-4
        np.testing.assert_allclose(1 - float(alpha_bar[0]), 1.1e-4, rtol=0.05)


def test_eps_v_conversions_are_consistent():
    kx, ke, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.uniform(kx, (16, 8), minval=-1, maxval=1)
    eps = jax.random.normal(ke, x.shape)
    alpha, sigma = alpha_sigma(jax.random.uniform(kg, (16, 1), minval=-8, maxval=8))
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-6)
    z = alpha * x + sigma * eps
    np.testing.assert_allclose(from_eps(z, eps, alpha, sigma), x, atol=1e-3)
    x_v, eps_v = from_v(z, v_target(x, eps, alpha, sigma), alpha, sigma)
    np.testing.assert_allclose(x_v, x, atol=1e-5)
    np.testing.assert_allclose(eps_v, eps, atol=1e-5)


# --- the contract ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind, parameters",
    [
        pytest.param("ddpm_unet", {"prediction": "eps", "loss": "simple", "schedule": "linear"}, marks=pytest.mark.slow),
        ("dit", {"prediction": "v", "loss": "simple", "num_classes": 10}),
        ("dit", {"prediction": "levels", "num_classes": 10}),
    ],
)
def test_per_example_losses_do_not_depend_on_other_examples(kind, parameters):
    model = build(kind, **parameters)
    model.eval()
    batch = digits_batch(6)
    other = {key: value.at[3:].set(value[::-1][3:]) for key, value in batch.items()}
    losses = jax.jit(lambda b: model.example_losses(b, jax.random.key(1)))
    first, second = losses(batch), losses(other)
    assert {"loss", "vlb", "diffusion", "prior", "reconstruction", "mse"} <= set(first)
    for name, value in first.items():
        assert value.shape == (6,), name
        assert np.all(np.isfinite(np.asarray(value))), name
        np.testing.assert_allclose(value[:3], second[name][:3], rtol=1e-5, atol=1e-5, err_msg=name)


def test_bad_parameters_are_config_errors():
    with pytest.raises(ConfigError, match="prediction"):
        build("dit", prediction="x0")
    with pytest.raises(ConfigError, match="divisible"):
        build("ddpm_unet", widths=[8, 8, 8, 8, 8])


# the U-Net's convolutions inside the sampling loop compile slowly on XLA:CPU: its case is slow
@pytest.mark.parametrize("kind, sampler", [pytest.param("ddpm_unet", "ddpm", marks=pytest.mark.slow), ("dit", "ddim")])
def test_samplers_return_levels(kind, sampler):
    model = build(kind, num_classes=10)
    model.eval()
    graphdef, state = nnx.split(model)  # the weights as arguments: XLA would fold constants for a long time
    draw = jax.jit(lambda state, key: nnx.merge(graphdef, state).sample(
        key, 5, labels=jnp.arange(5), sampler=sampler, sampling_steps=3))
    images = np.asarray(draw(state, jax.random.key(0)))
    assert images.shape == (5, 8, 8, 1)
    assert images.min() >= 0 and images.max() <= 16 and np.array_equal(images, np.round(images))
    np.testing.assert_array_equal(images, draw(state, jax.random.key(0)))  # all randomness comes from the key


@pytest.mark.slow  # compiles several programs: over 10 s on 2 cores, so it runs in CI's full suite, not the fast set
def test_guidance_scale_zero_is_unconditional():
    model = build("dit", num_classes=10)
    # Make the labels matter: untrained adaLN-Zero blocks would ignore the condition.
    graphdef, params = nnx.split(model)
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(7), p.shape), params)
    model = nnx.merge(graphdef, params)
    key, labels = jax.random.key(4), jnp.arange(6) % 10
    sample = jax.jit(lambda labels, scale: model.sample(key, 6, labels=labels, guidance_scale=scale, sampling_steps=2,
                                                        sampler="ddim"), static_argnums=1)
    unconditional = sample(None, 1.0)
    guidance_zero = sample(labels, 0.0)
    conditional = sample(labels, 1.0)
    np.testing.assert_allclose(guidance_zero, unconditional, atol=1e-4)
    assert not np.array_equal(np.asarray(conditional), np.asarray(unconditional))


# --- the bound ------------------------------------------------------------------------------------
def test_untrained_levels_model_bounds_uniform_noise_at_uniform_nll():
    """Zero-initialised logits make the denoiser the exact posterior mean of i.i.d. uniform levels,
    so on uniform random images the bound must equal -log p = 64 ln 17 (up to Monte Carlo noise)."""
    model = build("dit")
    model.eval()
    images = jax.random.randint(jax.random.key(0), (128, 8, 8, 1), 0, 17)
    nll = np.asarray(jax.jit(lambda b, k: model.nll(b, k, time_samples=16))({"image": images}, jax.random.key(1)))
    assert np.all(nll >= 0)
    assert abs(nll.mean() - UNIFORM_NATS) < 0.03 * UNIFORM_NATS, nll.mean()


@pytest.mark.parametrize("prediction", ["eps", "levels"])
def test_untrained_bound_on_digits_is_at_least_uniform(prediction):
    model = build("dit", prediction=prediction, num_classes=10)
    model.eval()
    batch = digits_batch(32)
    bound = jax.jit(lambda b, conditional: model.nll(b, jax.random.key(0), time_samples=4, conditional=conditional),
                    static_argnums=1)
    nll, unconditional = np.asarray(bound(batch, None)), np.asarray(bound(batch, False))
    assert np.all(nll >= 0) and nll.mean() > 0.9 * UNIFORM_NATS
    # The conditional model is a uniform mixture over classes: its bound pays log(10) for the label.
    np.testing.assert_allclose(nll - unconditional, math.log(10), atol=1e-3)


# --- parallelism and rematerialisation ------------------------------------------------------------
@pytest.mark.slow  # compiles several programs: over 10 s on 2 cores, so it runs in CI's full suite, not the fast set
def test_dit_attention_and_mlp_are_sharded_over_tensor_and_match_one_device():
    mesh_config = parallel.MeshConfiguration(data=1, fsdp=2, tensor=4)
    mesh = parallel.make_mesh(mesh_config, jax.devices()[:8])
    model = build("dit", num_classes=10)
    graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params_state)
    logical = nnx.to_pure_dict(nnx.get_partition_spec(params_state))
    shardings = parallel.parameter_shardings(params, logical, mesh, mesh_config)
    block = shardings["network"]["blocks"][0]
    dim, mlp = 32, 64
    for name, tensor_dim, shape in [
        ("query", 1, (dim, dim)), ("key", 1, (dim, dim)), ("value", 1, (dim, dim)),
        ("attn_out", 0, (dim, dim)), ("mlp_in", 1, (dim, mlp)), ("mlp_out", 0, (mlp, dim)),
    ]:
        sharding = block[name]["kernel"]
        assert sharding.spec[tensor_dim] == "tensor", (name, sharding.spec)
        shard = sharding.shard_shape(shape)
        assert shard[tensor_dim] == shape[tensor_dim] // 4, (name, shard)
        assert math.prod(shard) == math.prod(shape) // 8, (name, shard)  # also split over fsdp

    batch, key = digits_batch(8), jax.random.key(5)
    expected_loss, expected_grads = loss_and_grads(model, batch, key)
    placed = parallel.place(params, shardings)
    sharded_batch = {k: jax.device_put(v, NamedSharding(mesh, P(("data", "fsdp")))) for k, v in batch.items()}

    def f(p, b):
        return nnx.merge(graphdef, p, rest).loss(b, key)[0]

    loss, grads = jax.jit(jax.value_and_grad(f), out_shardings=(parallel.replicated(mesh), shardings))(
        placed, sharded_batch
    )
    assert grads["network"]["blocks"][0]["mlp_in"]["kernel"].sharding.spec[1] == "tensor"
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    expected = nnx.to_pure_dict(expected_grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5), grads, expected)


@pytest.mark.parametrize(
    "kind, remat",
    [pytest.param("ddpm_unet", "full", marks=pytest.mark.slow), pytest.param("dit", "dots_saveable", marks=pytest.mark.slow), ("dit", "nothing_saveable")],
)
def test_remat_gives_the_same_loss_and_gradients(kind, remat):
    batch, key = digits_batch(4), jax.random.key(2)
    loss, grads = loss_and_grads(build(kind, num_classes=10), batch, key)
    remat_loss, remat_grads = loss_and_grads(build(kind, remat=remat, num_classes=10), batch, key)
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), remat_grads, grads)


@pytest.mark.slow
# --- training -----------------------------------------------------------------------------------
def test_short_training_lowers_the_bound():
    model = build("dit", num_classes=10)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    data = load_digits_split("train")
    images, labels = jnp.asarray(data["image"]), jnp.asarray(data["label"], jnp.int32)
    tx = optax.adam(3e-3)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, i):
        key = jax.random.fold_in(jax.random.key(0), i)
        index = jax.random.choice(key, images.shape[0], (64,), replace=False)
        batch = {"image": images[index], "label": labels[index]}
        loss, grads = jax.value_and_grad(lambda p: nnx.merge(graphdef, p, rest).loss(batch, key)[0])(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def bound(params):
        return nnx.merge(graphdef, params, rest).nll(digits_batch(64, "validation"), jax.random.key(9), time_samples=4)

    start = time.perf_counter()
    before = float(bound(params).mean())
    for i in range(60):
        params, opt_state, _ = step(params, opt_state, i)
    after = float(bound(params).mean())
    assert after < before - 40, (before, after)
    assert time.perf_counter() - start < 60


@pytest.mark.parametrize(
    "name, kind", [pytest.param("ddpm_unet_digits.yaml", "ddpm_unet", marks=pytest.mark.slow), ("dit_digits.yaml", "dit")]
)
def test_shipped_configs_build_their_model(name, kind):
    from workshop_dist.experiment import ExperimentConfiguration

    config = ExperimentConfiguration.load(REPO / "configs" / name)
    assert config.model.model_class == kind and config.data.normalize == "levels"
    assert config.model.parameters["num_classes"] == 10 and config.model.parameters["label_dropout"] > 0
    model = create_model(config.model, rngs=nnx.Rngs(0))
    assert model.num_classes == 10
