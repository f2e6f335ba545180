"""The Grain training pipeline: determinism, epochs, per-process shards, transforms, sharding."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from workshop_dist.config import ConfigError
from workshop_dist.data import DataConfiguration, array_train_input, digits, make_eval_input, make_train_input
from workshop_dist.parallel import MeshConfiguration, batch_sharding, host_batch_to_global, make_mesh

SINGLE = {"process_index": 0, "process_count": 1}


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> DataConfiguration:
    data_dir = digits.prepare_digits(tmp_path_factory.mktemp("data"))
    return DataConfiguration(data_dir=str(data_dir))


def ids_input(num: int = 1000, **kwargs):
    """In-memory examples whose ``id`` tells which example landed where."""
    examples = {"image": np.zeros((num, 2, 2, 1), np.float32), "id": np.arange(num)}
    kwargs = {**SINGLE, **kwargs}
    return array_train_input(examples, **kwargs)


def take(train_input, count: int) -> list[dict[str, np.ndarray]]:
    return [next(train_input) for _ in range(count)]


def test_same_seed_same_batches_different_seed_different_order(config):
    first = take(make_train_input(config, global_batch_size=64, seed=7, **SINGLE), 20)
    again = take(make_train_input(config, global_batch_size=64, seed=7, **SINGLE), 20)
    other = take(make_train_input(config, global_batch_size=64, seed=8, **SINGLE), 20)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(first[0]["image"], other[0]["image"])
    assert not np.array_equal(
        np.concatenate([b["label"] for b in first]), np.concatenate([b["label"] for b in other])
    )


def test_batches_and_element_spec(config):
    train = make_train_input(config, global_batch_size=64, seed=0, **SINGLE)
    assert train.num_examples == 1000 and train.steps_per_epoch == 1000 // 64
    batch = next(train)
    assert set(batch) == {"image", "label"}
    assert {k: (v.shape, v.dtype) for k, v in train.element_spec.items()} == {
        k: (v.shape, v.dtype) for k, v in batch.items()
    }
    assert batch["image"].shape == (64, 8, 8, 1) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32
    assert batch["image"].min() == 0.0 and batch["image"].max() == 1.0
    np.testing.assert_array_equal(batch["image"] * 16, np.round(batch["image"] * 16))  # levels / 16


def test_levels_and_binarize(config):
    levels = next(
        make_train_input(
            config.model_copy(update={"normalize": "levels"}), global_batch_size=32, seed=0, **SINGLE
        )
    )
    assert levels["image"].dtype == np.int32 and levels["image"].max() == 16
    unit = next(make_train_input(config, global_batch_size=32, seed=0, **SINGLE))
    np.testing.assert_allclose(unit["image"], levels["image"] / 16)
    binary = next(
        make_train_input(config.model_copy(update={"binarize": True}), global_batch_size=32, seed=0, **SINGLE)
    )
    assert set(np.unique(binary["image"])) == {0.0, 1.0}
    np.testing.assert_array_equal(binary["image"], (unit["image"] >= 0.5).astype(np.float32))


def test_random_flip_is_seeded_and_per_example(config):
    flip_config = config.model_copy(update={"random_flip": True})
    plain = take(make_train_input(config, global_batch_size=64, seed=3, **SINGLE), 3)
    flipped = take(make_train_input(flip_config, global_batch_size=64, seed=3, **SINGLE), 3)
    again = take(make_train_input(flip_config, global_batch_size=64, seed=3, **SINGLE), 3)
    images = np.concatenate([b["image"] for b in plain])
    flipped_images = np.concatenate([b["image"] for b in flipped])
    np.testing.assert_array_equal(flipped_images, np.concatenate([b["image"] for b in again]))
    same = np.all(flipped_images == images, axis=(1, 2, 3))
    mirrored = np.all(flipped_images == images[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(same | mirrored)
    assert 0.3 < np.mean(mirrored & ~same) < 0.7


def test_epochs_are_clean_permutations_with_a_new_order_each():
    train = ids_input(1000, global_batch_size=64, seed=0)
    steps = train.steps_per_epoch
    assert steps == 15
    epochs = [np.concatenate([b["id"] for b in take(train, steps)]) for _ in range(3)]
    for ids in epochs:
        assert len(ids) == steps * 64 and len(np.unique(ids)) == len(ids)  # no repeats inside an epoch
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    # The ~40 examples left over differ per epoch, so all examples are seen over time.
    assert set(epochs[0]) != set(epochs[1])
    assert len(set(np.concatenate(epochs))) > 1000 - 20


def test_no_shuffle_keeps_order():
    train = ids_input(100, global_batch_size=10, seed=0, shuffle=False)
    ids = np.concatenate([b["id"] for b in take(train, 20)])
    np.testing.assert_array_equal(ids, np.tile(np.arange(100), 2))


@pytest.mark.parametrize("num", [1000, 1001, 1037])
@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_read_disjoint_rows_of_the_same_global_batches(num, process_count):
    single = ids_input(num, global_batch_size=100, seed=5)
    parts = [
        ids_input(num, global_batch_size=100, seed=5, process_index=i, process_count=process_count)
        for i in range(process_count)
    ]
    assert {p.steps_per_epoch for p in parts} == {single.steps_per_epoch} == {num // 100}
    assert parts[0].local_batch_size == 100 // process_count
    steps = 3 * single.steps_per_epoch
    local = [np.stack([b["id"] for b in take(p, steps)]) for p in parts]  # [process][step, row]
    for step, batch in enumerate(take(single, steps)):
        # The processes' rows, in process order, are exactly the one-process global batch.
        np.testing.assert_array_equal(np.concatenate([ids[step] for ids in local]), batch["id"])
    for epoch in range(3):
        rows = slice(epoch * single.steps_per_epoch, (epoch + 1) * single.steps_per_epoch)
        seen = [set(ids[rows].ravel()) for ids in local]
        assert sum(map(len, seen)) == len(set().union(*seen)) == single.steps_per_epoch * 100  # disjoint
        if num == 1000:
            assert set().union(*seen) == set(range(num))  # together they cover the split


def test_bad_batch_sizes_are_config_errors():
    with pytest.raises(ConfigError, match="not divisible by the 2 processes"):
        ids_input(100, global_batch_size=15, seed=0, process_index=0, process_count=2)
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        ids_input(10, global_batch_size=16, seed=0)


def test_array_input_accepts_a_bare_array_and_casts_float64():
    data = np.random.default_rng(0).random((50, 3, 3, 1))
    train = array_train_input(data, global_batch_size=10, seed=0, **SINGLE)
    batch = next(train)
    assert set(batch) == {"image"} and batch["image"].dtype == np.float32
    assert any(np.allclose(batch["image"][0], row) for row in data)


def test_global_batch_sharding_on_8_devices(config):
    assert jax.device_count() == 8
    mesh = make_mesh(MeshConfiguration(data=2, fsdp=4))
    train = make_train_input(config, global_batch_size=64, seed=0)  # JAX's process index/count
    host_batch = next(train)
    batch = host_batch_to_global(host_batch, mesh)
    assert batch["image"].shape == (64, 8, 8, 1) and batch["label"].shape == (64,)
    for value in batch.values():
        assert value.sharding == batch_sharding(mesh)
        shards = value.addressable_shards
        assert len(shards) == 8
        assert all(shard.data.shape == (8, *value.shape[1:]) for shard in shards)
    np.testing.assert_array_equal(np.asarray(batch["image"]), host_batch["image"])


def test_cache_gives_the_same_batches(config):
    cached = config.model_copy(update={"cache": True, "random_flip": True})
    plain = config.model_copy(update={"random_flip": True})
    for a, b in zip(
        take(make_train_input(plain, global_batch_size=64, seed=4, **SINGLE), 17),
        take(make_train_input(cached, global_batch_size=64, seed=4, **SINGLE), 17),
        strict=True,
    ):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    evaluation = make_eval_input(cached, global_batch_size=64, process_index=1, process_count=2)
    reference = make_eval_input(config, global_batch_size=64, process_index=1, process_count=2)
    for a, b in zip(evaluation, reference, strict=True):
        assert a.keys() == b.keys()
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["mask"], b["mask"])


def test_random_flips_do_not_depend_on_the_number_of_processes(config):
    flipping = config.model_copy(update={"random_flip": True})
    single = take(make_train_input(flipping, global_batch_size=64, seed=3, **SINGLE), 4)
    halves = [take(make_train_input(flipping, global_batch_size=64, seed=3, process_index=i, process_count=2), 4) for i in range(2)]
    for step, batch in enumerate(single):
        np.testing.assert_array_equal(np.concatenate([h[step]["image"] for h in halves]), batch["image"])
