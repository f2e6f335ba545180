"""The Trainer behind the original design's API: training, evaluation, metrics, checkpoints, samples."""

import math

import jax
import numpy as np
import pytest
from flax import nnx

import workshop_dist
from tests.helpers import digits_images, tiny_model_config, training_config
from workshop_dist import ModelConfiguration, Trainer, create_model
from workshop_dist.checkpoint import CheckpointError
from workshop_dist.optim import OptimizerConfiguration
from workshop_dist.parallel import MeshConfiguration
from workshop_dist.training import trainer as trainer_module

TRAIN = digits_images("train")
VAL = digits_images("validation")


def make_trainer(train=TRAIN, val=VAL, workdir=None, model=None, mesh=None, **training):
    settings = {"batch_size": 64, "num_epochs": 1, "log_every": 5, **training}
    model = model or create_model(tiny_model_config(), rngs=nnx.Rngs(0))
    return Trainer(model, training_config(**settings), train, val, workdir, mesh_config=mesh)


def quadratic_model():
    return create_model(ModelConfiguration(model_class="tests.helpers.QuadraticModel"), rngs=0)


def test_the_original_designs_names_are_the_top_level_api():
    namespace: dict = {}
    exec("from workshop_dist import *", namespace)  # fails on a name in __all__ that is not there
    seed = {"Trainer", "TrainingConfiguration", "OptimizerConfiguration", "SchedulerConfiguration",
            "ModelConfiguration", "create_model", "TrainingState", "Logger", "MetricsLogger"}  # fmt: skip
    assert seed <= set(workshop_dist.__all__)
    assert all(namespace[name] is getattr(workshop_dist, name) for name in seed)
    # The configurations nest as the original design's do.
    config = namespace["TrainingConfiguration"](optimizer=namespace["OptimizerConfiguration"](learning_rate=0.5))
    assert config.optimizer.learning_rate == 0.5


