"""The model contract at its edges: clear errors for models that lack it, loss-only models with their own
nnx.Rngs, the layer kit's dtypes, and where the data's levels and the compute dtype come from."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import digits_images
from workshop_dist import ModelConfiguration, Trainer, TrainingConfiguration, create_model
from workshop_dist.config import ConfigError, WorkshopError
from workshop_dist.experiment import ExperimentConfiguration
from workshop_dist.models import DataSpec, layers

VAL = digits_images("validation")
SETTINGS = {"batch_size": 64, "num_epochs": 1, "cadence": {"log_every": 1, "num_samples": 0}}


class NoContract(nnx.Module):
    def __init__(self, config=None, *, rngs=None):
        self.w = nnx.Param(jnp.zeros(3))


class LossButNoSample(NoContract):
    def loss(self, batch, rng):
        return jnp.float32(0.0), {}


def test_a_model_without_the_contract_gets_one_message_naming_what_to_define():
    with pytest.raises(WorkshopError, match=r"NoContract does not follow the model contract: define example_losses") as err:
        Trainer(NoContract(), TrainingConfiguration(**SETTINGS), None, None, None)
    assert "loss(batch, rng)" in str(err.value) and "sample(rng, num_samples" in str(err.value)
    with pytest.raises(WorkshopError, match=r"define sample\(rng") as err:
        Trainer(LossButNoSample(), TrainingConfiguration(**SETTINGS), None, None, None)
    assert "example_losses" not in str(err.value)


def test_a_loss_only_model_with_its_own_rngs_and_dropout_trains_and_evaluates_whole_batches():
    model = create_model(ModelConfiguration(model_class="tests.engine_models.RngsLossOnlyModel"), rngs=0)
    with pytest.warns(UserWarning, match="whole batches"):
        trainer = Trainer(model, TrainingConfiguration(**SETTINGS, length={"max_steps": 3}), digits_images()[:192], None, None)
    trainer.train_epoch()
    assert trainer.step == 3 and all(np.isfinite(row["loss"]) for row in trainer.train_metrics)
    result = trainer.evaluate(VAL[:128], batch_size=64)  # vmapped over the model, this raised TraceContextError
    trained = trainer.model
    trained.eval()  # dropout off, as in evaluation
    x = jnp.asarray(VAL[:128].reshape(128, -1))
    expected = float(((trained.reconstruct(x) - x) ** 2).sum(-1).mean())
    assert result["loss"] == pytest.approx(expected, rel=1e-5) and result["num_examples"] == 128
    assert trainer.generate_samples(2, seed=0).shape == (2, 64)


def test_the_layer_kit_builds_in_the_configured_dtypes():
    bf16 = create_model(ModelConfiguration(hidden_dims=[8], output_dim=4, dtype="bfloat16"), rngs=0)
    assert layers.compute_dtypes(bf16) == {jnp.dtype(jnp.bfloat16)}
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    outputs = bf16.decode(jnp.zeros((2, 4)))
    assert outputs.dtype == jnp.bfloat16  # computes in bf16 with float32 master weights
    stored = nnx.eval_shape(lambda: create_model(ModelConfiguration(param_dtype="bfloat16"), rngs=0))
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(nnx.state(stored, nnx.Param)))
    dit_config = ModelConfiguration(model_class="dit", parameters={"hidden_size": 16, "depth": 1, "num_heads": 2})
    dit = nnx.eval_shape(lambda: create_model(dit_config, rngs=0))
    block = dit.network.blocks[0]
    assert block.key.bias is None and block.query.bias is not None  # softmax ignores a key bias
    with pytest.raises(ConfigError, match=r"model.input_dim=\[8, 8, 1\]"):
        bf16.example_losses({"image": jnp.zeros((2, 4, 4, 1))}, jax.random.key(0))


def test_training_precision_is_a_deprecated_alias_resolved_once_and_a_built_model_keeps_its_dtype():
    config = TrainingConfiguration(**SETTINGS, performance={"precision": "bfloat16"})
    with pytest.warns(DeprecationWarning, match="model.dtype"):
        trainer = Trainer(ModelConfiguration(hidden_dims=[32], output_dim=4), config, None, None, None)
    assert layers.compute_dtypes(trainer.model) == {jnp.dtype(jnp.bfloat16)}
    built = create_model(ModelConfiguration(hidden_dims=[32], output_dim=4), rngs=0)
    with pytest.raises(ConfigError, match=r"ModelConfiguration\(dtype='bfloat16'\)"):
        Trainer(built, config, None, None, None)
    with pytest.raises(ConfigError, match="disagree"):
        ModelConfiguration(dtype="float32").with_precision("bfloat16")


def test_levels_and_pixel_range_come_from_the_data_section():
    levels = ExperimentConfiguration.from_dict({"model": {"model_class": "flow"}, "data": {"normalize": "levels"}})
    assert levels.model.data == DataSpec(num_levels=17, normalize="levels")
    assert "data" not in levels.model.model_dump()  # derived: a saved config re-derives it
    tfds = ExperimentConfiguration.from_dict({"data": {"source": "tfds:mnist", "max_level": 255}})
    assert tfds.model.data.num_levels == 256 and tfds.model.data.max_value == 1.0
    with pytest.raises(ValueError, match=r"model\.data"):
        ExperimentConfiguration.from_dict({"model": {"data": {"num_levels": 5}}, "data": {"normalize": "levels"}})
    gan = ExperimentConfiguration.from_dict({"model": {"model_class": "gan", "hidden_dims": [8, 16]}, "data": {"normalize": "levels"}})
    assert nnx.eval_shape(lambda: create_model(gan.model, rngs=0)).generator.data_max == 16.0
    with pytest.raises(ConfigError, match=r"data\.normalize: levels"):
        create_model(ExperimentConfiguration.from_dict({"model": {"model_class": "pixelcnn"}}).model, rngs=0)
    with pytest.raises(ConfigError, match="bernoulli"):
        create_model(ExperimentConfiguration.from_dict({"data": {"normalize": "levels"}}).model, rngs=0)


def test_old_num_levels_parameter_still_works_with_a_deprecation_message():
    config = ModelConfiguration(model_class="pixelcnn", parameters={"num_levels": 5, "channels": 4, "num_layers": 1,
                                                                     "output_channels": 4, "kernel_size": 3})
    with pytest.warns(DeprecationWarning, match="num_levels is deprecated"):
        model = nnx.eval_shape(lambda: create_model(config, rngs=0))
    assert model.num_levels == 5 and model.logits_out.out_features == 5
    clash = config.model_copy(update={"data": DataSpec(num_levels=17, normalize="levels")})
    with warnings.catch_warnings(), pytest.raises(ConfigError, match="disagrees"):
        warnings.simplefilter("ignore", DeprecationWarning)
        create_model(clash, rngs=0)
