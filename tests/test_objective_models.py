"""Flow matching and EDM on the U-Net and the DiT (``model.parameters.objective``): the config picks
the objective, losses are per example, sampling is sharded and keyed per sample, and the Trainer
takes a sampler and a step count."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import training_config
from workshop_dist import ModelConfiguration, Trainer, create_model, parallel
from workshop_dist.config import ConfigError
from workshop_dist.data.digits import load_digits_split
from workshop_dist.models.config import DataSpec
from workshop_dist.models.keys import ExampleKeys
from workshop_dist.models.objective_model import ObjectiveModel

NETWORKS = {
    "dit": {"hidden_size": 16, "depth": 1, "num_heads": 2},
    "ddpm_unet": {"widths": [8, 16], "attention_heads": 2},
}
OBJECTIVES = {
    "flow_matching": {"sampler": "euler", "sampling_steps": 3, "time_sampling": "logit_normal"},
    "edm": {"sampler": "heun", "sampling_steps": 3},
}
# The DiT here; the U-Net under both objectives trains, resumes and samples on 8 devices in
# tests/test_families.py (its convolutions compile slowly inside XLA:CPU's loops).
CASES = [("dit", objective) for objective in OBJECTIVES]


def config(network: str, objective: str, **parameters) -> ModelConfiguration:
    merged = {**NETWORKS[network], "objective": objective, **OBJECTIVES.get(objective, {}), **parameters}
    return ModelConfiguration(model_class=network, input_dim=(8, 8, 1), parameters=merged)


def build(network: str, objective: str, **parameters) -> ObjectiveModel:
    return create_model(config(network, objective, **parameters), rngs=nnx.Rngs(0))


def digits(size: int) -> dict[str, jax.Array]:
    data = load_digits_split("train")
    return {"image": jnp.asarray(data["image"][:size], jnp.float32), "label": jnp.asarray(data["label"][:size], jnp.int32)}


@pytest.mark.parametrize("network, objective", CASES)
def test_each_example_loss_depends_on_its_own_key_alone(network, objective):
    model = build(network, objective, num_classes=10)
    assert isinstance(model, ObjectiveModel) and type(model.hp).__name__.endswith("Parameters")
    graphdef, state = nnx.split(model)
    losses = jax.jit(lambda state, batch, keys: nnx.merge(graphdef, state).example_losses(batch, ExampleKeys(keys)))
    keys = jax.random.split(jax.random.key(3), 4)
    four = losses(state, digits(4), keys)
    two = losses(state, {k: v[2:] for k, v in digits(4).items()}, keys[2:])
    assert set(four) == {"loss", "mse"} and four["loss"].shape == (4,)
    np.testing.assert_allclose(four["loss"][2:], two["loss"], rtol=2e-5)
    assert np.all(np.asarray(four["loss"]) > 0)


@pytest.mark.slow  # compiles several programs: over 10 s on 2 cores, so it runs in CI's full suite, not the fast set
def test_evaluation_drops_no_labels():
    model = build("dit", "flow_matching", num_classes=10, label_dropout=1.0)
    # the condition matters: perturb the zero-initialised adaLN and output layers
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), state)
    batch, keys = digits(4), ExampleKeys(jax.random.split(jax.random.key(0), 4))

    @functools.partial(jax.jit, static_argnums=2)
    def losses(state, batch, training: bool):
        model = nnx.merge(graphdef, state)
        model.train() if training else model.eval()
        return model.example_losses(batch, keys)["loss"]

    dropped = losses(state, batch, True)
    kept = losses(state, batch, False)
    unconditional = losses(state, {"image": batch["image"], "label": jnp.full((4,), 10)}, False)
    np.testing.assert_allclose(dropped, unconditional, rtol=1e-5)  # label_dropout 1: every label is null
    assert not np.allclose(kept, dropped, rtol=1e-3)


@pytest.mark.parametrize("network, objective", CASES)
def test_samples_are_levels_keyed_per_sample_and_sharded_like_a_batch(network, objective):
    model = build(network, objective, num_classes=10)
    model.eval()
    graphdef, state = nnx.split(model)
    mesh = parallel.make_mesh(parallel.MeshConfiguration(data=-1))
    sharding = parallel.batch_sharding(mesh)

    @jax.jit
    def draw(state, key, labels):
        return nnx.merge(graphdef, state).sample(key, labels.shape[0], labels=labels, sharding=sharding)

    eight = np.asarray(draw(state, jax.random.key(0), jnp.arange(8)))
    assert eight.shape == (8, 8, 8, 1) and eight.min() >= 0 and eight.max() <= 16
    assert np.array_equal(eight, np.round(eight))
    unsharded = jax.jit(lambda state, key, labels: nnx.merge(graphdef, state).sample(key, 3, labels=labels))
    three = np.asarray(unsharded(state, jax.random.key(0), jnp.arange(3)))  # sample i: fold_in(key, i)
    np.testing.assert_array_equal(three, eight[:3])
    text = draw.lower(state, jax.random.key(0), jnp.arange(8)).as_text()
    assert "sharding_constraint" in text  # the sampling loop runs over the whole mesh, rows split like a batch


def test_objective_options_are_checked_against_the_chosen_objective():
    with pytest.raises(ConfigError, match=r"unknown field 'path'"):  # a flow-matching option under EDM
        build("dit", "edm", path="linear")
    with pytest.raises(ConfigError, match=r"unknown field 'schedule'"):  # a DDPM option under flow matching
        build("ddpm_unet", "flow_matching", schedule="cosine")
    with pytest.raises(ConfigError, match=r"objective: dit takes one of \['diffusion', 'flow_matching', 'edm'\]"):
        build("dit", "rectified")
    with pytest.raises(ConfigError, match="divisible"):
        build("ddpm_unet", "edm", widths=[8, 8, 8, 8, 8])


def test_the_same_network_serves_every_objective():
    shapes = {}
    for objective in ("diffusion", "flow_matching", "edm"):
        parameters = {**NETWORKS["dit"], "objective": objective, "num_classes": 10}
        if objective == "diffusion":
            parameters["prediction"] = "eps"  # one output per channel, like the others
        model = nnx.eval_shape(lambda p=parameters: create_model(
            ModelConfiguration(model_class="dit", input_dim=(8, 8, 1), parameters=p), rngs=0))
        shapes[objective] = jax.tree.map(lambda a: a.shape, nnx.state(model.network, nnx.Param))
    assert shapes["flow_matching"] == shapes["edm"] == shapes["diffusion"]


def test_trainer_samples_with_the_sampler_and_steps_asked_for():
    images = load_digits_split("train")
    data = {"image": images["image"][:128].astype(np.float32), "label": images["label"][:128].astype(np.int32)}
    model_config = config("dit", "edm", num_classes=10, sampling_steps=4)
    model_config = model_config.model_copy(update={"data": DataSpec(normalize="levels")})
    trainer = Trainer(model_config, training_config(batch_size=64, num_epochs=1, num_samples=0, log_every=1),
                      data, None, None)
    trainer.train_epoch()
    labels = np.arange(4)
    euler = trainer.generate_samples(4, seed=1, labels=labels, sampler="euler", steps=2)
    again = trainer.generate_samples(4, seed=1, labels=labels, sampler="euler", steps=2)
    heun = trainer.generate_samples(4, seed=1, labels=labels, sampler="heun", steps=2)
    np.testing.assert_array_equal(euler, again)
    assert euler.shape == (4, 8, 8, 1) and not np.array_equal(euler, heun)
    assert trainer.model.network_evaluations("heun", 18) == 35 and trainer.model.network_evaluations("euler", 18) == 18
    with pytest.raises(ValueError, match="unknown sampler 'ddim'"):
        trainer.generate_samples(2, seed=1, sampler="ddim")


def test_flow_matching_has_a_likelihood_bound_and_edm_none():
    assert not hasattr(build("dit", "edm"), "nll")
    model = build("dit", "flow_matching")
    model.eval()
    graphdef, state = nnx.split(model)
    nll = jax.jit(lambda state, batch: nnx.merge(graphdef, state).nll(batch, jax.random.key(0), rtol=1e-3, atol=1e-3))
    batch = {"image": digits(2)["image"]}
    values = np.asarray(nll(state, batch))
    # an untrained velocity field: a finite bound, and no tighter than what uniform levels cost per pixel
    assert values.shape == (2,) and np.all(np.isfinite(values))
    assert np.all(values > 0.5 * 64 * np.log(17)), values
