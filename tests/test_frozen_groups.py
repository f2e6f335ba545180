"""Frozen params (``training.frozen``, a model's ``frozen_params``, ``optimizers.<group>: frozen``): no gradients,
no optimizer state, not in the EMA, still sharded and checkpointed, and a SIGTERM resume stays bit-identical."""

import os
import signal
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
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
from workshop_dist.models import GenerativeModel, ModelConfiguration, layers
from workshop_dist.parallel import MeshConfiguration
from workshop_dist.training import Trainer
from workshop_dist.training.frozen import Frozen, parameter_table
from workshop_dist.training.preemption import EXIT_PREEMPTED

REPO = Path(__file__).resolve().parents[1]
STEPS = 3


class Constant(nnx.Variable):
    """Not a param: the engine keeps it in the model state and never differentiates it."""


class EncoderHead(GenerativeModel):
    """``head(tanh(encoder(x)))`` reconstructs ``x``; ``parameters.constant_encoder`` stores the encoder as constants."""

    def __init__(self, config: ModelConfiguration, *, rngs: nnx.Rngs):
        size = int(np.prod(config.input_dim))
        self.encoder = layers.dense(size, 32, ("embed", "mlp"), rngs=rngs)
        self.head = layers.dense(32, size, ("mlp", "embed"), rngs=rngs)
        if config.parameters.get("constant_encoder"):
            self.encoder.kernel = Constant(self.encoder.kernel[...])
            self.encoder.bias = Constant(self.encoder.bias[...])

    def example_losses(self, batch, rng, *, step=None, group=None):
        x = batch["image"].reshape(batch["image"].shape[0], -1).astype(jnp.float32)
        return {"loss": ((self.head(jnp.tanh(self.encoder(x))) - x) ** 2).sum(-1)}

    def sample(self, rng, num_samples, *, labels=None, **options):
        return jnp.zeros((num_samples, 8, 8, 1))


class GroupedEncoderHead(EncoderHead):
    """The same model with a parameter group per half."""

    param_groups = {"encoder": "encoder", "head": "head"}  # noqa: RUF012


def model(cls: type = EncoderHead, **parameters) -> ModelConfiguration:
    return ModelConfiguration(model_class=f"{__name__}.{cls.__name__}", input_dim=(8, 8, 1), parameters=parameters)


def train(config: ModelConfiguration, workdir=None, **fields) -> Trainer:
    fields = {"batch_size": 64, "steps_per_epoch": STEPS, "num_epochs": 1, "log_every": 1, "num_samples": 0, **fields}
    trainer = Trainer(config, training_config(**fields), digits_images(), None, workdir,
                      mesh_config=MeshConfiguration(data=2, fsdp=4, fsdp_min_size=16))
    trainer.initial = jax.device_get(trainer.state.params)
    trainer.train_epoch()
    return trainer


