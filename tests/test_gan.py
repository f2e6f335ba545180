"""The GAN family: per-group losses, the two objectives on known logits, group-local gradients,
a hand-written two-optimizer loop, and a short run of the Trainer with training.optimizers."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from workshop_dist import ModelConfiguration, Trainer, create_model
from workshop_dist.data.digits import load_digits_split
from workshop_dist.experiment import ExperimentConfiguration
from workshop_dist.models import gan

GROUPS = ("discriminator", "generator")
ROOT = Path(__file__).resolve().parent.parent


def make_gan(**parameters) -> gan.GAN:
    config = ModelConfiguration(
        model_class="gan", input_dim=(8, 8, 1), hidden_dims=[8, 16], output_dim=8, parameters=parameters
    )
    return create_model(config, rngs=nnx.Rngs(0))


def digits_batch(n: int = 16) -> dict[str, jax.Array]:
    train = load_digits_split("train")
    return {
        "image": jnp.asarray(train["image"][:n], jnp.float32) / 16,
        "label": jnp.asarray(train["label"][:n], jnp.int32),
    }


def group_params(model: nnx.Module) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_groups_and_update_order_follow_the_parameters():
    model = make_gan(d_steps=3)
    assert model.param_groups == {"generator": "generator", "discriminator": "discriminator"}
    assert model.update_order == ("discriminator",) * 3 + ("generator",)
    assert set(group_params(model)) == set(GROUPS)


@pytest.mark.parametrize("loss", ["non_saturating", "hinge"])
def test_losses_per_group(loss):
    model, batch, rng = make_gan(loss=loss, num_classes=10, r1_gamma=1.0), digits_batch(), jax.random.key(0)
    d = model.example_losses(batch, rng, group="discriminator")
    g = model.example_losses(batch, rng, group="generator")
    both = model.example_losses(batch, rng)
    assert set(d) == {"loss", "real_logit", "fake_logit", "r1"} and set(g) == {"loss", "fake_logit"}
    assert all(value.shape == (16,) for value in [*d.values(), *g.values(), *both.values()])
    # same rng: the same fakes in every group, so the values line up
    np.testing.assert_allclose(d["fake_logit"], g["fake_logit"], rtol=1e-6)
    np.testing.assert_allclose(g["loss"], gan.generator_loss(loss, g["fake_logit"]), rtol=1e-6)
    expected_d = gan.discriminator_loss(loss, d["real_logit"], d["fake_logit"]) + 0.5 * d["r1"]
    np.testing.assert_allclose(d["loss"], expected_d, rtol=1e-6)
    np.testing.assert_allclose(both["d_loss"], d["loss"], rtol=1e-6)
    np.testing.assert_allclose(both["loss"], both["d_loss"] + both["g_loss"], rtol=1e-6)
    scalar, _ = model.loss(batch, rng, group="generator")
    assert scalar.shape == () and float(scalar) == pytest.approx(float(g["loss"].mean()), rel=1e-6)
    with pytest.raises(ValueError, match="parameter group"):
        model.example_losses(batch, rng, group="critic")


def test_objectives_on_known_logits():
    real, fake = jnp.array([2.0, 0.5, -1.0]), jnp.array([-2.0, 0.5, 3.0])
    np.testing.assert_allclose(gan.discriminator_loss("hinge", real, fake), [0.0, 0.5 + 1.5, 2.0 + 4.0])
    np.testing.assert_allclose(gan.generator_loss("hinge", fake), [2.0, -0.5, -3.0])
    softplus = lambda v: np.log1p(np.exp(v))  # noqa: E731
    np.testing.assert_allclose(
        gan.discriminator_loss("non_saturating", real, fake),
        softplus(-np.asarray(real)) + softplus(np.asarray(fake)),
        rtol=1e-6,
    )
    # non-saturating G loss = -log sigmoid(l_f): large where D is sure the fake is fake
    np.testing.assert_allclose(
        gan.generator_loss("non_saturating", fake), -np.log(jax.nn.sigmoid(fake)), rtol=1e-5
    )
    assert float(
        gan.discriminator_loss("non_saturating", jnp.array([0.0]), jnp.array([0.0]))[0]
    ) == pytest.approx(2 * np.log(2))


def test_discriminator_loss_has_no_gradient_into_the_generator():
    model, batch = make_gan(num_classes=10, r1_gamma=1.0), digits_batch()
    graphdef, params = nnx.split(model, nnx.Param)

    def d_loss(p):
        return nnx.merge(graphdef, p).loss(batch, jax.random.key(1), group="discriminator")[0]

    grads = nnx.to_pure_dict(jax.grad(d_loss)(params))
    assert all(float(jnp.abs(leaf).max()) == 0.0 for leaf in jax.tree.leaves(grads["generator"]))
    assert any(float(jnp.abs(leaf).max()) > 0.0 for leaf in jax.tree.leaves(grads["discriminator"]))


def hand_step(graphdef, tx):
    """One GAN step as the engine does it: per group, gradients of that group's loss w.r.t. its params."""

    def step(params, opt_state, batch, key, order):
        for index, group in enumerate(order):

            def loss_fn(sub, group=group, params=params, index=index):
                model = nnx.merge(graphdef, {**params, group: sub})
                return model.loss(batch, jax.random.fold_in(key, index), group=group)[0]

            grads = jax.grad(loss_fn)(params[group])
            updates, new = tx.update(grads, opt_state[group], params[group])
            params = {**params, group: optax.apply_updates(params[group], updates)}
            opt_state = {**opt_state, group: new}
        return params, opt_state

    return jax.jit(step, static_argnums=4)


