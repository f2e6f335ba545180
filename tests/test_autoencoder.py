"""The SD-layout KL autoencoder: shapes at factors 4 and 8, encode/decode in data space, the objective,
its config, diffusers-named weights (built here without PyTorch), the digits at 32x32, and a few
steps of training through the Trainer on 8 devices. Parity with diffusers itself: test_autoencoder_parity.py."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import training_config
from workshop_dist import data
from workshop_dist.config import ConfigError
from workshop_dist.data.config import DataConfiguration
from workshop_dist.data.transforms import ResizeImage
from workshop_dist.experiment import ExperimentConfiguration
from workshop_dist.models import ExampleKeys, ModelConfiguration, create_model
from workshop_dist.models.autoencoder import Autoencoder
from workshop_dist.models.autoencoder_gan import AdversarialAutoencoder
from workshop_dist.models.autoencoder_weights import abstract_autoencoder, convert_sd_vae, load_autoencoder
from workshop_dist.training import Trainer
from workshop_dist.weights import WeightsError, load_tensors, model_shapes, write_safetensors

REPO = Path(__file__).resolve().parents[1]
TINY = {"block_out_channels": [8, 16, 16], "layers_per_block": 1, "norm_num_groups": 8}


def config(input_dim=(32, 32, 1), **parameters) -> ModelConfiguration:
    return ModelConfiguration(model_class="autoencoder", input_dim=input_dim, parameters={**TINY, **parameters})


def build(input_dim=(32, 32, 1), seed=0, **parameters) -> Autoencoder:
    """With random weights drawn by numpy: jax's initialisers compile one program per shape (a minute on
    2 cores, eagerly or jitted); numpy takes milliseconds."""
    model = nnx.eval_shape(lambda: create_model(config(input_dim, **parameters)))
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in model_shapes(model).items():
        if name.endswith(".kernel"):
            tensors[name] = rng.standard_normal(shape, np.float32) / np.float32(np.sqrt(np.prod(shape[:-1])))
        else:  # GroupNorm scales near 1, biases near 0
            tensors[name] = np.float32(name.endswith(".scale")) + 0.1 * rng.standard_normal(shape, np.float32)
    load_tensors(model, tensors)
    return model


def images(shape, seed=0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


@pytest.fixture(scope="module")
def model() -> Autoencoder:
    return build()


@nnx.jit(static_argnames="method")
def call(model: Autoencoder, method: str, *args):
    return getattr(model, method)(*args)


@pytest.mark.parametrize(("widths", "factor"), [([8, 16, 16], 4), ([8, 8, 16, 16], 8)])
def test_encode_decode_and_sample_shapes(widths, factor):
    abstract = nnx.eval_shape(lambda: create_model(config((32, 16, 3), block_out_channels=widths, latent_channels=3)))
    assert abstract.factor == factor and abstract.latent_shape == (32 // factor, 16 // factor, 3)
    x = jax.ShapeDtypeStruct((2, 32, 16, 3), jnp.float32)
    mean, logvar = nnx.eval_shape(lambda m, x: m.encode(x), abstract, x)
    assert mean.shape == logvar.shape == (2, 32 // factor, 16 // factor, 3)
    assert nnx.eval_shape(lambda m, z: m.decode(z), abstract, mean).shape == (2, 32, 16, 3)
    assert nnx.eval_shape(lambda m: m.sample(jax.random.key(0), 3), abstract).shape == (3, 32, 16, 3)
    losses = nnx.eval_shape(lambda m, x: m.example_losses({"image": x}, jax.random.key(0)), abstract, x)
    assert {name: value.shape for name, value in losses.items()} == dict.fromkeys(("loss", "reconstruction", "kl", "mse"), (2,))
    with pytest.raises(ConfigError, match=r"model.input_dim=\[32, 16, 3\]"):
        nnx.eval_shape(lambda m, x: m.encode(x), abstract, jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32))


def test_data_space_and_the_objective(model):
    x = images((4, 32, 32, 1))
    np.testing.assert_allclose(model.to_data(model.to_network(x)), x, atol=1e-6)
    assert float(model.to_network(jnp.zeros(1))[0]) == -1.0 and float(model.to_network(jnp.ones(1))[0]) == 1.0
    out = call(model, "example_losses", {"image": x}, jax.random.key(0))
    np.testing.assert_allclose(out["loss"], out["reconstruction"] + 1e-6 * out["kl"], rtol=1e-6)
    # the same example draws the same latent noise at any position of any batch (per-example keys)
    again = call(model, "example_losses", {"image": x[:2]}, jax.random.key(0))
    np.testing.assert_allclose(again["loss"], out["loss"][:2], rtol=1e-5)
    mean, _ = call(model, "encode", x)
    samples = nnx.jit(lambda m, key: m.sample(key, 2))(model, jax.random.key(0))
    assert call(model, "decode", mean).shape == x.shape and 0.0 <= float(samples.min()) <= float(samples.max()) <= 1.0


@nnx.jit
def by_hand(model: Autoencoder, x: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The L1 and L2 errors (summed, in [-1, 1]) and the KL, from encode/decode and the same per-example noise."""
    mean, logvar = model.encode(x)
    eps = ExampleKeys.of(key, x.shape[0]).normal(model.latent_shape)
    error = model.decode(mean + jnp.exp(0.5 * logvar) * eps) * 2 - 1 - model.to_network(x)
    kl = 0.5 * (mean**2 + jnp.exp(logvar) - 1 - logvar).sum((1, 2, 3))
    return jnp.abs(error).sum((1, 2, 3)), (error**2).sum((1, 2, 3)), kl


