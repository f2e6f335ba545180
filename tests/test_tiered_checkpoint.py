"""Tiered checkpoints: a local tier per process beside the persistent one, restored from the newest complete."""

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tests.helpers import small_tmpfs
from tests.test_checkpoint import make_trainer
from workshop_dist import data
from workshop_dist.checkpoint import CheckpointConfiguration, LocalCheckpointConfiguration
from workshop_dist.launcher import child_env, free_port
from workshop_dist.preflight import StorageError
from workshop_dist.tiered_checkpoint import TieredCheckpointManager, layout_fingerprint

REPO = Path(__file__).resolve().parents[1]


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(jax.device_get(leaf)) for leaf in jax.tree.leaves(tree)]


def assert_identical(a, b) -> None:
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def mesh_of(data: int, fsdp: int) -> jax.sharding.Mesh:
    return jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def state_at(step: int, mesh) -> dict:
    """A training-state-like tree on ``mesh``: an fsdp-sharded matrix, a replicated vector, a step."""
    rng = np.random.default_rng(step)
    host = {"kernel": rng.standard_normal((16, 8)).astype(np.float32), "bias": rng.standard_normal(8).astype(np.float32),
            "step": np.int32(step)}  # fmt: skip
    specs = {"kernel": P(None, "fsdp"), "bias": P(), "step": P()}
    return {name: jax.device_put(value, NamedSharding(mesh, specs[name])) for name, value in host.items()}


def abstract(state: dict) -> dict:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)


def data_input():
    return data.make_train_input(data.DataConfiguration(cache=True), global_batch_size=64, seed=0)


def test_restore_takes_the_newest_tier_and_is_bit_identical(tmp_path):
    mesh, train = mesh_of(2, 4), data_input()
    config = CheckpointConfiguration(local={"directory": str(tmp_path / "local"), "every": 2, "max_to_keep": 2})
    manager = TieredCheckpointManager.from_config(tmp_path / "persistent", config)
    positions = {}
    for step in (2, 4, 6):  # persistent at 2 only, local at each
        next(train.iterator)
        assert manager.should_save_local(step) and not manager.should_save_local(step + 1)
        manager.save(step, state_at(step, mesh), metadata={"step": step}, config={"run": 1},
                     data_iterator=train.iterator, persistent=step == 2)  # fmt: skip
        positions[step] = train.iterator.get_state()
    manager.wait()
    assert manager.persistent.all_steps() == [2] and manager.local_steps() == [4, 6]  # local keeps 2
    assert manager.all_steps() == [2, 4, 6] and manager.latest_step() == 6
    assert sorted(p.name for p in (tmp_path / "local").iterdir()) == ["process_0-of-1"]
    manager.close()

    fresh = data_input()
    manager = TieredCheckpointManager.from_config(tmp_path / "persistent", config)
    state, metadata, step, data_restored = manager.restore(abstract(state_at(0, mesh)), data_iterator=fresh.iterator)
    assert (step, manager.restored_tier, data_restored, metadata) == (6, "local", True, {"step": 6})
    assert_identical(state, state_at(6, mesh))
    assert state["kernel"].sharding == NamedSharding(mesh, P(None, "fsdp"))
    assert fresh.iterator.get_state() == positions[6]
    manager.close()

    shutil.rmtree(tmp_path / "local")  # a replaced host: an empty local disk
    manager = TieredCheckpointManager.from_config(tmp_path / "persistent", config)
    state, _, step, _ = manager.restore(abstract(state_at(0, mesh)), data_iterator=fresh.iterator)
    assert (step, manager.restored_tier) == (2, "persistent")
    assert_identical(state, state_at(2, mesh))
    assert fresh.iterator.get_state() == positions[2]
    manager.close()


def test_a_newer_persistent_step_wins_and_another_layout_never_reads_local_shards(tmp_path):
    mesh = mesh_of(2, 4)
    local = LocalCheckpointConfiguration(directory=str(tmp_path / "local"), every=1)
    manager = TieredCheckpointManager(tmp_path / "persistent", local)
    manager.save(2, state_at(2, mesh), metadata={"step": 2}, persistent=False)
    manager.persistent.save(4, state_at(4, mesh), metadata={"step": 4})
    manager.wait()
    state, _, step, _ = manager.restore(abstract(state_at(0, mesh)))
    assert (step, manager.restored_tier) == (4, "persistent")
    state, _, step, _ = manager.restore(abstract(state_at(0, mesh)), step=2)  # asked for: local has it
    assert (step, manager.restored_tier) == (2, "local")
    assert_identical(state, state_at(2, mesh))
    manager.save(6, state_at(6, mesh), metadata={"step": 6}, persistent=False)
    manager.close()

    other = abstract(state_at(0, mesh_of(8, 1)))  # the same shapes, sharded another way
    assert layout_fingerprint(other) != layout_fingerprint(state_at(0, mesh))
    manager = TieredCheckpointManager(tmp_path / "persistent", local)
    assert manager.latest_step() == 6
    state, _, step, _ = manager.restore(other)  # local step 6 holds data=2 x fsdp=4 shards: not for this mesh
    assert (step, manager.restored_tier) == (4, "persistent")
    assert_identical(state, state_at(4, mesh))
    assert state["kernel"].sharding.mesh.shape == {"data": 8, "fsdp": 1}
    manager.close()


