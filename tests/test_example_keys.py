"""Per-example randomness: the built-in families' results do not depend on grad_accum_steps, on the
mesh or on the padding of evaluation batches, because every example draws its noise from its own key."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tests.helpers import digits_images
from workshop_dist import Trainer, create_model, parallel
from workshop_dist.data.digits import load_digits_split
from workshop_dist.experiment import ExperimentConfiguration
from workshop_dist.models import ExampleKeys

REPO = Path(__file__).resolve().parents[1]
SGD = ["training.optimizer.optimizer_type=sgd", "training.scheduler=null", "training.cadence.num_samples=0",
       "training.ema.decay=null", "training.performance.steps_per_call=1", "training.performance.data_on_device=false"]
# family -> (config, overrides that keep it tiny, steps)
FAMILIES = {
    "vae": ("vae_digits", ["training.optimizer.learning_rate=0.05", "training.batch_size=128"], 20),
    "ddpm_unet": ("ddpm_unet_digits", ["model.parameters.widths=[8,16]", "model.parameters.attention_heads=2",
                                       "training.optimizer.learning_rate=0.01", "training.batch_size=32"], 4),
    "dit": ("dit_digits", ["model.parameters.hidden_size=16", "model.parameters.depth=1", "model.parameters.num_heads=2",
                           "training.optimizer.learning_rate=0.01", "training.batch_size=32"], 4),
}
GAN_OPTIMIZERS = ("training.optimizers={generator: {optimizer_type: sgd, learning_rate: 0.01}, "
                  "discriminator: {optimizer_type: sgd, learning_rate: 0.01}}")
FAMILIES["gan"] = ("gan_digits", ["model.hidden_dims=[8,16]", "model.output_dim=8", GAN_OPTIMIZERS,
                                  "training.batch_size=32"], 4)


def config_for(family: str, *extra: str) -> ExperimentConfiguration:
    name, overrides, steps = FAMILIES[family]
    return ExperimentConfiguration.load(REPO / "configs" / f"{name}.yaml",
                                        [*SGD, *overrides, f"training.length.max_steps={steps}", *extra])


def data_for(config: ExperimentConfiguration, split: str = "train") -> dict[str, np.ndarray]:
    raw = load_digits_split(split)
    scale = 16.0 if config.data.normalize == "unit" else 1.0
    return {"image": raw["image"].astype(np.float32) / scale, "label": raw["label"].astype(np.int32)}


def trained(config: ExperimentConfiguration, mesh=None, mesh_config=None) -> Trainer:
    trainer = Trainer(config.model, config.training, data_for(config), None, None, mesh=mesh, mesh_config=mesh_config)
    while not trainer.finished:
        trainer.train_epoch()
    return trainer


def relative_differences(a, b) -> list[float]:
    """Per parameter: ||a - b|| / ||a||, with a floor of 1e-8 on the difference: parameters whose gradient is
    zero in exact arithmetic (a bias right before a normalisation, behind a zero-initialised layer) hold only
    floating-point noise (~1e-12), which no relative tolerance can compare."""
    pairs = zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)), strict=True)
    return [float(max(np.linalg.norm(x - y) - 1e-8, 0.0) / max(np.linalg.norm(x), 1e-30)) for x, y in pairs]


# convolutions inside the accumulation loop run ~20x slower on XLA:CPU: the conv families are slow tests
@pytest.mark.parametrize("family", ["vae", *(pytest.param(f, marks=pytest.mark.slow) for f in ("ddpm_unet", "dit", "gan"))])
def test_accumulation_gives_the_full_batch_run(family):
    """SGD with grad_accum_steps=4 ends where grad_accum_steps=1 does (each example keeps its noise)."""
    config = config_for(family)
    full = trained(config)
    accumulated = trained(config_for(family, "training.performance.grad_accum_steps=4"))
    start = nnx.state(create_model(config.model, rngs=nnx.Rngs(config.training.seed)), nnx.Param)
    assert max(relative_differences(full.state.params, nnx.to_pure_dict(start))) > 1e-3  # training moved them
    assert max(relative_differences(full.state.params, accumulated.state.params)) < 1e-5


def test_results_do_not_depend_on_the_mesh():
    config = config_for("vae", "training.length.max_steps=6", "model.hidden_dims=[32]", "training.batch_size=64")
    one = parallel.MeshConfiguration(data=1)
    single = trained(config, parallel.make_mesh(one, jax.devices()[:1]), one)
    eight = parallel.MeshConfiguration(data=2, fsdp=4)
    sharded = trained(config, parallel.make_mesh(eight), eight)
    assert max(relative_differences(single.state.params, sharded.state.params)) < 1e-5
    val = data_for(config, "validation")
    assert sharded.evaluate(val)["loss"] == pytest.approx(single.evaluate(val)["loss"], rel=1e-5)


@pytest.mark.parametrize("family", ["vae", pytest.param("dit", marks=pytest.mark.slow)])
def test_evaluation_does_not_depend_on_the_batch_size(family):
    config = config_for(family)
    trainer = Trainer(config.model, config.training, None, None, None)
    val = data_for(config, "validation")  # 350 examples: padded batches of both sizes below
    results = [trainer.evaluate(val, batch_size=size) for size in (40, 352)]
    for other in results[1:]:
        assert other["num_examples"] == 350
        for name, value in results[0].items():
            assert other[name] == pytest.approx(value, rel=1e-5), name


def test_example_keys_follow_the_example_and_are_sharded_like_the_batch():
    @jax.jit
    def draws(key):
        keys = ExampleKeys.of(key, 8)
        a, b = keys.split(2)
        return (keys.normal((3,)), ExampleKeys(keys.keys[1::2]).normal((3,)), a.normal(), b.normal(),
                keys.bernoulli(0.5, (4,)), keys.randint(0, 3), keys.categorical(jnp.zeros((8, 5, 4))))

    noise, every_other, a, b, coins, ints, picks = draws(jax.random.key(0))
    assert noise.shape == (8, 3)
    np.testing.assert_array_equal(every_other, noise[1::2])  # a micro-batch draws the same noise
    assert not np.allclose(a, b)
    assert coins.dtype == jnp.bool_ and ints.shape == (8,) and picks.shape == (8, 5)
    keys = ExampleKeys.of(jax.random.key(0), 8)
    assert ExampleKeys.of(keys, 8) is keys and ExampleKeys.of(jax.random.PRNGKey(0), 8).keys.shape == (8,)
    with pytest.raises(ValueError, match="8 example keys"):
        ExampleKeys.of(keys, 4)

    mesh = parallel.make_mesh(parallel.MeshConfiguration(data=8))
    sharding = NamedSharding(mesh, P(parallel.BATCH_AXES))
    derived = jax.jit(lambda k: ExampleKeys.at_positions(k, jnp.arange(64), sharding).keys)(jax.random.key(1))
    assert derived.sharding.is_equivalent_to(sharding, 1)
    assert {shard.data.shape for shard in derived.addressable_shards} == {(8,)}
    np.testing.assert_array_equal(
        jax.random.key_data(derived), jax.random.key_data(ExampleKeys.of(jax.random.key(1), 64).keys)
    )


def test_the_default_vae_gets_one_key_per_example_in_the_step():
    """The keys the step hands the model: example i's is fold_in(update key, i), in whichever micro-batch."""
    config = config_for("vae", "training.batch_size=16")
    seen = []

    trainer = Trainer(config.model, config.training, None, None, None)
    model = trainer.model
    original = type(model).example_losses

    def spy(self, batch, rng, **kwargs):
        seen.append(rng)
        return original(self, batch, rng, **kwargs)

    type(model).example_losses = spy
    try:
        images = {"image": digits_images()[:16]}
        jax.eval_shape(trainer.engine.train_step, trainer.state, images)
    finally:
        type(model).example_losses = original
    assert seen and isinstance(seen[0], ExampleKeys) and len(seen[0]) == 16
