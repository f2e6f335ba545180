"""Latent diffusion end to end: the first stage loaded from an autoencoder run (its EMA params), a
flow-matching DiT trained on encoded digits on 8 devices with decoded sample grids and val/fd, and
its bit-identical resume after a SIGTERM; the shipped latent config fits the autoencoder config."""

import functools
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from tests.helpers import checkpoint_arrays, interrupt_then_resume
from tests.test_autoencoder import TINY, build
from tests.test_encode import small_digits, write_weights
from workshop_dist import data
from workshop_dist.encode import encode_dataset
from workshop_dist.experiment import ExperimentConfiguration
from workshop_dist.models import create_model
from workshop_dist.training import Trainer
from workshop_dist.training.first_stage import FirstStageError, load_first_stage

REPO = Path(__file__).resolve().parents[1]
STEPS, STOP = 8, 4


def test_the_latent_config_fits_the_autoencoder_config():
    latent = ExperimentConfiguration.load(REPO / "configs" / "latent_flow_dit_digits32.yaml")
    autoencoder = ExperimentConfiguration.load(REPO / "configs" / "autoencoder_digits32.yaml")
    first = nnx.eval_shape(lambda: create_model(autoencoder.model))
    assert tuple(latent.model.input_dim) == first.latent_shape == (8, 8, 4)
    assert latent.data.normalize == "latent" and latent.model.data.max_value is None
    assert latent.model.decoder == "runs/autoencoder" and latent.eval.features == "digits"
    model = nnx.eval_shape(lambda: create_model(latent.model))
    assert model.latent_data and model.num_classes == 10


@pytest.mark.slow  # builds, checkpoints and restores an autoencoder run twice (~9 s on 2 cores)
def test_first_stage_from_a_run_takes_its_ema_params(tmp_path):
    config = ExperimentConfiguration.from_dict({
        "model": {"model_class": "autoencoder", "input_dim": [16, 16, 1], "parameters": {**TINY, "scaling_factor": 0.3}},
        "training": {"batch_size": 8, "ema": {"decay": 0.9}, "length": {"max_steps": 1}},
    }, [])
    model = build((16, 16, 1), scaling_factor=0.3)  # numpy-initialised: a jitted initialisation takes minutes here
    trainer = Trainer(model, config.training, None, None, tmp_path / "run", experiment_config=config.model_dump(mode="json"))
    state = trainer.state
    trainer.state = state.replace(ema_params=jax.tree.map(lambda p: p + 1.0, state.params))  # tell them apart
    trainer.save_checkpoint()
    trainer.close()
    for path in (tmp_path / "run", tmp_path / "run" / "checkpoints" / "0"):  # a workdir, one checkpoint
        stage = load_first_stage(path)
        assert stage.scale_factor == 0.3 and stage.factor == 4 and stage.latent_channels == 4
        got = nnx.to_pure_dict(nnx.state(nnx.merge(stage.graphdef, stage.params), nnx.Param))
        expected = jax.device_get(trainer.state.ema_params)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
            np.testing.assert_array_equal(np.asarray(a), b)
    with pytest.raises(FirstStageError, match="decodes 4-channel latents"):
        stage.image_shape((4, 4, 3))


def latent_config(latents: Path, decoder: Path) -> ExperimentConfiguration:
    return ExperimentConfiguration.from_dict({
        "model": {"model_class": "dit", "input_dim": [4, 4, 4], "decoder": str(decoder), "parameters": {
            "patch_size": 2, "hidden_size": 32, "depth": 1, "num_heads": 2, "objective": "flow_matching",
            "num_classes": 10, "sampler": "euler", "sampling_steps": 2}},
        "training": {"batch_size": 16, "length": {"max_steps": STEPS}, "ema": {"decay": 0.9, "start_step": 2},
                     "cadence": {"log_every": 1, "save_every": STEPS, "eval_every": STEPS, "num_samples": 10}},
        "data": {"source": f"array_record:{latents}/{{split}}-*.array_record", "normalize": "latent",
                 "train_split": "validation", "eval_split": "validation"},
        "eval": {"fid_every": STEPS, "fid_samples": 80, "features": "digits"},
    }, [])


def make_trainer(config, workdir, preemption=None, log_callback=None) -> Trainer:
    train = data.make_train_input(config.data, global_batch_size=16, seed=0)
    val = data.make_eval_input(config.data, global_batch_size=16)
    return Trainer(config.model, config.training, train, val, workdir, experiment_config=config.model_dump(mode="json"),
                   eval_config=config.eval, preemption=preemption, log_callback=log_callback)


@pytest.mark.slow  # trains a latent DiT three times, samples, decodes and scores them
def test_latent_flow_dit_decodes_samples_scores_fd_and_resumes_bit_identically(tmp_path):
    decoder = write_weights(tmp_path / "ae.safetensors")
    encode_dataset(small_digits(64), tmp_path / "latents", load_first_stage(decoder), shards=2, progress=False)
    config = latent_config(tmp_path / "latents", decoder)
    assert jax.device_count() == 8

    full = make_trainer(config, tmp_path / "full")
    full.fit()
    assert full.decoder is not None and full.decoder.scale_factor == 0.5
    fd = [row["fd"] for row in full._fid.history]
    assert len(fd) == 1 and np.isfinite(fd[0]) and fd[0] > 0  # val/fd of the decoded, pooled samples
    grid = tmp_path / "full" / "samples" / f"step_{STEPS}.png"
    assert grid.is_file()
    samples = full.generate_samples(3, seed=0, labels=np.arange(3))
    assert samples.shape == (3, 16, 16, 1) and 0.0 <= samples.min() <= samples.max() <= 1.0  # pixels, not latents
    saved = checkpoint_arrays(tmp_path / "full" / "checkpoints" / str(STEPS))
    assert saved and not any("quant_conv" in name or "mid_block" in name for name in saved)  # the decoder is not saved
    assert len(saved) == len(jax.tree.leaves(full.state))

    stopped, resumed = interrupt_then_resume(functools.partial(make_trainer, config), tmp_path / "run", STOP)
    assert STOP <= stopped < STEPS
    resumed.fit()
    for a, b in zip(jax.tree.leaves(jax.device_get(resumed.state)), jax.tree.leaves(jax.device_get(full.state)),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert [row["fd"] for row in resumed._fid.history] == fd
    for trainer in (full, resumed):
        trainer.close()


def test_decodes_are_pooled_to_the_one_size_a_feature_network_scores():
    from workshop_dist.training.hooks.fid import pool_to, pooled_shape

    images = np.random.default_rng(0).uniform(size=(2, 32, 32, 1)).astype(np.float32)
    pooled = np.asarray(pool_to(images, (8, 8, 1)))
    np.testing.assert_allclose(pooled[1, 2, 3, 0], images[1, 8:12, 12:16, 0].mean(), rtol=1e-6)
    assert pooled_shape((32, 32, 1), (8, 8, 1)) == (8, 8, 1)
    assert pooled_shape((30, 32, 1), (8, 8, 1)) == (30, 32, 1)  # not a multiple: left as it is (then not scored)
    assert pooled_shape((32, 32, 3), (8, 8, 1)) == (32, 32, 3) and pooled_shape((32, 32, 3), None) == (32, 32, 3)
