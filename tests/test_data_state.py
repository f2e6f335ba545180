"""Iterator state: resuming mid-epoch gives exactly the batches of an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import grain
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from workshop_dist.config import ConfigError
from workshop_dist.data import DataConfiguration, array_train_input, digits, make_train_input

SINGLE = {"process_index": 0, "process_count": 1}
BATCH = 64  # 15 steps per epoch of the 1000 digits: resuming at 12 crosses an epoch boundary


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> DataConfiguration:
    data_dir = digits.prepare_digits(tmp_path_factory.mktemp("data"))
    return DataConfiguration(data_dir=str(data_dir), random_flip=True)


@pytest.fixture(scope="module")
def reference(config) -> list[dict[str, np.ndarray]]:
    """20 batches of an uninterrupted run without workers."""
    train = make_train_input(config, global_batch_size=BATCH, seed=11, **SINGLE)
    return [next(train) for _ in range(20)]


def assert_same_batches(actual, expected):
    assert len(actual) == len(expected)
    for a, b in zip(actual, expected, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("worker_count", [0, pytest.param(2, marks=pytest.mark.slow)])  # 2: worker processes
def test_restore_mid_epoch_gives_the_uninterrupted_batches(config, reference, worker_count):
    config = config.model_copy(update={"worker_count": worker_count})
    train = make_train_input(config, global_batch_size=BATCH, seed=11, **SINGLE)
    assert train.steps_per_epoch == 15
    first = [next(train) for _ in range(12)]
    state = json.loads(json.dumps(train.get_state()))  # JSON-able
    train.close()
    assert_same_batches(first, reference[:12])  # worker count does not change the batches

    resumed = make_train_input(config, global_batch_size=BATCH, seed=11, **SINGLE)
    resumed.set_state(state)
    rest = [next(resumed) for _ in range(8)]
    resumed.close()
    assert_same_batches(rest, reference[12:])


def test_orbax_checkpoint_manager_saves_the_iterator_with_the_model(tmp_path, reference, config):
    train = make_train_input(config, global_batch_size=BATCH, seed=11, **SINGLE)
    for _ in range(12):
        next(train)
    params = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.asarray(12)}
    manager = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("state", "data"))
    manager.save(
        12,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(params), data=grain.checkpoint.CheckpointSave(train.iterator)
        ),
    )
    manager.wait_until_finished()
    manager.close()
    assert (tmp_path / "ckpt" / "12" / "data" / "process_0-of-1.json").is_file()

    resumed = make_train_input(config, global_batch_size=BATCH, seed=11, **SINGLE)
    manager = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("state", "data"))
    restored = manager.restore(
        manager.latest_step(),
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(jax_abstract(params)),
            data=grain.checkpoint.CheckpointRestore(resumed.iterator),
        ),
    )
    manager.close()
    np.testing.assert_array_equal(restored["state"]["w"], params["w"])
    assert int(restored["state"]["step"]) == 12
    assert_same_batches([next(resumed) for _ in range(8)], reference[12:])


def jax_abstract(tree):
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def test_array_input_state_round_trip():
    examples = {"image": np.zeros((100, 1), np.float32), "id": np.arange(100)}
    train = array_train_input(examples, global_batch_size=16, seed=2, **SINGLE)
    for _ in range(9):
        next(train)
    state = train.get_state()
    expected = [next(train)["id"] for _ in range(3)]
    train.close()  # closing keeps the position
    expected += [next(train)["id"] for _ in range(2)]
    resumed = array_train_input(examples, global_batch_size=16, seed=2, **SINGLE)
    resumed.set_state(state)
    np.testing.assert_array_equal(np.stack([next(resumed)["id"] for _ in range(5)]), np.stack(expected))


def test_restoring_with_another_worker_count_is_a_clear_error():
    examples = {"id": np.arange(100)}
    train = array_train_input(examples, global_batch_size=10, seed=0, **SINGLE)
    next(train)
    with_workers = array_train_input(examples, global_batch_size=10, seed=0, worker_count=2, **SINGLE)
    with pytest.raises(ConfigError, match=r"saved with data\.worker_count=0"):
        with_workers.set_state(train.get_state())


@pytest.mark.slow
def test_import_starts_nothing_and_writes_nothing(tmp_path):
    """Grain's spawned workers re-import the package: importing must have no side effects."""
    code = (
        "import sys, workshop_dist.data, jax._src.distributed as d; "
        "assert d.global_state.client is None; "
        "assert 'tensorflow' not in sys.modules, 'TensorFlow imported'"
    )
    env = {**os.environ, "HOME": str(tmp_path), "WORKSHOP_DATA_DIR": str(tmp_path / "data")}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_seek_positions_the_stream_like_consumed_batches(workers):
    examples = {"image": np.zeros((200, 1), np.float32), "id": np.arange(200)}
    reference = array_train_input(examples, global_batch_size=20, seed=1, **SINGLE)
    expected = [next(reference)["id"] for _ in range(27)][23:]
    sought = array_train_input(examples, global_batch_size=20, seed=1, worker_count=workers, **SINGLE)
    sought.seek(23)
    try:
        for batch_ids in expected:
            np.testing.assert_array_equal(next(sought)["id"], batch_ids)
    finally:
        sought.close()
