"""The FID hook: statistics reduced on the mesh equal the host's, the same score on 1 and 8 devices,
``val/fd`` logged while training, and the best checkpoint chosen by it."""

from __future__ import annotations

import contextlib
import json
import logging

import jax
import numpy as np
import pytest
from flax import nnx

from tests.helpers import tiny_model_config, training_config
from workshop_dist import data, quality
from workshop_dist.config import ConfigError, WorkshopError
from workshop_dist.eval import fid
from workshop_dist.eval.config import EvalConfiguration
from workshop_dist.eval.features import FeatureNetwork
from workshop_dist.experiment import ExperimentConfiguration
from workshop_dist.parallel import MeshConfiguration, make_mesh
from workshop_dist.training import Trainer
from workshop_dist.training.hooks.evaluate import Best
from workshop_dist.training.hooks.fid import FIDHook
from workshop_dist.training.hooks.log import MetricSink


class TinyFeatures(nnx.Module):
    """A random 8x8 -> 16-d feature map (cheap stand-in for a real feature network)."""

    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(64, 16, rngs=rngs)

    def features(self, images):
        return jax.numpy.tanh(self.linear(images.reshape(images.shape[0], -1)))


def tiny_network() -> FeatureNetwork:
    graphdef, weights = nnx.split(TinyFeatures(nnx.Rngs(0)))
    return FeatureNetwork("fd", 16, graphdef, weights)


@contextlib.contextmanager
def captured(caplog):
    """caplog sees the "workshop_dist" logger's records (a Trainer's Logger stops their propagation)."""
    logger = logging.getLogger("workshop_dist")
    logger.addHandler(caplog.handler)
    try:
        yield
    finally:
        logger.removeHandler(caplog.handler)


class Sink(MetricSink):
    def __init__(self):
        self.rows = []

    def write(self, step, metrics, prefix):
        self.rows.append((step, prefix, dict(metrics)))


def vae_trainer(mesh, **training):
    return Trainer(tiny_model_config(), training_config(batch_size=16, **training), np.zeros((16, 8, 8, 1), np.float32),
                   None, None, mesh=mesh)


def hook_for(trainer, network, **options):
    options = {"every": 1, "num_samples": 40, "batch_size": 16, "sink": Sink(), "best": Best("val/fd"), **options}
    return FIDHook(trainer.engine, network, **options)


def test_sample_statistics_on_8_devices_equal_1_device_and_the_host():
    network = tiny_network()
    stats = {}
    for count in (1, 8):
        mesh = make_mesh(MeshConfiguration(), jax.devices()[:count])
        trainer = vae_trainer(mesh)
        hook = hook_for(trainer, network)
        stats[count] = hook.sample_statistics(trainer.state)
    assert stats[1].count == stats[8].count == 40  # 3 calls of 16, the last 8 masked out
    np.testing.assert_allclose(stats[8].sum, stats[1].sum, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats[8].sum_outer, stats[1].sum_outer, rtol=1e-5, atol=1e-5)
    mu_ref = np.zeros(16)
    sigma_ref = np.eye(16)
    fd1 = fid.frechet_distance(*stats[1].gaussian(), mu_ref, sigma_ref)
    fd8 = fid.frechet_distance(*stats[8].gaussian(), mu_ref, sigma_ref)
    assert fd1 == pytest.approx(fd8, rel=1e-5)


def test_reference_from_data_is_every_example_once():
    network = tiny_network()
    trainer = vae_trainer(make_mesh(MeshConfiguration()))
    images = np.random.default_rng(0).uniform(0, 1, (37, 8, 8, 1)).astype(np.float32)  # 37: a padded last batch
    hook = hook_for(trainer, network)
    stats = hook.data_statistics(images)
    on_host = fid.FeatureStatistics.of(np.asarray(network.apply(network.weights, images)))
    assert stats.count == 37
    np.testing.assert_allclose(stats.mean(), on_host.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.covariance(), on_host.covariance(), rtol=1e-4, atol=1e-6)


def test_scores_are_logged_and_offered_to_the_best_metric():
    network = tiny_network()
    trainer = vae_trainer(make_mesh(MeshConfiguration()))
    images = np.random.default_rng(1).uniform(0, 1, (32, 8, 8, 1)).astype(np.float32)
    hook = hook_for(trainer, network, reference_data=images)
    first = hook.run(3, trainer.state)
    assert hook.sink.rows == [(3, "val", {"fd": first})]
    assert hook.best.step == 3 and hook.best.loss == first
    assert hook.run(4, trainer.state) == pytest.approx(first, rel=1e-6)  # the same noise every time
    assert hook.best.step == 3  # not better


