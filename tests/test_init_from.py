"""``training.init_from``: params from another run's checkpoint (include, exclude, rename), shape mismatches named,
on 8 devices, from gs://, and a resumed run ignores it and stays bit-identical."""

import logging
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
from workshop_dist.training.config import InitFromConfiguration
from workshop_dist.training.init_from import rename, select, step_dir
from workshop_dist.training.preemption import EXIT_PREEMPTED

REPO = Path(__file__).resolve().parents[1]
MESH = MeshConfiguration(data=2, fsdp=4, fsdp_min_size=16)


class Source(GenerativeModel):
    """``head(tanh(encoder(x)))``: the run the others start from."""

    def __init__(self, config: ModelConfiguration, *, rngs: nnx.Rngs):
        size = int(np.prod(config.input_dim))
        self.encoder = layers.dense(size, 32, ("embed", "mlp"), rngs=rngs)
        self.head = layers.dense(32, size, ("mlp", "embed"), rngs=rngs)

    def hidden(self, x):
        return jnp.tanh(self.encoder(x))

    def example_losses(self, batch, rng, *, step=None, group=None):
        x = batch["image"].reshape(batch["image"].shape[0], -1).astype(jnp.float32)
        y = self.head(self.hidden(x))
        return {"loss": ((y - x[:, : y.shape[-1]]) ** 2).sum(-1)}

    def sample(self, rng, num_samples, *, labels=None, **options):
        return jnp.zeros((num_samples, 8, 8, 1))


class Target(Source):
    """The source's encoder under another name (``trunk``), its head, and a new ``extra`` layer."""

    def __init__(self, config: ModelConfiguration, *, rngs: nnx.Rngs):
        size, width = int(np.prod(config.input_dim)), config.parameters.get("width", 32)
        self.trunk = layers.dense(size, 32, ("embed", "mlp"), rngs=rngs)
        self.extra = layers.dense(32, 32, ("mlp", "embed"), rngs=rngs)
        self.head = layers.dense(32, width if width != 32 else size, ("mlp", "embed"), rngs=rngs)  # width 16: mismatched

    def hidden(self, x):
        return self.extra(jnp.tanh(self.trunk(x)))


def model(cls: type, **parameters) -> ModelConfiguration:
    return ModelConfiguration(model_class=f"{__name__}.{cls.__name__}", input_dim=(8, 8, 1), parameters=parameters)


def trainer(cls: type, workdir=None, *, seed: int = 0, width: int = 32, **fields) -> Trainer:
    fields = {"batch_size": 64, "steps_per_epoch": 2, "num_epochs": 1, "log_every": 1, "num_samples": 0, "seed": seed,
              "optimizer": {"optimizer_type": "adam", "learning_rate": 1e-2}, "ema": {"decay": 0.9}, **fields}
    return Trainer(model(cls, width=width), training_config(**fields), digits_images(), None, workdir, mesh_config=MESH)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A trained source run's workdir (checkpoint at step 2) and its params."""
    workdir = tmp_path_factory.mktemp("source")
    run = trainer(Source, workdir, seed=1)
    run.fit()
    params = jax.device_get(run.state.params)
    run.close()
    return workdir, params


def test_partial_init_with_include_exclude_and_rename(source, tmp_path, caplog):
    workdir, saved = source
    config = {"checkpoint": str(workdir), "rename": {"encoder": "trunk"}, "exclude": ["head/bias"]}
    with caplog.at_level(logging.INFO, logger="workshop_dist"):
        run = trainer(Target, tmp_path / "target", init_from=config)
    try:
        fresh = trainer(Target)  # the same model as initialised, for what init_from must leave alone
        ours, initial = jax.device_get((run.state.params, fresh.state.params))
        fresh.close()
        np.testing.assert_array_equal(ours["trunk"]["kernel"], saved["encoder"]["kernel"])  # renamed
        np.testing.assert_array_equal(ours["trunk"]["bias"], saved["encoder"]["bias"])
        np.testing.assert_array_equal(ours["head"]["kernel"], saved["head"]["kernel"])
        np.testing.assert_array_equal(ours["head"]["bias"], initial["head"]["bias"])  # excluded
        np.testing.assert_array_equal(ours["extra"]["kernel"], initial["extra"]["kernel"])  # missing from the source
        np.testing.assert_array_equal(jax.device_get(run.state.ema_params["trunk"]["kernel"]), saved["encoder"]["kernel"])
        assert int(run.state.step) == 0
        assert all(not np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(run.state.opt_state))  # fresh moments
        kernel = run.state.params["trunk"]["kernel"]
        assert len(kernel.sharding.device_set) == 8 and kernel.sharding == run.engine.state_shardings.params["trunk"]["kernel"]
        run.train_epoch()  # and it trains from there
        assert run.step == 2
    finally:
        run.close()
    log = (tmp_path / "target" / "logs" / "train.log").read_text()
    assert "took 3 params, skipped 1 (excluded 1, not in this model 0), 2 kept as initialised" in caplog.text
    for line in ("taken    trunk/kernel <- encoder/kernel", "taken    head/kernel", "skipped  head/bias (excluded)",
                 "missing  extra/kernel (kept as initialised)"):
        assert line in log