def names(tree) -> list[str]:
    return ["/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("frozen")
    trainer = train(model(), workdir, frozen=["encoder"], optimizer={"optimizer_type": "adam", "learning_rate": 1e-2},
                    ema={"decay": 0.9})
    yield workdir, trainer
    trainer.close()


def test_frozen_params_are_unchanged_sharded_and_the_rest_trains(frozen_run):
    _, trainer = frozen_run
    assert trainer.mesh.devices.size == 8 and trainer.step == STEPS
    params = jax.device_get(trainer.state.params)
    np.testing.assert_array_equal(params["encoder"]["kernel"], trainer.initial["encoder"]["kernel"])
    np.testing.assert_array_equal(params["encoder"]["bias"], trainer.initial["encoder"]["bias"])
    assert not np.allclose(params["head"]["kernel"], trainer.initial["head"]["kernel"])
    kernel = trainer.state.params["encoder"]["kernel"]
    assert kernel.sharding.spec != jax.sharding.PartitionSpec() and len(kernel.sharding.device_set) == 8  # still sharded


def test_optimizer_state_and_ema_hold_only_the_trainable_params(frozen_run):
    _, trainer = frozen_run
    state = trainer.state
    moments = [name for name in names(state.opt_state) if "kernel" in name or "bias" in name]
    assert moments and not [name for name in moments if "encoder" in name]
    assert {name.split("/")[-2] for name in moments} == {"head"}
    assert set(state.ema_params) == {"head"}
    params = trainer.engine.eval_params(state)  # evaluation uses the EMA beside the frozen params
    assert set(params) == {"encoder", "head"} and params["encoder"]["kernel"] is state.params["encoder"]["kernel"]
    assert params["head"]["kernel"] is state.ema_params["head"]["kernel"]
    assert np.isfinite(trainer.evaluate(digits_images("validation")[:64])["loss"])


def test_run_log_marks_frozen_params(frozen_run):
    workdir, _ = frozen_run
    table = (workdir / "logs" / "train.log").read_text().split("Model parameters:", 1)[1]
    assert "encoder/kernel (frozen)" in table and "head/kernel (frozen)" not in table
    assert "frozen: 2,080 (encoder)" in table  # 64 x 32 + 32


def test_equals_training_with_the_encoder_held_as_a_constant(frozen_run):
    _, frozen = frozen_run
    reference = train(model(constant_encoder=True), optimizer={"optimizer_type": "adam", "learning_rate": 1e-2},
                      ema={"decay": 0.9})
    try:
        ours, theirs = jax.device_get((frozen.state.params, reference.state.params))
        assert set(theirs) == {"head"}  # the constant encoder lives in the model state
        for name in ("kernel", "bias"):
            np.testing.assert_allclose(ours["head"][name], theirs["head"][name], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(frozen.state.ema_params["head"]["kernel"], reference.state.ema_params["head"]["kernel"],
                                   rtol=1e-6, atol=1e-7)
    finally:
        reference.close()


def test_a_frozen_parameter_group_has_no_optimizer_and_trains_like_training_frozen(frozen_run):
    _, single = frozen_run
    grouped = train(model(GroupedEncoderHead), ema={"decay": 0.9},
                    optimizers={"head": {"optimizer_type": "adam", "learning_rate": 1e-2}, "encoder": "frozen"})
    try:
        assert set(grouped.state.opt_state) == {"head"}
        assert set(grouped.state.ema_params) == {"head"}
        ours, theirs = jax.device_get((grouped.state.params, single.state.params))
        np.testing.assert_array_equal(ours["encoder"]["kernel"], grouped.initial["encoder"]["kernel"])
        np.testing.assert_allclose(ours["head"]["kernel"], theirs["head"]["kernel"], rtol=1e-6, atol=1e-7)
    finally:
        grouped.close()


def test_a_pattern_inside_a_trained_group_freezes_only_those_params():
    grouped = train(model(GroupedEncoderHead), frozen=["head/bias"],
                    optimizers={"head": {"learning_rate": 1e-2}, "encoder": {"optimizer_type": "sgd", "learning_rate": 1e-2}})
    try:
        params = jax.device_get(grouped.state.params)
        np.testing.assert_array_equal(params["head"]["bias"], grouped.initial["head"]["bias"])
        assert not np.allclose(params["head"]["kernel"], grouped.initial["head"]["kernel"])
        assert not np.allclose(params["encoder"]["kernel"], grouped.initial["encoder"]["kernel"])
        head = names(grouped.state.opt_state["head"])
        assert any(name.endswith("kernel") for name in head) and not any(name.endswith("bias") for name in head)
    finally:
        grouped.close()


def test_frozen_configuration_errors():
    with pytest.raises(ConfigError, match=r"\['decoder'\] match no parameter of EncoderHead .*\['encoder', 'head'\]"):
        Trainer(model(), training_config(frozen=["decoder"]), digits_images(), None, None)
    with pytest.raises(ConfigError, match="freeze every parameter"):
        Trainer(model(), training_config(frozen=["encoder", "head/*"]), digits_images(), None, None)
    with pytest.raises(ValueError, match=r"a frozen group has no optimizer: remove \['learning_rate'\]"):
        training_config(optimizers={"head": {}, "encoder": {"frozen": True, "learning_rate": 0.1}})
    resolved = training_config(optimizers={"head": {}, "encoder": "frozen"}).model_dump()  # spelled out in full
    assert training_config(**resolved).optimizers["encoder"].frozen


def test_split_and_merge_are_inverse():
    frozen = Frozen(("a/b", "*/bias"))
    tree = {"a": {"b": {"kernel": 1, "bias": 2}, "c": {"kernel": 3, "bias": 4}}, "d": 5}
    trainable = frozen.trainable(tree)
    assert trainable == {"a": {"c": {"kernel": 3}}, "d": 5}
    assert frozen.frozen(tree) == {"a": {"b": {"kernel": 1, "bias": 2}, "c": {"bias": 4}}}
    assert frozen.merge({"a": {"c": {"kernel": 30}}, "d": 50}, tree) == {
        "a": {"b": {"kernel": 1, "bias": 2}, "c": {"kernel": 30, "bias": 4}}, "d": 50}
    assert frozen.trainable(tree["a"], ("a",)) == {"c": {"kernel": 3}}
    assert Frozen().trainable(tree) is tree and "(frozen)" not in parameter_table({"x": np.zeros(3)}, Frozen())


# --- a SIGTERM resume through the CLI (subprocesses) -------------------------------------------------

RUN = [*resume_run_settings(3), "model.model_class=tests.test_frozen_groups.EncoderHead", "training.frozen=[encoder]",
       "training.ema.decay=0.9", "eval.fid_every=null"]


def cli(workdir: Path) -> StreamedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    return StreamedProcess([sys.executable, "-m", "workshop_dist.cli", "--workdir", str(workdir), *RUN], env=env, cwd=REPO)


@pytest.mark.slow
def test_sigterm_resume_with_frozen_params_is_bit_identical(tmp_path):
    full = cli(tmp_path / "full")
    assert full.finish() == 0, full.output[-3000:]
    run = cli(tmp_path / "run")
    run.wait_for("train step 9:")
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == EXIT_PREEMPTED, run.output[-3000:]
    run = cli(tmp_path / "run")
    assert run.finish() == 0, run.output[-3000:]
    assert "Resumed from" in run.output and "8 global" in run.output
    final = max(int(p.name) for p in (tmp_path / "full" / "checkpoints").iterdir() if p.name.isdigit())
    resumed = checkpoint_arrays(tmp_path / "run" / "checkpoints" / str(final))
    reference = checkpoint_arrays(tmp_path / "full" / "checkpoints" / str(final))
    assert resumed.keys() == reference.keys()
    for name in resumed:
        np.testing.assert_array_equal(resumed[name], reference[name], err_msg=name)
    assert any(name.startswith("params/encoder") for name in resumed)  # checkpointed with the run
    assert not [n for n in resumed if "encoder" in n and not n.startswith("params/")]  # no moments, no EMA
    oldest = min(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert oldest < final
    first = checkpoint_arrays(tmp_path / "run" / "checkpoints" / str(oldest))
    np.testing.assert_array_equal(first["params/encoder/kernel"], resumed["params/encoder/kernel"])


def test_changing_what_is_frozen_at_a_resume_is_a_shape_change():
    from workshop_dist.resume_config import ConfigChange, classify

    assert classify(ConfigChange("training.frozen", [], ["encoder"])) == "shape"  # optimizer state and EMA change
    assert classify(ConfigChange("training.optimizers.encoder.frozen", False, True)) == "shape"
    assert classify(ConfigChange("training.init_from.checkpoint", "a", "b")) == "harmless"  # read at the first start only