@pytest.fixture
def quick_classifier(monkeypatch):
    """The digits classifier trained on 30 minibatches (the real one takes a minute the first time)."""
    train = quality.train_classifier
    monkeypatch.setattr(quality, "train_classifier", lambda seed=0, steps=None: train(seed, 30))


@pytest.mark.slow  # trains and scores several times: over 10 s on 2 cores
def test_training_logs_val_fd_and_keeps_the_best_checkpoint_by_it(tmp_path, quick_classifier):
    config = ExperimentConfiguration.from_dict({}, [
        "training.length.max_steps=4", "training.batch_size=32", "training.cadence.eval_every=2",
        "training.cadence.save_every=100", "training.cadence.num_samples=0", "training.checkpoint.best_metric=val/fd",
        "eval.fid_every=2", "eval.fid_samples=64",
    ])
    training = config.training
    trainer = Trainer(config.model, training, data.make_train_input(config.data, global_batch_size=32, seed=0),
                      data.make_eval_input(config.data, global_batch_size=32), tmp_path, eval_config=config.eval,
                      experiment_config=config.model_dump(mode="json"))
    trainer.fit()
    trainer.close()
    rows = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    scores = {row["step"]: row["val/fd"] for row in rows if "val/fd" in row}
    assert sorted(scores) == [2, 4] and all(np.isfinite(v) and v > 0 for v in scores.values())
    best = min(scores, key=scores.get)
    assert trainer.checkpoints.best_step() == best
    assert trainer.best_loss == pytest.approx(scores[best])


def test_a_best_metric_nothing_logs_is_one_clear_error(tmp_path):
    config = ExperimentConfiguration.from_dict({}, [
        "training.length.max_steps=2", "training.batch_size=32", "training.cadence.eval_every=2",
        "training.checkpoint.best_metric=val/fid",
    ])
    trainer = Trainer(config.model, config.training, data.make_train_input(config.data, global_batch_size=32, seed=0),
                      data.make_eval_input(config.data, global_batch_size=32), None)
    with pytest.raises(WorkshopError, match=r"best_metric=val/fid is not a logged validation metric; this run logs .*val/loss"):
        trainer.fit()


def test_fid_needs_inception_weights_beyond_the_digits(caplog):
    with pytest.raises(ConfigError, match=r"eval\.features=inception needs eval\.inception_weights"):
        EvalConfiguration.from_dict({"fid_every": 10, "features": "inception"})
    with pytest.raises(ConfigError, match=r"eval\.fid_every is null"):
        EvalConfiguration.from_dict({"reference": "ref.npz"})
    # A digits config pointed at other data (features: auto): a warning saying how, and no FID hook.
    config = ExperimentConfiguration.from_dict({}, ["data.source=images:/nowhere", "eval.fid_every=10"])
    trainer = vae_trainer(make_mesh(MeshConfiguration()))
    with captured(caplog):
        hook = FIDHook.for_run(config.eval, trainer.engine, sink=Sink(), best=Best(), batch_size=16,
                               experiment_config=config.model_dump(mode="json"), reference_data=None)
    assert hook is None
    assert "no FID is computed. Set eval.inception_weights" in caplog.text


def run_cli(tmp_path, capsys, *overrides: str) -> tuple[int, str]:
    from workshop_dist import cli

    runs = sorted(tmp_path.glob("run*"))  # a fresh workdir each time
    code = cli.main(["--workdir", str(tmp_path / f"run{len(runs)}"), "--quiet", "training.length.max_steps=2", "training.scheduler=null",
                     "eval.fid_samples=16", *overrides])
    return code, capsys.readouterr().err


@pytest.mark.slow  # a Trainer per bad input: over 10 s on 2 cores
def test_bad_fid_inputs_are_one_message_each(tmp_path, capsys):
    from workshop_dist.eval import inception
    from workshop_dist.weights import model_tensors, write_safetensors

    inception_on = ["eval.fid_every=1", "eval.features=inception"]
    code, err = run_cli(tmp_path, capsys, *inception_on, f"eval.inception_weights={tmp_path / 'missing.safetensors'}")
    assert code == 2 and err.count("\n") == 1 and "missing.safetensors does not exist" in err, err

    tensors = model_tensors(inception.random_inception(0))
    tensors.pop("Mixed_7c.branch_pool.conv.kernel")
    tensors["Mixed_5b.branch1x1.conv.kernel"] = np.zeros((1, 1, 192, 63), np.float32)
    wrong = write_safetensors(tmp_path / "wrong.safetensors", tensors)
    code, err = run_cli(tmp_path, capsys, *inception_on, f"eval.inception_weights={wrong}")
    assert code == 2 and "Traceback" not in err, err
    assert "Mixed_7c.branch_pool.conv.kernel" in err and "Mixed_5b.branch1x1.conv.kernel" in err and "63" in err

    small = tmp_path / "digits_ref.npz"
    fid.save_statistics(small, np.zeros(64), np.eye(64))
    code, err = run_cli(tmp_path, capsys, "eval.fid_every=1", "eval.fid_samples=200", f"eval.reference={small}")
    assert code == 0, err  # the digits classifier's features are 64-d
    right = write_safetensors(tmp_path / "right.safetensors", model_tensors(inception.random_inception(0)))
    code, err = run_cli(tmp_path, capsys, *inception_on, f"eval.inception_weights={right}", f"eval.reference={small}")
    assert code == 2 and err.count("\n") == 1 and "64-d features" in err and "2048-d" in err, err