@pytest.mark.slow
def test_a_trainers_state_and_data_position_round_trip_through_the_local_tier(tmp_path):
    trainer = make_trainer(tmp_path / "work", steps_per_epoch=2, num_epochs=2)
    manager = TieredCheckpointManager(tmp_path / "persistent", LocalCheckpointConfiguration(directory=str(tmp_path / "l"), every=1))
    trainer.train_epoch()
    manager.save(trainer.step, trainer.state, metadata={"step": trainer.step}, config={"run": 1},
                 data_iterator=trainer.train_input.checkpointable_iterator, persistent=False)  # fmt: skip
    manager.wait()
    fresh = make_trainer(tmp_path / "work2", steps_per_epoch=2, num_epochs=2)
    state, _, step, data_restored = manager.restore(
        fresh.engine.state_shapes, data_iterator=fresh.train_input.checkpointable_iterator
    )
    assert (step, manager.restored_tier, data_restored) == (2, "local", True)
    assert_identical(state, trainer.state)
    manager.close()


def test_a_local_directory_that_cannot_work_is_refused_at_once(tmp_path):
    (tmp_path / "local").write_text("not a directory")
    local = LocalCheckpointConfiguration(directory=str(tmp_path / "local"), every=1)
    with pytest.raises(StorageError, match=r"^checkpoint.local.directory .*process_0-of-1 cannot be created"):
        TieredCheckpointManager(tmp_path / "persistent", local)


def test_a_failed_local_save_is_a_warning_and_the_persistent_tier_goes_on(tmp_path, caplog):
    with small_tmpfs(tmp_path / "tmpfs") as full_disk:
        failed_local_save(tmp_path, full_disk, caplog)


def failed_local_save(tmp_path, full_disk, caplog):
    state = {"w": jax.random.normal(jax.random.key(0), (1536, 1024))}  # 6 MiB: more than the local disk holds
    manager = TieredCheckpointManager(tmp_path / "persistent", LocalCheckpointConfiguration(directory=str(full_disk), every=1))
    with caplog.at_level(logging.WARNING, logger="workshop_dist"):
        manager.save(1, state, metadata={"step": 1})
        manager.wait()
    assert "Could not save the checkpoint of step 1 to " + str(full_disk) in caplog.text and "the disk is full" in caplog.text
    assert manager.local_steps() == [] and manager.persistent.all_steps() == [1]
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    restored, _, step, _ = manager.restore(abstract)
    assert (step, manager.restored_tier) == (1, "persistent")
    assert_identical(restored, state)
    manager.close()


MULTIHOST = REPO / "tests" / "multihost_tiered.py"


def run_two(tmp_path: Path, phase: str) -> list[str]:
    """Two processes x 4 CPU devices running ``multihost_tiered.py PHASE``; their outputs."""
    coordinator = f"127.0.0.1:{free_port()}"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    base["PYTHONPATH"] = str(REPO)
    procs = [
        subprocess.Popen(
            [sys.executable, str(MULTIHOST), phase, str(tmp_path)],
            env=child_env(base, coordinator=coordinator, num_processes=2, process_id=i, devices=4),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-4000:]
    return outputs


def result(output: str) -> str:
    """The RESTORED line, and any warning the process logged (a local save that failed under load)."""
    lines = output.splitlines()
    restored = next(line for line in lines if line.startswith("RESTORED"))
    warnings = [line for line in lines if "WARNING" in line or "Could not" in line]
    return " | ".join([restored, *warnings])


@pytest.mark.slow
def test_two_processes_restore_local_only_when_both_have_it(tmp_path):
    saved = run_two(tmp_path, "save")  # local at 1..4 (keeps 3, 4), persistent at 2
    assert sorted(p.name for p in (tmp_path / "local").iterdir()) == ["process_0-of-2", "process_1-of-2"]
    on_disk = {p.name: sorted(s.name for s in p.iterdir()) for p in (tmp_path / "local").iterdir()}
    outputs = run_two(tmp_path, "restore")
    assert [result(o) for o in outputs] == ["RESTORED step=4 tier=local exact=True"] * 2, (on_disk, saved)

    shutil.rmtree(tmp_path / "local" / "process_1-of-2" / "4")  # process 1 lost its newest local step
    outputs = run_two(tmp_path, "restore")
    assert [result(o) for o in outputs] == ["RESTORED step=3 tier=local exact=True"] * 2

    shutil.rmtree(tmp_path / "local" / "process_1-of-2")  # process 1 runs on a replaced host
    outputs = run_two(tmp_path, "restore")
    assert [result(o) for o in outputs] == ["RESTORED step=2 tier=persistent exact=True"] * 2
