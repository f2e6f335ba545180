"""The on-the-fly latent model (``model_class: latent``): a frozen autoencoder encodes pixels inside the step,
a flow-matching DiT trains on the latents, samples decode to pixels. Tiny random-weight autoencoders in
safetensors under tmp_path; nothing is downloaded. Every test compiles a convolutional first stage: all slow."""

import json
import os
import signal
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from tests.helpers import (
    StreamedProcess,
    checkpoint_arrays,
    digits_images,
    resume_run_settings,
    training_config,
)
from workshop_dist.config import ConfigError
from workshop_dist.eval.config import EvalConfiguration
from workshop_dist.models import DataSpec, ExampleKeys, ModelConfiguration, create_model
from workshop_dist.models.autoencoder import Autoencoder
from workshop_dist.models.autoencoder_weights import FORMAT
from workshop_dist.parallel import MeshConfiguration
from workshop_dist.training import Trainer
from workshop_dist.training.first_stage import load_first_stage
from workshop_dist.training.preemption import EXIT_PREEMPTED
from workshop_dist.weights import model_tensors, read_safetensors, write_safetensors

REPO = Path(__file__).resolve().parents[1]
TINY = {"block_out_channels": [8, 8], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 4,
        "mid_block_attention": False, "scaling_factor": 0.5}  # 8x8x1 digits <-> 4x4x4 latents
BACKBONE = {"model_class": "dit", "parameters": {"patch_size": 2, "hidden_size": 32, "depth": 1, "num_heads": 2,
                                                 "objective": "flow_matching", "sampler": "euler", "sampling_steps": 2}}
UNIT = DataSpec(normalize="unit")


def write_weights(path: Path, seed: int = 3) -> Path:
    config = ModelConfiguration(model_class="autoencoder", input_dim=(8, 8, 1), parameters=TINY)
    model = nnx.eval_shape(lambda: Autoencoder(config, rngs=nnx.Rngs(seed)))
    nnx.update(model, jax.jit(lambda: nnx.state(Autoencoder(config, rngs=nnx.Rngs(seed))))())  # one compiled init
    metadata = {"format": FORMAT, "parameters": json.dumps(TINY), "channels": "1", "source": "test"}
    return write_safetensors(path, model_tensors(model), metadata)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return write_weights(tmp_path_factory.mktemp("ae") / "ae.safetensors")


def latent_config(weights: Path, **parameters) -> ModelConfiguration:
    return ModelConfiguration(model_class="latent", input_dim=(8, 8, 1), data=UNIT,
                              parameters={"autoencoder": str(weights), "backbone": BACKBONE, **parameters})


def trainer(model, data, **fields) -> Trainer:
    fields = {"batch_size": 64, "steps_per_epoch": 3, "num_epochs": 1, "log_every": 1, "num_samples": 0,
              "optimizer": {"optimizer_type": "adam", "learning_rate": 1e-3}, "ema": {"decay": 0.9}, **fields}
    extra = {k: fields.pop(k) for k in ("workdir", "val", "eval_config", "experiment_config") if k in fields}
    return Trainer(model, training_config(**fields), data, extra.get("val"), extra.get("workdir"),
                   mesh_config=MeshConfiguration(data=8), eval_config=extra.get("eval_config"),
                   experiment_config=extra.get("experiment_config"))


@pytest.mark.slow  # compiles the convolutional first stage's step, evaluation and sampler on 8 devices
def test_the_autoencoder_is_a_frozen_group_and_samples_are_pixels(weights, tmp_path):
    run = trainer(latent_config(weights), digits_images(), workdir=tmp_path)
    try:
        run.train_epoch()
        tensors, _ = read_safetensors(weights)
        params = jax.device_get(run.state.params)
        np.testing.assert_array_equal(params["autoencoder"]["encoder"]["conv_in"]["kernel"],
                                      tensors["encoder.conv_in.kernel"])  # the file's weights, unchanged by training
        assert set(run.state.ema_params) == {"backbone"}
        leaves = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(run.state.opt_state)[0]]
        assert leaves and not [name for name in leaves if "autoencoder" in name]
        samples = run.generate_samples(8, seed=0)
        assert samples.shape == (8, 8, 8, 1) and samples.min() >= 0 and samples.max() <= 1
        table = (tmp_path / "logs" / "train.log").read_text().split("Model parameters:", 1)[1]
        assert "autoencoder/encoder/conv_in/kernel (frozen)" in table and "backbone/network" in table
    finally:
        run.close()


@pytest.mark.slow  # two trainers, a convolutional first stage compiled on 8 devices
def test_on_the_fly_training_equals_training_on_pre_encoded_latents(weights):
    """The same backbone trained on pixels encoded in the step and on latents encoded beforehand by
    workshop_dist.training.first_stage (the pre-extraction path): the same params after 3 steps."""
    images = digits_images()
    stage = load_first_stage(weights)
    mean, _ = jax.jit(stage.encode_fn)(stage.params, images)
    latents = np.asarray(mean) * stage.scale_factor
    pre = ModelConfiguration.model_validate({**BACKBONE, "input_dim": latents.shape[1:], "data": DataSpec(normalize="latent")})
    ours, theirs = trainer(latent_config(weights), images), trainer(pre, latents)
    try:
        ours.train_epoch()
        theirs.train_epoch()
        mine, reference = jax.device_get((ours.state.params["backbone"], theirs.state.params))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), mine, reference)
        np.testing.assert_allclose(ours.train_metrics[-1]["loss"], theirs.train_metrics[-1]["loss"], rtol=1e-5)
    finally:
        ours.close()
        theirs.close()


