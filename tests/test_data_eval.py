"""Evaluation passes: padded, masked, every example counted exactly once on any number of hosts."""

from __future__ import annotations

import numpy as np
import pytest

from workshop_dist.data import DataConfiguration, array_eval_input, digits, make_eval_input
from workshop_dist.data.arrays import process_padded_batches


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> DataConfiguration:
    data_dir = digits.prepare_digits(tmp_path_factory.mktemp("data"))
    return DataConfiguration(data_dir=str(data_dir))


def _check_pass(batches, local_batch: int):
    for batch in batches:
        assert batch["mask"].dtype == np.float32 and batch["mask"].shape == (local_batch,)
        assert set(np.unique(batch["mask"])) <= {0.0, 1.0}
        assert np.all(batch["image"][batch["mask"] == 0] == 0)  # padding is zeros


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_pass_over_1000_examples_counts_each_once(config, process_count):
    inputs = [
        make_eval_input(
            config, global_batch_size=64, split="train", process_index=i, process_count=process_count
        )
        for i in range(process_count)
    ]
    passes = [list(evaluation) for evaluation in inputs]
    local = 64 // process_count
    assert len({len(p) for p in passes}) == 1  # every process yields the same number of batches
    assert all(evaluation.num_batches == len(passes[0]) for evaluation in inputs)
    assert sum(b["mask"].sum() for p in passes for b in p) == 1000
    for p in passes:
        _check_pass(p, local)
    # The real examples are exactly the split, in order, once: batch by batch, process by process.
    images = np.concatenate([p[i]["image"][p[i]["mask"] == 1] for i in range(len(passes[0])) for p in passes])
    expected = digits.load_digits_split("train")["image"].astype(np.float32) / 16
    np.testing.assert_array_equal(images, expected)


def test_each_iteration_is_a_fresh_full_pass(config):
    evaluation = make_eval_input(config, global_batch_size=100, process_index=0, process_count=1)
    assert evaluation.num_examples == 350 and evaluation.num_batches == 4 and len(evaluation) == 4
    first = list(evaluation)
    partial = iter(evaluation)
    next(partial)  # an abandoned pass must not affect the next one
    second = list(evaluation)
    assert len(first) == len(second) == 4
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["mask"], b["mask"])
    assert first[-1]["mask"].sum() == 50
    assert set(evaluation.element_spec) == {"image", "label", "mask"}


def test_processes_pad_the_last_global_batch_with_masked_rows(config):
    # 350 validation examples in global batches of 12: 30 batches, the last with 2 real
    # examples, both in process 0's 4 rows; processes 1 and 2 get fully masked rows.
    inputs = [
        make_eval_input(config, global_batch_size=12, process_index=i, process_count=3) for i in range(3)
    ]
    passes = [list(evaluation) for evaluation in inputs]
    assert [len(p) for p in passes] == [30, 30, 30]
    assert [p[-1]["mask"].sum() for p in passes] == [2.0, 0.0, 0.0]
    assert sum(b["mask"].sum() for p in passes for b in p) == 350
    # An extreme case: 65 examples, 2 processes of 32 -> 33 and 32 examples, 2 batches each.
    arrays = {"image": np.ones((65, 2, 2, 1), np.float32), "label": np.arange(65)}
    masks = [
        [b["mask"] for b in array_eval_input(arrays, global_batch_size=64, process_index=i, process_count=2)]
        for i in range(2)
    ]
    assert [len(m) for m in masks] == [2, 2]
    assert [m[1].sum() for m in masks] == [1.0, 0.0]  # process 1's second batch is fully masked
    assert sum(x.sum() for m in masks for x in m) == 65


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_array_eval_input_covers_every_example_once(process_count):
    arrays = {"image": np.arange(1000, dtype=np.float32)[:, None], "label": np.arange(1000)}
    global_batch = 64 if process_count != 3 else 63
    inputs = [
        array_eval_input(arrays, global_batch_size=global_batch, process_index=i, process_count=process_count)
        for i in range(process_count)
    ]
    passes = [list(evaluation) for evaluation in inputs]
    assert len({len(p) for p in passes}) == 1 and inputs[0].num_batches == len(passes[0])
    labels = np.concatenate([b["label"][b["mask"] == 1] for p in passes for b in p])
    np.testing.assert_array_equal(np.sort(labels), np.arange(1000))
    assert sum(b["mask"].sum() for p in passes for b in p) == 1000
    assert list(inputs[0]) and len(list(inputs[0])) == len(passes[0])  # re-iterable


def test_process_padded_batches_take_rows_of_global_batches():
    examples = {"x": np.arange(5)}
    parts = [
        list(process_padded_batches(examples, global_batch_size=4, process_index=i, process_count=2))
        for i in range(2)
    ]
    assert [[b["x"][b["mask"] == 1].tolist() for b in p] for p in parts] == [[[0, 1], [4]], [[2, 3], []]]