@pytest.mark.slow
def test_vae_on_digits_lowers_the_validation_loss_clearly():
    trainer = make_trainer(num_epochs=6, optimizer=OptimizerConfiguration(learning_rate=2e-3))
    before = trainer.evaluate(VAL)["loss"]
    trainer.fit()
    after = trainer.evaluate(VAL)["loss"]
    assert trainer.step == 6 * (1000 // 64)
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize(("count", "batch_size"), [(1000, 64), (5, 64), (64, 64), (100, 24)])
def test_evaluate_counts_every_example_exactly_once(count, batch_size):
    trainer = make_trainer(model=quadratic_model())
    data = TRAIN[:count]
    metrics = trainer.evaluate(data, batch_size=batch_size)
    expected = ((data - 0.25) ** 2).reshape(count, -1).sum(-1).mean()
    assert metrics["num_examples"] == count
    assert math.isclose(metrics["loss"], expected, rel_tol=1e-5)
    assert math.isclose(metrics["squared_error"], expected, rel_tol=1e-5)


def test_evaluate_accepts_a_seed_style_loader_with_a_partial_last_batch():
    trainer = make_trainer(model=quadratic_model())
    data = TRAIN[:100]
    loader = lambda batch_size: [{"image": data[i : i + batch_size]} for i in range(0, 100, batch_size)]  # noqa: E731
    metrics = trainer.evaluate(loader, batch_size=32)
    assert metrics["num_examples"] == 100
    assert math.isclose(metrics["loss"], ((data - 0.25) ** 2).reshape(100, -1).sum(-1).mean(), rel_tol=1e-5)


def test_train_epoch_returns_averaged_metrics_and_keeps_history():
    trainer = make_trainer()
    metrics = trainer.train_epoch()
    steps = 1000 // 64
    assert trainer.step == steps
    assert {"loss", "learning_rate", "grad_norm", "reconstruction", "kl"} <= set(metrics)
    assert [row["step"] for row in trainer.train_metrics] == list(range(1, steps + 1))
    assert math.isclose(metrics["loss"], np.mean([row["loss"] for row in trainer.train_metrics]), rel_tol=1e-6)
    assert metrics["learning_rate"] == pytest.approx(1e-3)


@pytest.mark.parametrize(
    ("loader_kind", "steps_per_epoch", "expected"),
    [("list", None, 7), ("list", 3, 3), ("generator", None, 5)],
)
def test_seed_style_loader_epoch_length(loader_kind, steps_per_epoch, expected):
    def loader(batch_size):
        if loader_kind == "list":
            return [{"image": TRAIN[i * batch_size : (i + 1) * batch_size]} for i in range(7)]
        return ({"image": TRAIN[i * batch_size : (i + 1) * batch_size]} for i in range(5))

    trainer = make_trainer(train=loader, steps_per_epoch=steps_per_epoch, max_steps=None if loader_kind == "list" else 100)
    trainer.train_epoch()
    assert trainer.step == expected


def test_a_bare_array_batch_is_the_image():
    trainer = make_trainer(train=lambda batch_size: [TRAIN[:batch_size]] * 2)
    trainer.train_epoch()
    assert trainer.step == 2


def test_metrics_are_read_once_per_log_interval_not_every_step(monkeypatch):
    trainer = make_trainer(log_every=5, steps_per_epoch=15, train=lambda b: [{"image": TRAIN[:b]}] * 15)
    calls = []
    real_device_get = jax.device_get
    monkeypatch.setattr(trainer_module.jax, "device_get", lambda x: calls.append(1) or real_device_get(x))
    trainer.train_epoch()
    assert trainer.step == 15
    assert len(calls) == 3  # one read per 5 steps


def test_log_callback_receives_train_and_val_metrics(tmp_path):
    seen = []
    trainer = make_trainer(log_every=5, workdir=tmp_path, num_samples=0)
    trainer.log_callback = lambda step, metrics, prefix: seen.append((step, prefix, metrics["loss"]))
    trainer.fit()
    assert [s for s, p, _ in seen if p == "train"][:3] == [5, 10, 15]
    assert [(s, p) for s, p, _ in seen if p == "val"] == [(15, "val")]
    assert all(np.isfinite(loss) for *_, loss in seen)


def test_the_users_module_still_works_after_training():
    model = create_model(tiny_model_config(), rngs=nnx.Rngs(0))
    before = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    trainer = make_trainer(model=model, steps_per_epoch=2)
    user_buffers = {leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))}
    trainer_buffers = {
        shard.data.unsafe_buffer_pointer() for leaf in jax.tree.leaves(trainer.state.params) for shard in leaf.addressable_shards
    }
    assert not user_buffers & trainer_buffers  # donation must never reach the user's arrays
    trainer.train_epoch()  # the step donates its state buffers
    after = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))  # would raise if aliased
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)
    assert model.sample(jax.random.PRNGKey(0), 2).shape == (2, 8, 8, 1)
    assert not np.array_equal(
        jax.device_get(trainer.state.params["output"]["bias"]), before["output"]["bias"]
    )  # the trainer's copy trained


def test_trainer_model_is_a_copy_that_outlives_training():
    trainer = make_trainer(steps_per_epoch=2, num_epochs=2)
    trainer.train_epoch()
    snapshot = trainer.model
    trainer.train_epoch()  # donates the state's buffers
    assert snapshot.sample(jax.random.PRNGKey(0), 2).shape == (2, 8, 8, 1)
    assert not np.array_equal(jax.device_get(snapshot.output.bias[...]), jax.device_get(trainer.state.params["output"]["bias"]))


def test_training_state_supports_dict_access():
    state = make_trainer().state
    assert int(state["step"]) == 0
    assert float(state.get("best_loss", 0.0)) == float("inf")
    assert state.get("missing", 5) == 5
    with pytest.raises(KeyError):
        state["missing"]


