"""avitai-artifex's VAE, DDPM and RealNVP through workshop_dist's adapter, on 8 simulated devices.

Each family trains, evaluates, samples and resumes bit-identically; its objective is checked
against artifex's own ``loss_fn`` on the same random draws. Skipped where artifex is not installed
(it needs Python >= 3.12); CI runs this file in its artifex leg (``.ci/run``).
"""

import jax
import numpy as np
import pytest
from flax import nnx

from tests.helpers import checkpoint_arrays, digits_images
from workshop_dist import ModelConfiguration, Trainer, TrainingConfiguration, create_model
from workshop_dist.config import ConfigError, WorkshopError
from workshop_dist.models import artifex as adapter
from workshop_dist.models import resolve_model_class

TRAIN = digits_images("train")[:256]
VAL = digits_images("validation")[:100]  # 100 = one full batch of 64 and one padded batch
MODELS = "artifex.generative_models.models"
CONFIGS = {  # tiny models: a few seconds of compilation each
    "vae": ModelConfiguration(model_class="artifex_vae", hidden_dims=[32], output_dim=4),
    "ddpm": ModelConfiguration(
        model_class="artifex_ddpm",
        hidden_dims=[8, 16],
        parameters={"noise_schedule": {"num_timesteps": 10}, "backbone": {"time_embedding_dim": 8}},
    ),
    "realnvp": ModelConfiguration(model_class="artifex_realnvp", hidden_dims=[32], parameters={"num_coupling_layers": 2}),
}


@pytest.fixture(scope="module")
def artifex():
    return pytest.importorskip(f"{MODELS}", reason="avitai-artifex is not installed (it needs Python >= 3.12)")


def build(family: str, seed: int = 0):
    return create_model(CONFIGS[family], rngs=nnx.Rngs(seed))


def trainer_for(model, workdir=None, **training):
    settings = {"batch_size": 64, "num_epochs": 1, "log_frequency": 2, "num_samples": 0, **training}
    return Trainer(model, TrainingConfiguration(**settings), TRAIN, VAL, workdir)


def test_a_missing_artifex_is_one_clear_message(monkeypatch):
    real = adapter.importlib.util.find_spec
    monkeypatch.setattr(adapter.importlib.util, "find_spec", lambda name: None if name == "artifex" else real(name))
    with pytest.raises(WorkshopError, match=r"pip install avitai-artifex .*Python >= 3.12"):
        create_model(CONFIGS["vae"])


def test_model_class_names_an_artifex_class_three_ways(artifex):
    vae = resolve_model_class("artifex_vae")
    assert vae is adapter.ArtifexVAE and vae.default_class == f"{MODELS}.vae.base.VAE"
    beta = resolve_model_class("artifex:BetaVAE")
    assert beta.artifex_class is artifex.vae.BetaVAE and issubclass(beta, adapter.ArtifexVAE)
    assert resolve_model_class(f"{MODELS}.vae.beta_vae.BetaVAE") is beta  # one adapter class per artifex class
    ddim = resolve_model_class(f"{MODELS}.diffusion.ddim.DDIMModel")
    assert issubclass(ddim, adapter.ArtifexDiffusion) and ddim.artifex_class is artifex.diffusion.DDIMModel
    assert issubclass(resolve_model_class("artifex:MAF"), adapter.ArtifexFlow)
    model = create_model(ModelConfiguration(model_class="artifex:BetaVAE", hidden_dims=[16], output_dim=2,
                                            parameters={"beta_default": 4.0, "encoder": {"activation": "tanh"}}))
    assert type(model.model) is artifex.vae.BetaVAE and model.model.beta_default == 4.0
    with pytest.raises(ConfigError, match="no class 'Nope'"):
        resolve_model_class("artifex:Nope")
    with pytest.raises(ConfigError, match="not a subclass of VAE, DiffusionModel, NormalizingFlow"):
        resolve_model_class(f"{MODELS}.gan.base.Generator")


def test_parameters_artifex_rejects_name_its_config_class(artifex):
    bad = ModelConfiguration(model_class="artifex_vae", hidden_dims=[16], output_dim=2, parameters={"kl_wieght": 2.0})
    with pytest.raises(ConfigError, match=r"VAEConfig \(for VAE\) rejects them.*kl_wieght"):
        create_model(bad)
    with pytest.raises(ConfigError, match="data_range"):
        create_model(CONFIGS["ddpm"].model_copy(update={"parameters": {**CONFIGS["ddpm"].parameters, "data_range": [1, 0]}}))