@pytest.mark.slow  # compiles the convolutional first stage and the DiT
def test_posterior_draws_per_example_in_training_and_the_mean_in_evaluation(weights):
    model = create_model(latent_config(weights, encode="sample"), rngs=nnx.Rngs(0))
    images = digits_images()[:16]

    @nnx.jit
    def run(model, images, key):  # one compiled program per mode: eager convolutions are slow
        keys = ExampleKeys.of(key, 16)
        mean, drawn, again = model.encode(images), model.encode(images, keys.fold_in(7)), model.encode(images, keys.fold_in(7))
        return mean, drawn, again, model.example_losses({"image": images}, keys)["loss"], \
            model.backbone.example_losses({"image": mean}, keys)["loss"]

    mean, drawn, again, losses, on_mean = run(model, images, jax.random.key(1))
    assert drawn.shape == (16, 4, 4, 4) and not np.allclose(drawn, mean)
    np.testing.assert_array_equal(again, drawn)  # each example's own key
    assert not np.allclose(losses, on_mean)  # training: the loss of a draw
    model.eval()
    _, _, _, losses, on_mean = run(model, images, jax.random.key(1))
    np.testing.assert_allclose(losses, on_mean, rtol=1e-6)  # evaluation: the loss of the mean
    with pytest.raises(ConfigError, match="holds no autoencoder weights"):
        other = write_safetensors(weights.with_name("other.safetensors"), {"w": np.zeros(2, np.float32)}, {"format": "x"})
        create_model(latent_config(other), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="divide by 2"):
        create_model(latent_config(weights).model_copy(update={"input_dim": (9, 9, 1)}), rngs=nnx.Rngs(0))


@pytest.mark.slow  # trains, evaluates and samples 64 images for the hook
def test_the_fid_hook_scores_the_decoded_pixels(weights):
    val = digits_images("validation")[:64]
    run = trainer(latent_config(weights), digits_images(), val=val, steps_per_epoch=2,
                  eval_config=EvalConfiguration(fid_every=2, fid_samples=64, features="digits"),
                  experiment_config={"data": {"source": "digits", "normalize": "unit"}})
    try:
        run.fit()
        (record,) = run._fid.history  # the hook scored the decoded 8x8 samples once, at step 2
        assert record["step"] == 2 and np.isfinite(record["fd"]) and record["fd"] > 0
    finally:
        run.close()


# --- 8 devices through the CLI, a SIGTERM and a resume (processes) --------------------------------


def cli(workdir: Path, weights: Path) -> StreamedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    backbone = json.dumps(BACKBONE)
    command = [sys.executable, "-m", "workshop_dist.cli", "--workdir", str(workdir), *resume_run_settings(3),
               "model.model_class=latent", "model.input_dim=[8, 8, 1]", "data.normalize=unit", "eval.fid_every=null",
               f"model.parameters={{autoencoder: {weights}, encode: sample, backbone: {backbone}}}", "training.ema.decay=0.9"]
    return StreamedProcess(command, env=env, cwd=REPO)


@pytest.mark.slow
def test_sigterm_resume_on_8_devices_is_bit_identical(weights, tmp_path):
    full = cli(tmp_path / "full", weights)
    assert full.finish() == 0, full.output[-3000:]
    run = cli(tmp_path / "run", weights)
    run.wait_for("train step 9:")
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == EXIT_PREEMPTED, run.output[-3000:]
    run = cli(tmp_path / "run", weights)
    assert run.finish() == 0, run.output[-3000:]
    assert "Resumed from" in run.output and "8 global" in run.output
    final = max(int(p.name) for p in (tmp_path / "full" / "checkpoints").iterdir() if p.name.isdigit())
    resumed = checkpoint_arrays(tmp_path / "run" / "checkpoints" / str(final))
    reference = checkpoint_arrays(tmp_path / "full" / "checkpoints" / str(final))
    assert resumed.keys() == reference.keys() and any(n.startswith("params/autoencoder") for n in resumed)
    for name in resumed:
        np.testing.assert_array_equal(resumed[name], reference[name], err_msg=name)


@pytest.mark.slow  # trains an autoencoder run first
def test_the_autoencoder_from_a_run_and_the_config_as_written(tmp_path):
    from workshop_dist.experiment import ExperimentConfiguration

    ae = ModelConfiguration(model_class="autoencoder", input_dim=(8, 8, 1), parameters=TINY, data=UNIT)
    source = trainer(ae, digits_images(), workdir=tmp_path / "ae", steps_per_epoch=2, ema={"decay": None},
                     experiment_config={"model": ae.model_dump(mode="json"), "data": {"source": "digits", "normalize": "unit"}})
    source.fit()
    saved = jax.device_get(source.engine.eval_params(source.state))
    source.close()
    run = trainer(latent_config(tmp_path / "ae"), digits_images())
    try:
        run.train_epoch()
        ours = jax.device_get(run.state.params["autoencoder"])
        np.testing.assert_array_equal(ours["decoder"]["conv_out"]["kernel"], saved["decoder"]["conv_out"]["kernel"])
    finally:
        run.close()
    config = ExperimentConfiguration.load(REPO / "configs" / "latent_onthefly_flow_dit_digits32.yaml",
                                          [f"model.parameters.autoencoder={tmp_path / 'ae'}"])
    assert config.model.model_class == "latent" and config.model.parameters["backbone"]["model_class"] == "dit"