def test_l1_and_l2_losses_follow_their_formulas(model):
    x, key = images((2, 32, 32, 1)), jax.random.key(3)
    l1, l2, kl = by_hand(model, x, key)
    out = call(model, "example_losses", {"image": x}, key)
    np.testing.assert_allclose(out["reconstruction"], l1, rtol=1e-5)
    np.testing.assert_allclose(out["kl"], kl, rtol=1e-5)
    other = nnx.clone(model)
    other.params_config = model.params_config.model_copy(update={"reconstruction": "l2", "kl_weight": 0.5})
    out = call(other, "example_losses", {"image": x}, key)
    np.testing.assert_allclose(out["reconstruction"], l2, rtol=1e-5)
    np.testing.assert_allclose(out["loss"], l2 + 0.5 * kl, rtol=1e-5)


def test_logvar_is_clipped_as_diffusers_does(model):
    model = nnx.clone(model)
    bias = model.quant_conv.bias
    bias[...] = jnp.full(bias.shape, 1e3)  # every moment far above the clip
    mean, logvar = call(model, "encode", images((4, 32, 32, 1)))
    assert float(logvar.max()) == float(logvar.min()) == 20.0 and float(mean.min()) > 100


def test_levels_data_and_bad_sizes():
    levels = ModelConfiguration(model_class="autoencoder", input_dim=(32, 32, 1), parameters=TINY,
                                data={"num_levels": 17, "normalize": "levels"})
    model = nnx.eval_shape(lambda: create_model(levels))
    assert model.max_value == 16.0 and model.levels
    with pytest.raises(ConfigError, match="not divisible by it"):
        create_model(config((30, 32, 1)))
    with pytest.raises(ConfigError, match=r"block_out_channels \[12\] are not divisible by norm_num_groups=8"):
        create_model(config(block_out_channels=[8, 12]))
    with pytest.raises(ConfigError, match="input_dim"):
        create_model(config((32, 32)))


def test_the_config_loads_and_its_data_is_32x32():
    config = ExperimentConfiguration.load(REPO / "configs" / "autoencoder_digits32.yaml")
    model = nnx.eval_shape(lambda: create_model(config.model))
    assert isinstance(model, Autoencoder) and model.factor == 4 and model.latent_shape == (8, 8, 4)
    assert model.scaling_factor == 0.27 and config.data.image_size == 32
    batch = next(iter(data.make_train_input(config.data, global_batch_size=8, seed=0)))
    assert batch["image"].shape == (8, 32, 32, 1) and batch["image"].dtype == np.float32
    assert batch["image"].min() >= 0.0 and batch["image"].max() <= 1.0