def artifex_batch_loss(family: str, model, x, rng) -> float:
    """artifex's own ``loss_fn`` on the whole batch, with the Rngs the adapter would use."""
    copy = nnx.clone(model)
    copy.reseed(rng)
    inner = copy.model
    if family == "vae":
        return float(inner.loss_fn({"x": x}, inner(x))["total_loss"])
    if family == "ddpm":
        return float(inner.loss_fn({"x": 2.0 * x - 1.0})["total_loss"])  # data [0, 1] -> artifex's [-1, 1]
    return float(inner.loss_fn({"x": x.reshape(x.shape[0], -1)}, None)["total_loss"])


# the U-Net runs eagerly here (op by op): slow on CPU
@pytest.mark.parametrize("family", ["vae", pytest.param("ddpm", marks=pytest.mark.slow), "realnvp"])
def test_the_objective_is_artifex_loss_fn_one_value_per_example(artifex, family):
    model = build(family)
    x = jax.numpy.asarray(TRAIN[:16])
    rng = jax.random.PRNGKey(3)
    values = nnx.clone(model).example_losses({"image": x}, rng)
    assert values["loss"].shape == (16,) and float(values["loss"].std()) > 0  # per example, not a broadcast mean
    np.testing.assert_allclose(float(values["loss"].mean()), artifex_batch_loss(family, model, x, rng), rtol=1e-5)
    again = nnx.clone(model).example_losses({"image": x}, rng)
    np.testing.assert_array_equal(values["loss"], again["loss"])  # keyed by rng, not by hidden stream state
    if family != "realnvp":  # the flow's density has no randomness
        other = nnx.clone(model).example_losses({"image": x}, jax.random.PRNGKey(4))
        assert not np.array_equal(values["loss"], other["loss"])


@pytest.mark.slow
@pytest.mark.parametrize("family", list(CONFIGS))
def test_trains_evaluates_samples_and_resumes_bit_identically_on_8_devices(artifex, family, tmp_path):
    assert jax.device_count() == 8

    def run(workdir, max_steps, resume=False):
        trainer = trainer_for(build(family), workdir=workdir, max_steps=max_steps, save_frequency=100)
        if resume:
            assert trainer.restore() == max_steps // 2
        trainer.fit()  # always checkpoints the end
        trainer.close()
        return trainer

    straight = run(tmp_path / "straight", 4)
    before = trainer_for(build(family)).evaluate(VAL)
    run(tmp_path / "resumed", 2)
    resumed = run(tmp_path / "resumed", 4, resume=True)
    assert straight.step == resumed.step == 4
    for part in ("params", "opt_state", "model_state"):
        a, b = jax.device_get(getattr(straight.state, part)), jax.device_get(getattr(resumed.state, part))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(x, y, err_msg=part)
    saved = checkpoint_arrays(tmp_path / "straight" / "checkpoints" / "4")
    again = checkpoint_arrays(tmp_path / "resumed" / "checkpoints" / "4")
    assert saved.keys() == again.keys() and any("rngs" in name for name in saved)  # artifex's Rngs keys are saved
    for name in saved:
        np.testing.assert_array_equal(saved[name], again[name], err_msg=name)

    metrics = straight.evaluate(VAL)
    assert metrics["num_examples"] == len(VAL)  # the padded batch's padding is not counted
    assert np.isfinite(metrics["loss"]) and metrics["loss"] != before["loss"]  # training moved the model
    assert straight.evaluate(VAL)["loss"] == metrics["loss"]  # evaluation is seeded
    samples = straight.generate_samples(4, seed=1)
    assert samples.shape == (4, 8, 8, 1) and np.isfinite(samples).all()
    np.testing.assert_array_equal(samples, straight.generate_samples(4, seed=1))
    assert not np.array_equal(samples, straight.generate_samples(4, seed=2))
    if family == "ddpm":  # artifex clips to [-1, 1]; the adapter maps that back to the data's [0, 1]
        assert samples.min() >= 0.0 and samples.max() <= 1.0