def test_a_shape_mismatch_is_one_error_naming_the_params_unless_excluded(source):
    workdir, _ = source
    config = {"checkpoint": str(workdir / "checkpoints" / "2"), "rename": [["^encoder/", "trunk/"]]}
    with pytest.raises(ConfigError) as error:
        trainer(Target, width=16, init_from=config)
    message = str(error.value)
    assert "2 params of" in message and "exclude them" in message
    assert "head/kernel: checkpoint (32, 64) (head/kernel), this model (32, 16)" in message
    assert "head/bias: checkpoint (64,) (head/bias), this model (16,)" in message
    run = trainer(Target, width=16, init_from={**config, "exclude": ["head"]})  # excluded: no error
    run.close()


def test_not_matched_names_and_regex_rename():
    config = InitFromConfiguration(checkpoint="x", rename=[["^encoder/(.*)$", r"trunk/\1"]], include=["trunk", "head"])
    assert rename("encoder/kernel", config.rename) == "trunk/kernel"
    assert rename("encoder/kernel", {"encoder": "a/b"}) == "a/b/kernel" and rename("encoders/k", {"encoder": "a"}) == "encoders/k"
    chosen = select({"encoder/kernel": (2, 3), "other/kernel": (1,), "head/kernel": (3, 2)},
                    {"trunk/kernel": (2, 3), "head/kernel": (3, 2), "extra/kernel": (4,)}, config)
    assert chosen.taken == {"trunk/kernel": "encoder/kernel", "head/kernel": "head/kernel"}
    assert chosen.unmatched == ["other/kernel"] and chosen.missing == ["extra/kernel"] and not chosen.mismatched
    with pytest.raises(ConfigError, match="no checkpoint at /nonexistent/run"):
        step_dir("/nonexistent/run")


# --- gs:// and a SIGTERM resume (processes) -----------------------------------------------------


@pytest.mark.slow
def test_init_from_a_gs_run_on_the_emulator(tmp_path):
    from tests.gcs_emulator import BUCKET, Emulator, EmulatorUnavailable

    try:
        emulator = Emulator(tmp_path / "fake-gcs-server.log")
    except EmulatorUnavailable as err:
        pytest.skip(str(err))
    saved_env = {key: os.environ.get(key) for key in emulator.env}
    os.environ.update(emulator.env)
    try:
        remote = f"gs://{BUCKET}/source"
        run = trainer(Source, remote, seed=1)
        run.fit()
        saved = jax.device_get(run.state.params)
        run.close()
        target = trainer(Target, init_from={"checkpoint": remote, "rename": {"encoder": "trunk"}})
        ours = jax.device_get(target.state.params)
        target.close()
        np.testing.assert_array_equal(ours["trunk"]["kernel"], saved["encoder"]["kernel"])
        np.testing.assert_array_equal(ours["head"]["bias"], saved["head"]["bias"])
    finally:
        emulator.stop()
        for key, value in saved_env.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def cli(workdir: Path, *extra: str) -> StreamedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    command = [sys.executable, "-m", "workshop_dist.cli", "--workdir", str(workdir), *resume_run_settings(3),
               "eval.fid_every=null", "training.ema.decay=0.9", *extra]
    return StreamedProcess(command, env=env, cwd=REPO)


@pytest.mark.slow
def test_a_resumed_run_ignores_init_from_and_is_bit_identical(tmp_path):
    source = cli(tmp_path / "source", "model.model_class=tests.test_init_from.Source", "training.length.max_steps=7")
    assert source.finish() == 0, source.output[-3000:]
    extra = ("model.model_class=tests.test_init_from.Target",
             f"training.init_from={{checkpoint: {tmp_path / 'source'}, rename: {{encoder: trunk}}}}")
    full = cli(tmp_path / "full", *extra)
    assert full.finish() == 0, full.output[-3000:]
    assert "init_from" in full.output and "took 4 params" in full.output
    run = cli(tmp_path / "run", *extra)
    run.wait_for("train step 9:")
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == EXIT_PREEMPTED, run.output[-3000:]
    run = cli(tmp_path / "run", *extra)
    assert run.finish() == 0, run.output[-3000:]
    assert "training.init_from ignored" in run.output and "Resumed from" in run.output and "took 4" not in run.output
    final = max(int(p.name) for p in (tmp_path / "full" / "checkpoints").iterdir() if p.name.isdigit())
    resumed = checkpoint_arrays(tmp_path / "run" / "checkpoints" / str(final))
    reference = checkpoint_arrays(tmp_path / "full" / "checkpoints" / str(final))
    assert resumed.keys() == reference.keys()
    for name in resumed:
        np.testing.assert_array_equal(resumed[name], reference[name], err_msg=name)