def test_digits_resize_keeps_integer_levels():
    digit = np.arange(64, dtype=np.uint8).reshape(8, 8, 1) % 17
    out = ResizeImage(32).map({"image": digit, "label": np.int64(3)})
    assert out["image"].shape == (32, 32, 1) and out["image"].dtype == np.uint8 and out["label"] == 3
    assert out["image"].max() <= 16
    with pytest.raises(ConfigError, match=r"data\.channels only apply to 'images:PATH' sources"):
        data.make_train_input(DataConfiguration(image_size=32, channels=3), global_batch_size=8, seed=0)


def diffusers_state(model: nnx.Module, seed: int = 0) -> dict[str, np.ndarray]:
    """A random state dict under diffusers' names and PyTorch's layouts for ``model``'s structure."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in model_shapes(model).items():
        prefix, leaf = name.rsplit(".", 1)
        torch_shape = {4: lambda s: (s[3], s[2], s[0], s[1]), 2: lambda s: (s[1], s[0])}.get(len(shape), tuple)(shape)
        state[f"{prefix}.{'bias' if leaf == 'bias' else 'weight'}"] = rng.standard_normal(torch_shape, np.float32)
    return state


def test_diffusers_names_convert_and_mismatches_are_one_error(tmp_path):
    parameters = {"block_out_channels": [32, 64], "layers_per_block": 1, "latent_channels": 4}
    state = diffusers_state(abstract_autoencoder(parameters, (2, 2, 3)))
    assert "encoder.mid_block.attentions.0.to_out.0.weight" in state and "decoder.up_blocks.0.upsamplers.0.conv.weight" in state
    write_safetensors(tmp_path / "vae.safetensors", state)
    convert_sd_vae(tmp_path / "vae.safetensors", tmp_path / "nnx.safetensors")
    model = load_autoencoder(tmp_path / "nnx.safetensors", (16, 16, 3))
    kernel = np.asarray(model.encoder.down_blocks[0].resnets[0].conv1.kernel[...])
    np.testing.assert_array_equal(kernel, state["encoder.down_blocks.0.resnets.0.conv1.weight"].transpose(2, 3, 1, 0))
    q = np.asarray(model.decoder.mid_block.attentions[0].to_q.kernel[...])
    np.testing.assert_array_equal(q, state["decoder.mid_block.attentions.0.to_q.weight"].T)

    # diffusers' config.json beside the file gives what the shapes cannot: the group count (and the scaling factor)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "norm_num_groups": 16,
                                                       "scaling_factor": 0.13025, "act_fn": "silu"}))
    convert_sd_vae(tmp_path / "vae.safetensors", tmp_path / "nnx16.safetensors")
    grouped = load_autoencoder(tmp_path / "nnx16.safetensors", (16, 16, 3))
    assert grouped.encoder.conv_norm_out.num_groups == 16 and grouped.scaling_factor == 0.13025
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny"}))
    with pytest.raises(WeightsError, match="describes AutoencoderTiny, not AutoencoderKL"):
        convert_sd_vae(tmp_path / "vae.safetensors", tmp_path / "never.safetensors")
    (tmp_path / "config.json").unlink()

    broken = dict(state)
    del broken["decoder.up_blocks.1.resnets.1.conv2.bias"]
    broken["encoder.extra_head.weight"] = np.zeros((3, 3), np.float32)
    write_safetensors(tmp_path / "broken.safetensors", broken)
    with pytest.raises(WeightsError) as caught:
        convert_sd_vae(tmp_path / "broken.safetensors", tmp_path / "never.safetensors")
    message = str(caught.value)
    assert "encoder.extra_head.weight" in message and "decoder.up_blocks.1.resnets.1.conv2.bias" in message
    assert "1 unmatched, 1 missing" in message and not (tmp_path / "never.safetensors").exists()
    with pytest.raises(WeightsError, match="not a diffusers AutoencoderKL state dict"):
        write_safetensors(tmp_path / "other.safetensors", {"fc.weight": np.zeros((2, 2), np.float32)})
        convert_sd_vae(tmp_path / "other.safetensors", tmp_path / "never.safetensors")
    with pytest.raises(WeightsError, match="was not written by convert_sd_vae"):
        load_autoencoder(tmp_path / "vae.safetensors", (16, 16, 3))


@pytest.mark.slow  # compiles and trains the autoencoder on 8 devices (~30 s on 2 cores)
def test_trainer_lowers_the_loss_on_8_devices(tmp_path):
    overrides = ["model.parameters.block_out_channels=[8,16]", "model.input_dim=[16,16,1]", "data.image_size=16",
                 "training.batch_size=32", "training.length.max_steps=12", "training.cadence.log_every=1",
                 "training.cadence.num_samples=0", "training.scheduler=null", "training.optimizer.learning_rate=3e-3"]
    config = ExperimentConfiguration.load(REPO / "configs" / "autoencoder_digits32.yaml", overrides)
    assert jax.device_count() == 8
    train = data.make_train_input(config.data, global_batch_size=32, seed=0)
    trainer = Trainer(config.model, config.training, train, None, tmp_path)
    trainer.fit()
    losses = [row["loss"] for row in trainer.train_metrics]
    assert len(losses) == 12 and np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    samples = trainer.generate_samples(2, seed=0)
    assert samples.shape == (2, 16, 16, 1)
    trainer.close()


def test_the_discriminator_flag_selects_two_parameter_groups():
    model = nnx.eval_shape(lambda: create_model(config(discriminator=True, disc_width=8)))
    assert isinstance(model, AdversarialAutoencoder) and model.param_groups.keys() == {"autoencoder", "discriminator"}
    assert model.latent_shape == (8, 8, 4) and isinstance(model.autoencoder, Autoencoder)
    x = jax.ShapeDtypeStruct((2, 32, 32, 1), jnp.float32)
    keys = {group: set(nnx.eval_shape(
        lambda m, x, group=group: m.example_losses({"image": x}, jax.random.key(0), step=jnp.int32(0), group=group), model, x))
        for group in (None, "autoencoder", "discriminator")}
    assert keys["discriminator"] == {"loss", "real_logit", "fake_logit"}
    assert keys["autoencoder"] == {"loss", "reconstruction", "kl", "mse", "g_loss"}
    assert keys[None] == keys["autoencoder"] | {"d_loss"}
    with pytest.raises(ConfigError, match="disc_width"):
        create_model(config(disc_width=8))  # the discriminator's parameters need discriminator: true


@pytest.mark.slow  # compiles both groups' updates on 8 devices
def test_adversarial_training_moves_both_groups(tmp_path):
    adam = {"optimizer_type": "adam", "learning_rate": 1e-3, "beta1": 0.5}
    training = training_config(batch_size=16, max_steps=3, log_every=1, num_samples=0,
                               optimizers={"autoencoder": adam, "discriminator": adam})
    model_config = config((16, 16, 1), block_out_channels=[8, 16], discriminator=True, disc_width=8, disc_start=1)
    train = data.make_train_input(DataConfiguration(image_size=16, cache=True), global_batch_size=16, seed=0)
    trainer = Trainer(model_config, training, train, None, tmp_path)
    before = jax.device_get(trainer.state.params)
    trainer.fit()
    after = jax.device_get(trainer.state.params)
    for group in ("autoencoder", "discriminator"):
        assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[group]), jax.tree.leaves(after[group]),
                                                            strict=True)), group
    rows = trainer.train_metrics
    assert len(rows) == 3 and {"autoencoder/loss", "discriminator/loss", "autoencoder/g_loss"} <= set(rows[-1])
    assert rows[0]["discriminator/loss"] == 0.0 and rows[-1]["discriminator/loss"] > 0  # off before disc_start
    trainer.close()
