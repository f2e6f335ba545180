"""Checkpoint manager behaviour: damage, fallback, best-keeping, restore onto other meshes."""

import logging
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from tests.helpers import digits_images, tiny_model_config, training_config
from workshop_dist import Trainer, create_model, parallel
from workshop_dist.checkpoint import CheckpointError, CheckpointManager, CheckpointMismatchError
from workshop_dist.cli import main
from workshop_dist.parallel import MeshConfiguration

TRAIN = digits_images("train")
VAL = digits_images("validation")


def make_trainer(workdir, mesh=None, devices=None, **training):
    settings = {"batch_size": 64, "num_epochs": 1, "log_every": 2, "save_every": 2, "num_samples": 0, **training}
    model = create_model(tiny_model_config(hidden_dims=[256, 128]), rngs=nnx.Rngs(0))
    mesh_config = mesh or MeshConfiguration()
    device_mesh = parallel.make_mesh(mesh_config, devices=devices)
    return Trainer(model, training_config(**settings), TRAIN, VAL, workdir, mesh=device_mesh, mesh_config=mesh_config)


def host_params(trainer):
    return jax.device_get(trainer.state.params)


def assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture
def workshop_log(caplog):
    """caplog for the "workshop_dist" logger, which does not propagate to the root once a Logger exists."""
    logger = logging.getLogger("workshop_dist")
    logger.addHandler(caplog.handler)
    with caplog.at_level(logging.WARNING, logger="workshop_dist"):
        yield caplog
    logger.removeHandler(caplog.handler)


def test_periodic_checkpoints_keep_the_latest_n(tmp_path):
    trainer = make_trainer(tmp_path, steps_per_epoch=10, checkpoint={"max_to_keep": 3})
    trainer.train_epoch()
    trainer.checkpoints.wait()
    assert trainer.checkpoints.all_steps() == [6, 8, 10]
    step_dir = tmp_path / "checkpoints" / "10"
    assert {p.name for p in step_dir.iterdir()} >= {"state", "data", "metadata"}


def test_unreadable_latest_checkpoint_falls_back_with_a_warning(tmp_path, workshop_log):
    trainer = make_trainer(tmp_path, steps_per_epoch=4)
    trainer.train_epoch()  # saves steps 2 and 4
    trainer.checkpoints.wait()
    fresh = make_trainer(tmp_path, steps_per_epoch=4)
    fresh.restore(step=2)
    at_two = host_params(fresh)
    for path in (tmp_path / "checkpoints" / "4" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    fresh = make_trainer(tmp_path, steps_per_epoch=4)
    assert fresh.restore() == 2
    assert "checkpoints/4 is unreadable" in workshop_log.text
    assert fresh.step == 2
    assert_same(host_params(fresh), at_two)


def test_no_readable_checkpoint_is_a_clear_error(tmp_path):
    trainer = make_trainer(tmp_path, steps_per_epoch=2)
    trainer.train_epoch()
    trainer.checkpoints.wait()
    shutil.rmtree(tmp_path / "checkpoints" / "2" / "state")
    with pytest.raises(CheckpointError, match="No readable checkpoint"):
        make_trainer(tmp_path, steps_per_epoch=2).restore()


def test_best_checkpoint_survives_pruning_of_the_latest(tmp_path):
    manager = CheckpointManager(tmp_path, max_to_keep=2)
    state = {"w": np.arange(4.0)}
    losses = {3: 0.5, 6: 0.9, 9: 0.7}  # evaluations at steps 3, 6, 9; step 3 is the best
    for step in range(1, 11):
        manager.save(step, state, metadata={"step": step}, metrics={"val_loss": losses[step]} if step in losses else None)
    manager.wait()
    assert manager.all_steps() == [3, 9, 10]
    assert manager.best_step() == 3
    manager.close()
    reopened = CheckpointManager(tmp_path, max_to_keep=2)  # a restarted run reads the metrics back
    assert reopened.best_step() == 3
    reopened.close()


def test_no_validation_loss_means_no_best_step(tmp_path):
    manager = CheckpointManager(tmp_path, async_save=False)
    manager.save(1, {"w": np.zeros(2)}, metadata={"step": 1})
    assert manager.all_steps() == [1]
    assert manager.best_step() is None
    manager.close()


def test_a_shape_mismatch_is_an_error_not_a_fallback(tmp_path, workshop_log):
    manager = CheckpointManager(tmp_path, async_save=False)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    for step in (1, 2):
        manager.save(step, {"w": jax.device_put(np.arange(4.0, dtype=np.float32), sharding)}, metadata={"step": step})
    wider = {"w": jax.ShapeDtypeStruct((5,), np.float32, sharding=sharding)}
    with pytest.raises(CheckpointMismatchError) as err:
        manager.restore(wider)
    assert "w: checkpoint has shape (4,), the model expects (5,)" in str(err.value)
    assert "/2 does not match" in str(err.value)  # the latest, with no fall back to step 1
    assert "unreadable" not in workshop_log.text
    manager.close()


def test_fit_keeps_the_best_validation_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, num_epochs=4, steps_per_epoch=3, save_every=1, checkpoint={"max_to_keep": 1})
    trainer.fit()
    losses = {row["step"]: row["loss"] for row in trainer.val_metrics}
    best = min(losses, key=losses.get)
    assert trainer.checkpoints.best_step() == best
    assert set(trainer.checkpoints.all_steps()) == {best, 12}
    assert float(trainer.state["best_loss"]) == pytest.approx(losses[best])


@pytest.mark.parametrize(
    ("mesh", "devices"),
    [(MeshConfiguration(data=8), None), (MeshConfiguration(data=4, fsdp=2), None), (MeshConfiguration(data=1), 1)],
    ids=["data=8", "data=4,fsdp=2", "one-device"],
)
def test_restore_onto_another_mesh(tmp_path, mesh, devices):
    source = make_trainer(tmp_path, mesh=MeshConfiguration(data=2, fsdp=4), steps_per_epoch=2, num_epochs=2)
    source.train_epoch()
    source.checkpoints.wait()
    assert source.state.params["encoder"][0]["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    target = make_trainer(
        tmp_path, mesh=mesh, devices=jax.devices()[:devices] if devices else None, steps_per_epoch=2, num_epochs=2
    )
    assert target.restore() == 2
    assert_same(host_params(target), host_params(source))
    kernel = target.state.params["encoder"][0]["kernel"]
    assert kernel.sharding.mesh.shape == target.mesh.shape
    assert len(kernel.sharding.device_set) == (devices or 8)
    target.train_epoch()  # and it keeps training on the new mesh
    assert target.step == 4


def test_restore_flag_starts_a_new_workdir_from_a_checkpoint(tmp_path, capsys):
    quick = ["training.scheduler=null", "training.cadence.num_samples=0", "training.cadence.save_every=2"]
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["--workdir", str(first), "training.length.max_steps=4", *quick]) == 0
    capsys.readouterr()
    assert main(["--workdir", str(second), "--restore", str(first / "checkpoints" / "2"), "training.length.max_steps=6", *quick]) == 0
    assert "Started from checkpoint" in capsys.readouterr().err
    assert sorted(int(p.name) for p in (second / "checkpoints").iterdir() if p.name.isdigit()) == [4, 6]