def test_the_digits_classifier_refuses_digits_resized_to_other_than_multiples_of_8(tmp_path, capsys):
    code, err = run_cli(tmp_path, capsys, "eval.fid_every=1", "data.image_size=12", "model.input_dim=[12,12,1]")
    assert code == 2 and err.count("\n") == 1 and "eval.features=digits scores 8x8 digits" in err, err


@pytest.mark.slow  # a training run with its FID hook: about 10 s on 2 cores
def test_a_pixel_model_of_the_digits_at_16x16_logs_val_fd(tmp_path, capsys, quick_classifier):
    code, err = run_cli(tmp_path, capsys, "eval.fid_every=2", "data.image_size=16", "model.input_dim=[16,16,1]")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "run0" / "logs" / "metrics.jsonl").read_text().splitlines()]
    scores = [row["val/fd"] for row in rows if "val/fd" in row]
    assert len(scores) == 1 and np.isfinite(scores[0]) and scores[0] > 0


def test_images_a_multiple_of_the_scored_size_are_average_pooled_to_it(caplog):
    """A pixel model of 16x16 images, a network of 8x8 ones: samples and reference data are pooled 2x2,
    the same as pooling them by hand on the host."""
    graphdef, weights = nnx.split(TinyFeatures(nnx.Rngs(0)))
    network = FeatureNetwork("fd", 16, graphdef, weights, image_shape=(8, 8, 1))
    trainer = Trainer(tiny_model_config(input_dim=(16, 16, 1)), training_config(batch_size=16),
                      np.zeros((16, 16, 16, 1), np.float32), None, None)
    with captured(caplog):
        hook = FIDHook.for_run(EvalConfiguration(fid_every=1, fid_samples=16), trainer.engine, sink=Sink(), best=Best(),
                               batch_size=16, experiment_config=None, reference_data=None, network=network)
    assert hook is not None and "samples of 16x16x1 are average-pooled" in caplog.text

    def by_hand(images):
        pooled = np.asarray(images).reshape(-1, 8, 2, 8, 2, 1).mean(axis=(2, 4))
        return fid.FeatureStatistics.of(np.asarray(network.apply(network.weights, np.clip(pooled, 0, 1))))

    samples = hook._sample(trainer.engine.eval_params(trainer.state), trainer.state.model_state,
                           jax.random.fold_in(jax.random.PRNGKey(hook.seed), 0), None, 16, hook.sampling)
    on_mesh, on_host = hook.sample_statistics(trainer.state), by_hand(samples)
    np.testing.assert_allclose(on_mesh.mean(), on_host.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(on_mesh.covariance(), on_host.covariance(), rtol=1e-4, atol=1e-6)
    images = np.random.default_rng(0).uniform(0, 1, (20, 16, 16, 1)).astype(np.float32)
    np.testing.assert_allclose(hook.data_statistics(images).mean(), by_hand(images).mean(), rtol=1e-5, atol=1e-6)


def test_samples_the_network_cannot_score_turn_the_hook_off_with_a_warning(caplog):
    from tests.engine_models import TanhModel
    from workshop_dist.models import ModelConfiguration

    model = TanhModel(ModelConfiguration(input_dim=(8, 8, 1)), rngs=nnx.Rngs(0))  # samples [N, 64]
    trainer = Trainer(model, training_config(batch_size=16), np.zeros((16, 8, 8, 1), np.float32), None, None)
    config = EvalConfiguration(fid_every=10, fid_samples=100)
    with captured(caplog):
        hook = FIDHook.for_run(config, trainer.engine, sink=Sink(), best=Best(), batch_size=16, experiment_config=None,
                               reference_data=None, network=tiny_network())
    assert hook is None and "this model's samples are (64,), which fd cannot score" in caplog.text
    scored = FIDHook.for_run(config, vae_trainer(make_mesh(MeshConfiguration())).engine, sink=Sink(), best=Best(),
                             batch_size=16, experiment_config=None, reference_data=None, network=tiny_network())
    assert scored is not None  # the VAE's samples are 8x8x1 images
