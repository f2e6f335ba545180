"""The engine's options: accumulation, EMA, parameter groups, bf16, conditioning, Rngs-holding models,
steps per call and data on the device. Each test compares against an independent computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import digits_images, tiny_model_config, training_config
from workshop_dist import ModelConfiguration, Trainer, TrainingConfiguration, create_model
from workshop_dist.config import ConfigError
from workshop_dist.data.digits import load_digits_split
from workshop_dist.optim import OptimizerConfiguration

TRAIN = digits_images("train")
VAL = digits_images("validation")


def model(name: str, **config):
    return create_model(ModelConfiguration(model_class=f"tests.engine_models.{name}", **config), rngs=nnx.Rngs(0))


def trainer_for(m, train=TRAIN, val=VAL, workdir=None, experiment_config=None, **training):
    settings = {"batch_size": 64, "num_epochs": 1, "log_every": 4, "num_samples": 0, **training}
    return Trainer(m, training_config(**settings), train, val, workdir, experiment_config=experiment_config)


def params_of(trainer):
    return jax.device_get(trainer.state.params)


def assert_trees(a, b, exact=True, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if exact:
            np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_gradient_accumulation_gives_the_full_batch_update(optimizer):
    opt = OptimizerConfiguration(optimizer_type=optimizer, learning_rate=0.05)
    runs = {}
    for k in (1, 4):
        trainer = trainer_for(model("TanhModel"), max_steps=5, optimizer=opt, grad_accum_steps=k)
        trainer.train_epoch()
        runs[k] = params_of(trainer)
    start = params_of(trainer_for(model("TanhModel")))
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(runs[1]), jax.tree.leaves(start), strict=True))
    assert moved > 1e-3  # the comparison below is not between two untouched models
    assert_trees(runs[1], runs[4], exact=False, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_lowers_compiled_peak_memory():
    # activations dominate (a large batch through narrow layers): what accumulation saves
    big = create_model(tiny_model_config(hidden_dims=[256, 256]), rngs=nnx.Rngs(0))
    sizes = {}
    for k in (1, 4):
        trainer = trainer_for(big, train=None, val=None, batch_size=8192, grad_accum_steps=k)
        batch = {"image": jax.ShapeDtypeStruct((8192, 8, 8, 1), jnp.float32, sharding=trainer.engine.batch_sharding)}
        memory = trainer.lower_step(batch).compile().memory_analysis()
        sizes[k] = memory.temp_size_in_bytes
    print("temp bytes per device by grad_accum_steps:", sizes)
    assert sizes[4] < 0.6 * sizes[1], sizes


def test_ema_follows_the_params_is_sharded_like_them_and_is_used_for_evaluation():
    decay = 0.9
    trainer = trainer_for(model("TanhModel"), max_steps=3, ema={"decay": decay}, optimizer=OptimizerConfiguration(optimizer_type="sgd", learning_rate=0.1))
    history = [params_of(trainer)]
    single = trainer.train_step_fn
    for step in range(3):
        batch = {"image": TRAIN[step * 64 : (step + 1) * 64]}
        trainer.state, _ = single(trainer.state, batch)
        history.append(params_of(trainer))
    expected = history[0]
    for params in history[1:]:
        expected = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, expected, params)
    assert_trees(jax.device_get(trainer.state.ema_params), expected, exact=False)
    for ema, param in zip(jax.tree.leaves(trainer.state.ema_params), jax.tree.leaves(trainer.state.params), strict=True):
        assert ema.sharding == param.sharding
    with_ema = trainer.evaluate(VAL)["loss"]
    raw = trainer_for(model("TanhModel"), ema={"decay": decay, "for_eval": False})
    raw.state = trainer.state
    without = raw.evaluate(VAL)["loss"]
    plain = trainer_for(model("TanhModel"))  # no EMA at all: evaluates the params
    plain.state = trainer.state.replace(ema_params=None)
    assert plain.evaluate(VAL)["loss"] == pytest.approx(without, rel=1e-6)
    assert with_ema != pytest.approx(without, rel=1e-6)


def test_ema_off_keeps_no_copy():
    trainer = trainer_for(model("TanhModel"))
    assert trainer.state.ema_params is None
    assert not any("ema" in str(path) for path, _ in jax.tree_util.tree_flatten_with_path(trainer.state)[0])


def test_two_optimizers_update_their_own_groups_in_the_model_order():
    optimizers = {
        "discriminator": {"optimizer_type": "sgd", "learning_rate": 0.25},
        "generator": {"optimizer_type": "sgd", "learning_rate": 1e-30},
    }
    trainer = trainer_for(model("TwoGroupModel"), max_steps=1, optimizers=optimizers, log_every=1)
    trainer.train_epoch()
    params = params_of(trainer)
    # two SGD steps on (d - 1)^2 with lr 0.25: 0 -> 0.5 -> 0.75; the generator's lr is ~0
    np.testing.assert_allclose(params["discriminator"], 0.75)
    np.testing.assert_allclose(params["generator"], 0.0, atol=1e-20)
    row = trainer.train_metrics[0]
    for key in ("generator/loss", "generator/grad_norm", "discriminator/loss", "discriminator/learning_rate", "loss"):
        assert key in row
    # the generator's loss was computed after both discriminator updates: (0 - 2 * 0.75)^2 * 4
    np.testing.assert_allclose(row["generator/loss"], 4 * 1.5**2, rtol=1e-6)


def test_parameter_groups_need_one_optimizer_each():
    with pytest.raises(ConfigError, match="generator"):
        trainer_for(model("TwoGroupModel"), optimizers={"discriminator": {"learning_rate": 0.1}})
    with pytest.raises(ConfigError, match="declares no param_groups"):
        trainer_for(model("TanhModel"), optimizers={"g": {"learning_rate": 0.1}})


@pytest.mark.slow
def test_bfloat16_keeps_float32_master_params_and_matches_float32_quality():
    results = {}
    for precision in ("float32", "bfloat16"):
        vae = create_model(ModelConfiguration(dtype=precision), rngs=nnx.Rngs(0))  # the default config's VAE
        trainer = trainer_for(vae, batch_size=128, num_epochs=12, optimizer=OptimizerConfiguration(learning_rate=2e-3))
        trainer.fit()
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(trainer.state.params))
        results[precision] = trainer.evaluate(VAL)["loss"]
    assert abs(results["bfloat16"] - results["float32"]) <= 0.03 * results["float32"], results


def test_bfloat16_really_computes_in_bfloat16():
    trainer = trainer_for(create_model(tiny_model_config(dtype="bfloat16"), rngs=nnx.Rngs(0)))
    batch = {"image": jax.ShapeDtypeStruct((64, 8, 8, 1), jnp.float32, sharding=trainer.engine.batch_sharding)}
    assert "bf16" in trainer.lower_step(batch).as_text()


def test_labels_reach_the_model_through_training_evaluation_and_sampling(tmp_path):
    data = load_digits_split("train")
    train = {"image": data["image"][:256].astype(np.float32), "label": data["label"][:256].astype(np.int32)}
    trainer = trainer_for(model("LabelModel"), train=train, val=train, log_every=1, workdir=tmp_path, num_samples=20)
    trainer.train_epoch()
    rows = trainer.train_metrics
    assert [row["step"] for row in rows] == [0.0, 1.0, 2.0, 3.0]  # the step reaches the model
    np.testing.assert_allclose(trainer.evaluate(train)["label"], train["label"].mean(), rtol=1e-6)
    labels = np.array([3, 1, 4, 1])
    samples = trainer.generate_samples(4, labels=labels, guidance_scale=0.5)
    np.testing.assert_allclose(samples[:, 0, 0, 0], labels + 0.5)
    path = trainer.write_samples()
    from PIL import Image

    height = np.asarray(Image.open(path)).shape[0]
    width = np.asarray(Image.open(path)).shape[1]
    assert height > 4 * width  # ten rows (one per class) of two columns


@pytest.mark.slow
def test_models_keeping_their_own_rngs_train_evaluate_sample_and_resume_bit_identically(tmp_path):
    def run(workdir, stop_at=None):
        trainer = trainer_for(model("DropoutModel"), train=TRAIN, workdir=workdir, max_steps=8, save_every=4)
        if stop_at is None:
            trainer.restore()
        while not trainer.finished:
            trainer.train_epoch()
            if stop_at is not None and trainer.step >= stop_at:
                break
        trainer.save_checkpoint()
        trainer.close()
        return trainer

    full = run(tmp_path / "full")
    interrupted_dir = tmp_path / "resumed"
    trainer_for(model("DropoutModel"), workdir=interrupted_dir, max_steps=4).fit()  # stops at step 4 with a checkpoint
    resumed = run(interrupted_dir)
    assert resumed.step == full.step == 8
    assert_trees(params_of(full), params_of(resumed))
    assert_trees(jax.device_get(full.state.model_state), jax.device_get(resumed.state.model_state))
    # evaluation is deterministic (dropout off, BatchNorm on running statistics) and depends on each input
    assert full.evaluate(VAL)["loss"] == full.evaluate(VAL)["loss"]
    encoded = full.model
    encoded.eval()
    means = encoded.encode(jnp.asarray(VAL[:8].reshape(8, -1)))
    assert float(jnp.std(means, axis=0).mean()) > 0.01
    assert full.generate_samples(3, seed=1).shape == (3, 64)


@pytest.mark.slow
@pytest.mark.parametrize("on_device", [False, True])
def test_steps_per_call_gives_the_same_run_and_lands_every_action(tmp_path, on_device):
    def run(n, workdir):
        trainer = trainer_for(
            create_model(tiny_model_config(), rngs=nnx.Rngs(0)), workdir=workdir, num_epochs=2,
            steps_per_call=n, data_on_device=on_device and n > 1, log_every=3, save_every=5, eval_every=7,
        )
        trainer.fit()
        trainer.close()
        return trainer

    one, many = run(1, tmp_path / "one"), run(4, tmp_path / "four")
    assert_trees(params_of(one), params_of(many))
    assert [row["step"] for row in many.train_metrics] == list(range(1, many.step + 1))
    assert [m["step"] for m in many.val_metrics] == [m["step"] for m in one.val_metrics]
    assert sorted(p.name for p in (tmp_path / "four" / "checkpoints").iterdir()) == sorted(
        p.name for p in (tmp_path / "one" / "checkpoints").iterdir()
    )


def test_data_on_device_needs_data_in_memory():
    from workshop_dist.config import WorkshopError

    loader = lambda batch_size: iter([{"image": TRAIN[:batch_size]}])  # noqa: E731
    with pytest.raises(WorkshopError, match="data_on_device"):
        trainer_for(create_model(tiny_model_config(), rngs=nnx.Rngs(0)), train=loader, data_on_device=True, steps_per_epoch=1)


def test_deprecated_checkpoint_fields_still_work_with_a_message():
    with pytest.warns(DeprecationWarning, match=r"training.checkpoint.max_to_keep"):
        config = TrainingConfiguration(max_checkpoints=2, checkpoint_dir="/tmp/x")
    assert config.checkpoint.max_to_keep == 2 and config.checkpoint.directory == "/tmp/x"


def test_a_loss_only_model_still_trains_and_evaluates_whole_batches_with_a_warning():
    with pytest.warns(UserWarning, match="example_losses"):
        trainer = trainer_for(create_model(ModelConfiguration(model_class="tests.helpers.LossOnlyModel"), rngs=0))
    per_example = ((VAL - 0.25) ** 2).reshape(len(VAL), -1).sum(-1)
    # full batches: exact
    assert trainer.evaluate(VAL[:128], batch_size=64)["loss"] == pytest.approx(per_example[:128].mean(), rel=1e-5)
    # 100 examples in batches of 64: the last batch's 28 padding rows hold copies of its first 28 real rows
    last = np.concatenate([per_example[64:100], per_example[64:92]]).mean()
    expected = (64 * per_example[:64].mean() + 36 * last) / 100
    result = trainer.evaluate(VAL[:100], batch_size=64)
    assert result["loss"] == pytest.approx(expected, rel=1e-5) and result["num_examples"] == 100
    assert result["squared_error"] == pytest.approx(expected, rel=1e-5)
    trainer.train_epoch()
    assert trainer.step > 0


def test_sample_grids_of_level_data_are_scaled_not_clipped(tmp_path):
    from PIL import Image

    levels = {"data": {"normalize": "levels", "source": "digits"}}
    trainer = trainer_for(model("LabelModel"), train=None, val=None, workdir=tmp_path, num_samples=10, experiment_config=levels)
    pixels = np.asarray(Image.open(trainer.write_samples()).convert("L"), np.float32)
    # samples are filled with their label 0..9 (levels out of 16): grey rows, not saturated white
    values = set(np.unique(pixels).astype(int))
    assert len(values) >= 10 and 0 in values