def test_save_and_load_checkpoint_resume_bit_identically(tmp_path):
    trainer = make_trainer(steps_per_epoch=3)
    trainer.train_epoch()
    path = trainer.save_checkpoint(tmp_path / "model.pkl")
    assert path.is_dir() and (path / "state").is_dir()
    saved = jax.device_get(trainer.state.params)
    trainer.train_epoch()
    expected = jax.device_get(trainer.state.params)

    trainer.load_checkpoint(tmp_path / "model.pkl")
    assert trainer.step == 3
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(jax.device_get(trainer.state.params)), strict=True):
        np.testing.assert_array_equal(a, b)
    trainer.train_epoch()  # the data position came back too
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(jax.device_get(trainer.state.params)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_saving_twice_to_the_same_path_replaces_it(tmp_path):
    trainer = make_trainer(steps_per_epoch=2)
    trainer.save_checkpoint(tmp_path / "best_model.pkl")
    trainer.train_epoch()
    trainer.save_checkpoint(tmp_path / "best_model.pkl")
    fresh = make_trainer(steps_per_epoch=2)
    fresh.load_checkpoint(tmp_path / "best_model.pkl")
    assert fresh.step == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model.pkl"]


def test_loading_a_checkpoint_of_another_model_names_the_parameter(tmp_path):
    make_trainer().save_checkpoint(tmp_path / "ckpt")
    other = make_trainer(model=create_model(tiny_model_config(hidden_dims=[64, 48]), rngs=0))
    with pytest.raises(CheckpointError, match=r"encoder/1/kernel.*\(64, 32\).*\(64, 48\)"):
        other.load_checkpoint(tmp_path / "ckpt")


def test_loading_a_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="No checkpoint at"):
        make_trainer().load_checkpoint(tmp_path / "nothing_here")


def test_generate_samples_is_seeded():
    trainer = make_trainer()
    a, b = trainer.generate_samples(16, seed=1), trainer.generate_samples(16, seed=1)
    c = trainer.generate_samples(16, seed=2)
    assert a.shape == (16, 8, 8, 1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= 0 and a.max() <= 1


def test_nan_loss_stops_and_names_the_step():
    bad = TRAIN[:64].copy()
    bad[3, 0, 0, 0] = np.nan
    batches = [{"image": TRAIN[:64]}] * 3 + [{"image": bad}] + [{"image": TRAIN[:64]}] * 2
    trainer = make_trainer(train=lambda b: batches, log_every=2)
    with pytest.raises(trainer_module.NonFiniteLossError, match="at step 4"):
        trainer.train_epoch()


def test_nan_policy_skip_leaves_params_unchanged_for_that_step():
    bad = TRAIN[:64].copy()
    bad[3, 0, 0, 0] = np.nan
    trainer = make_trainer(train=lambda b: [{"image": bad}], nan_policy="skip")
    before = jax.device_get(trainer.state.params)
    trainer.train_epoch()
    assert trainer.step == 1 and trainer.train_metrics[0]["nonfinite"] == 1
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(trainer.state.params)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_learning_rate_metric_is_the_schedule_value_used():
    from workshop_dist.optim import SchedulerConfiguration

    scheduler = SchedulerConfiguration(scheduler_type="linear", warmup_steps=4, total_steps=12, min_lr_ratio=0.0)
    trainer = make_trainer(
        train=lambda b: [{"image": TRAIN[:b]}] * 12,
        optimizer=OptimizerConfiguration(optimizer_type="sgd", learning_rate=0.1),
        scheduler=scheduler,
    )
    trainer.train_epoch()
    lrs = [row["learning_rate"] for row in trainer.train_metrics]
    expected = [0.1 * s / 4 if s < 4 else 0.1 * (12 - s) / 8 for s in range(12)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-6, atol=1e-9)


def test_mesh_trainer_uses_every_device():
    trainer = make_trainer(mesh=MeshConfiguration(data=2, fsdp=4))
    assert trainer.mesh.devices.size == 8
    trainer.train_epoch()
    assert trainer.step == 1000 // 64