def changed(a, b) -> bool:
    return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["non_saturating", "hinge"])
def test_each_update_moves_only_its_group_and_a_short_loop_trains_both(loss):
    model = make_gan(loss=loss, num_classes=10)
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    tx = optax.adam(1e-3, b1=0.5)
    opt_state = {group: tx.init(params[group]) for group in GROUPS}
    step = hand_step(graphdef, tx)
    batch = digits_batch(32)
    for group in GROUPS:  # one update of one group leaves the other bit-for-bit alone
        new, _ = step(params, opt_state, batch, jax.random.key(0), (group,))
        other = next(g for g in GROUPS if g != group)
        assert changed(new[group], params[group]) and not changed(new[other], params[other])

    start = params
    losses = []
    for i in range(20):
        params, opt_state = step(params, opt_state, batch, jax.random.key(i), model.update_order)
        values = nnx.merge(graphdef, params).example_losses(batch, jax.random.key(1000))
        losses.append({k: float(v.mean()) for k, v in values.items()})
    assert changed(params["generator"], start["generator"]) and changed(
        params["discriminator"], start["discriminator"]
    )
    assert all(np.isfinite(list(row.values())).all() for row in losses)
    # the discriminator learns to separate these 32 real digits from the early fakes
    assert (
        losses[-1]["real_logit"] - losses[-1]["fake_logit"]
        > losses[0]["real_logit"] - losses[0]["fake_logit"]
    )


def test_samples_are_in_data_space_and_follow_labels():
    model = make_gan(num_classes=10, data_max=16.0)
    images = model.sample(jax.random.key(0), 20)
    assert images.shape == (20, 8, 8, 1)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 16.0
    # without labels a conditional model cycles through the classes
    cycled = model.sample(jax.random.key(0), 20, labels=jnp.arange(20) % 10)
    np.testing.assert_array_equal(images, cycled)
    assert changed(model.sample(jax.random.key(0), 20, labels=jnp.zeros(20, jnp.int32)), images)


def test_trainer_runs_the_shipped_config_with_two_optimizers():
    overrides = ["model.hidden_dims=[8,16]", "training.length.max_steps=3", "training.cadence.log_every=1"]
    overrides += ["training.cadence.num_samples=0", "training.batch_size=32", "training.performance.steps_per_call=1"]
    config = ExperimentConfiguration.load(ROOT / "configs" / "gan_digits.yaml", overrides)
    training = config.training
    assert set(training.optimizers) == set(GROUPS)
    model = create_model(config.model, rngs=nnx.Rngs(0))
    before = group_params(model)
    images = load_digits_split("train")["image"][:256].astype(np.float32) / 16
    trainer = Trainer(
        model, training, {"image": images, "label": load_digits_split("train")["label"][:256]}, None, None
    )
    trainer.train_epoch()
    after = jax.device_get(trainer.state.params)
    assert changed(after["generator"], before["generator"]) and changed(
        after["discriminator"], before["discriminator"]
    )
    row = trainer.train_metrics[-1]
    assert {"generator/loss", "discriminator/loss", "discriminator/real_logit", "loss"} <= set(row)
    samples = trainer.generate_samples(10, labels=np.arange(10))
    assert samples.shape == (10, 8, 8, 1) and samples.min() >= 0.0 and samples.max() <= 1.0
