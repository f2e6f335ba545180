"""Data sources: the built-in digits TFDS builder, tfds:NAME, array_record:GLOB (all offline)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from workshop_dist.config import ConfigError
from workshop_dist.data import (
    DataConfiguration,
    DatasetNotPreparedError,
    digits,
    make_eval_input,
    make_train_input,
    resolve_data_dir,
    write_array_record,
)
from workshop_dist.data.records import RecordFormatError, decode_example, encode_example, examples_from_arrays
from workshop_dist.data.sources import open_source

SINGLE = {"process_index": 0, "process_count": 1}


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    return digits.prepare_digits(tmp_path_factory.mktemp("data"))


def test_digits_builder_prepares_offline_with_fixed_splits(digits_dir):
    assert (digits_dir / "workshop_digits" / "1.0.0" / "dataset_info.json").is_file()
    assert sorted(
        p.name.split(".")[0] for p in (digits_dir / "workshop_digits" / "1.0.0").glob("*.array_record*")
    ) == [
        "workshop_digits-test",
        "workshop_digits-train",
        "workshop_digits-validation",
    ]
    bunch = load_digits()
    sizes = {}
    for split, part in digits.SPLITS.items():
        source = tfds.data_source("workshop_digits", split=split, data_dir=str(digits_dir), download=False)
        sizes[split] = len(source)
        images = np.stack([source[i]["image"] for i in range(len(source))])
        labels = np.array([source[i]["label"] for i in range(len(source))])
        assert images.shape == (len(source), 8, 8, 1) and images.dtype == np.uint8
        np.testing.assert_array_equal(images[..., 0], bunch.images[part].astype(np.uint8))
        np.testing.assert_array_equal(labels, bunch.target[part])
    assert sizes == {"train": 1000, "validation": 350, "test": 447}


def test_prepare_is_idempotent_and_reused(digits_dir):
    info = digits_dir / "workshop_digits" / "1.0.0" / "dataset_info.json"
    before = info.stat().st_mtime_ns
    assert digits.prepare_digits(digits_dir) == digits_dir
    assert info.stat().st_mtime_ns == before


@pytest.mark.slow
def test_concurrent_prepare_from_several_processes(tmp_path):
    """Multi-process runs start N processes at once; all must end with one valid dataset."""
    code = "import sys; from workshop_dist.data.digits import prepare_digits; prepare_digits(sys.argv[1])"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=120)[0].decode() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert digits.is_prepared(tmp_path)
    assert not [p for p in (tmp_path / "workshop_digits").iterdir() if "incomplete" in p.name]
    source = tfds.data_source("workshop_digits", split="validation", data_dir=str(tmp_path), download=False)
    assert len(source) == 350


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("WORKSHOP_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(DataConfiguration()) == tmp_path / "env"
    assert resolve_data_dir(DataConfiguration(data_dir=str(tmp_path / "cfg"))) == tmp_path / "cfg"
    monkeypatch.delenv("WORKSHOP_DATA_DIR")
    assert str(resolve_data_dir(DataConfiguration())).endswith(".cache/workshop_dist/data")


def test_digits_source_reads_the_prepared_split(monkeypatch, digits_dir):
    monkeypatch.setenv("WORKSHOP_DATA_DIR", str(digits_dir))
    source = open_source(DataConfiguration(), "test")
    assert len(source) == 447 and source.max_level == 16
    with pytest.raises(ConfigError, match="no split 'valid'"):
        open_source(DataConfiguration(), "valid")


def test_tfds_source_reads_a_prepared_dataset(digits_dir):
    config = DataConfiguration(source="tfds:workshop_digits", data_dir=str(digits_dir), max_level=16)
    evaluation = make_eval_input(config, global_batch_size=50, **SINGLE)
    images = np.concatenate([b["image"] for b in evaluation])
    assert evaluation.num_examples == 350 and images.shape == (350, 8, 8, 1)
    np.testing.assert_array_equal(images * 16, digits.load_digits_split("validation")["image"])
    # Without max_level, uint8 images are scaled by 255.
    unscaled = next(
        iter(make_eval_input(config.model_copy(update={"max_level": None}), global_batch_size=50, **SINGLE))
    )
    np.testing.assert_allclose(unscaled["image"] * 255, images[:50] * 16, atol=1e-4)
    with pytest.raises(
        ConfigError, match=r"no split 'valid'; available splits: \['train', 'validation', 'test'\]"
    ):
        make_eval_input(config, global_batch_size=50, split="valid", **SINGLE)


def test_missing_tfds_dataset_gives_a_clear_error(tmp_path):
    config = DataConfiguration(source="tfds:mnist", data_dir=str(tmp_path))
    with pytest.raises(DatasetNotPreparedError) as info:
        make_train_input(config, global_batch_size=8, seed=0, **SINGLE)
    message = str(info.value)
    assert isinstance(info.value, ConfigError)
    assert "'mnist'" in message and str(tmp_path) in message
    assert f"tfds build mnist --file_format=array_record --data_dir={tmp_path}" in message
    assert "data.download=true" in message
    assert not (tmp_path / "mnist").exists()  # nothing was downloaded or created


def test_missing_tfds_config_and_unknown_name(tmp_path):
    config = DataConfiguration(source="tfds:cifar10_corrupted:brightness_1", data_dir=str(tmp_path))
    with pytest.raises(DatasetNotPreparedError, match="tfds build cifar10_corrupted/brightness_1 "):
        make_eval_input(config, global_batch_size=8, **SINGLE)
    config = DataConfiguration(source="tfds:no_such_dataset_xyz", data_dir=str(tmp_path))
    with pytest.raises(DatasetNotPreparedError, match="not in the TFDS catalog"):
        make_eval_input(config, global_batch_size=8, **SINGLE)


def test_tfds_prepared_as_tfrecord_is_explained(tmp_path):
    version_dir = tmp_path / "mnist" / "3.0.1"
    version_dir.mkdir(parents=True)
    (version_dir / "dataset_info.json").write_text(
        json.dumps({"name": "mnist", "splits": [{"name": "train"}]})
    )
    config = DataConfiguration(source="tfds:mnist", data_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="prepared as tfrecord") as info:
        make_train_input(config, global_batch_size=8, seed=0, **SINGLE)
    assert "--file_format=array_record" in str(info.value)


def test_tfds_source_with_mock_data(tmp_path):
    config = DataConfiguration(source="tfds:mnist", data_dir=str(tmp_path))
    with tfds.testing.mock_data(num_examples=40):
        train = make_train_input(config, global_batch_size=16, seed=0, **SINGLE)
        batch = next(train)
        evaluation = make_eval_input(config, global_batch_size=16, split="test", **SINGLE)
        masks = [b["mask"] for b in evaluation]
    assert train.steps_per_epoch == 2 and train.num_examples == 40
    assert batch["image"].shape == (16, 28, 28, 1) and batch["image"].dtype == np.float32
    assert batch["image"].min() >= 0.0 and batch["image"].max() <= 1.0
    assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
    assert len(masks) == 3 and sum(m.sum() for m in masks) == 40
    # data.download=true goes through TFDS's download_and_prepare (a no-op under the mock).
    with tfds.testing.mock_data(num_examples=20):
        train = make_train_input(
            config.model_copy(update={"download": True}), global_batch_size=4, seed=0, **SINGLE
        )
        assert next(train)["image"].shape == (4, 28, 28, 1)


def _arrays(num: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (num, 5, 4, 3), dtype=np.uint8),
        "label": rng.integers(0, 10, num).astype(np.int64),
    }


def test_array_record_round_trip(tmp_path):
    train, validation = _arrays(70, 0), _arrays(23, 1)
    assert (
        write_array_record(
            tmp_path / "toy-train-00000.array_record",
            examples_from_arrays({k: v[:40] for k, v in train.items()}),
        )
        == 40
    )
    write_array_record(
        tmp_path / "toy-train-00001.array_record", examples_from_arrays({k: v[40:] for k, v in train.items()})
    )
    write_array_record(tmp_path / "toy-validation-00000.array_record", examples_from_arrays(validation))
    config = DataConfiguration(source=f"array_record:{tmp_path}/toy-{{split}}-*.array_record")

    batches = list(make_eval_input(config, global_batch_size=32, split="train", **SINGLE))
    images = np.concatenate([b["image"] for b in batches])[:70]
    labels = np.concatenate([b["label"] for b in batches])[:70]
    np.testing.assert_allclose(images, train["image"].astype(np.float32) / 255, rtol=1e-6)
    np.testing.assert_array_equal(labels, train["label"])
    assert sum(b["mask"].sum() for b in batches) == 70

    evaluation = make_eval_input(config, global_batch_size=8, **SINGLE)  # eval_split = validation
    assert evaluation.num_examples == 23 and evaluation.num_batches == 3
    training = make_train_input(config, global_batch_size=8, seed=3, **SINGLE)
    assert training.steps_per_epoch == 70 // 8
    assert next(training)["image"].shape == (8, 5, 4, 3)


def test_array_record_missing_files_error(tmp_path):
    config = DataConfiguration(source=f"array_record:{tmp_path}/none-{{split}}-*.array_record")
    with pytest.raises(ConfigError, match=f"{tmp_path}/none-train-"):
        make_train_input(config, global_batch_size=8, seed=0, **SINGLE)


def test_record_encoding_keeps_dtypes_and_shapes():
    example = {
        "image": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        "label": np.int64(7),
        "flag": np.array([True, False]),
        "big": np.array([1, 2], dtype=">i4"),
    }
    decoded = decode_example(encode_example(example))
    assert decoded.keys() == example.keys()
    for key, value in example.items():
        np.testing.assert_array_equal(decoded[key], value)
        assert decoded[key].dtype == np.asarray(value).dtype and decoded[key].shape == np.shape(value)
    with pytest.raises(RecordFormatError, match="write_array_record"):
        decode_example(b"\x0a\x0b not msgpack")
    with pytest.raises(RecordFormatError, match="dtype, shape, data"):
        decode_example(b"\x81\xa1x\x01")  # msgpack {"x": 1}: not an encoded array
