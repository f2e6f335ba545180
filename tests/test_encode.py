"""``workshop-data encode`` and the latents it writes: the same files on 8 devices as on 1, resume by
skipping finished shards, the scale factor beside the latents and in the batches, the posterior
draws, and one message per bad input. Small random-weight autoencoders; nothing is downloaded."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.test_autoencoder import TINY, build
from workshop_dist import data
from workshop_dist.config import ConfigError
from workshop_dist.data.cli import main
from workshop_dist.data.config import DataConfiguration
from workshop_dist.data.latents import read_latents_info
from workshop_dist.data.records import decode_example
from workshop_dist.data.splits import DataSet
from workshop_dist.encode import digits_dataset, encode_dataset
from workshop_dist.models.autoencoder_weights import FORMAT
from workshop_dist.parallel import MeshConfiguration, make_mesh
from workshop_dist.training.first_stage import load_first_stage
from workshop_dist.weights import model_tensors, write_safetensors

SCALE = 0.5


def write_weights(path: Path, seed: int = 0) -> Path:
    """A tiny random autoencoder (factor 4, 4 latent channels) in convert-weights sd-vae's format."""
    model = build((16, 16, 1), seed=seed)
    parameters = {**TINY, "latent_channels": 4, "scaling_factor": SCALE}
    return write_safetensors(path, model_tensors(model), {"format": FORMAT, "parameters": json.dumps(parameters),
                                                          "channels": "1", "source": "test"})


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return write_weights(tmp_path_factory.mktemp("ae") / "ae.safetensors")


@pytest.fixture(scope="module")
def stage(weights):
    return load_first_stage(weights)


class Counted:
    """A split that records which examples were read, and can stop (KeyboardInterrupt) at one of them."""

    def __init__(self, inner, stop_at: int | None = None):
        self.inner, self.name, self.stop_at, self.read = inner, inner.name, stop_at, set()

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int):
        if index == self.stop_at:
            raise KeyboardInterrupt
        self.read.add(index)
        return self.inner[index]


def small_digits(count: int = 40, stop_at: int | None = None) -> DataSet:
    split = digits_dataset(16, ["validation"]).splits["validation"]
    split._load()
    split._arrays = {key: value[:count] for key, value in split._arrays.items()}
    return DataSet("digits", {"validation": Counted(split, stop_at)})


def files(dest: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(dest.glob("*.array_record"))}


def records(dest: Path, split: str = "validation") -> list[dict[str, np.ndarray]]:
    from array_record.python.array_record_module import ArrayRecordReader

    out = []
    for path in sorted(dest.glob(f"{split}-*.array_record")):
        reader = ArrayRecordReader(str(path))
        out += [decode_example(r) for r in reader.read_all()]
        reader.close()
    return out


@pytest.mark.parametrize("store", ["moments", "sample"])
def test_encode_on_8_devices_writes_the_same_files_as_on_1(stage, tmp_path, store):
    one, eight = make_mesh(MeshConfiguration(), jax.devices()[:1]), make_mesh(MeshConfiguration(), jax.devices())
    encode_dataset(small_digits(), tmp_path / "one", stage, shards=2, store=store, batch_size=4, mesh=one, progress=False)
    encode_dataset(small_digits(), tmp_path / "eight", stage, shards=2, store=store, batch_size=4, mesh=eight,
                   progress=False)
    assert files(tmp_path / "one") == files(tmp_path / "eight") and len(files(tmp_path / "one")) == 2
    got = records(tmp_path / "eight")
    assert len(got) == 40 and [int(r["label"]) for r in got[:3]] == [1, 4, 0]  # the validation split's first labels
    keys = {"mean", "logvar", "label"} if store == "moments" else {"latent", "label"}
    assert set(got[0]) == keys and got[0][next(iter(keys - {"label"}))].shape == (4, 4, 4)
    # the latents are the autoencoder's own encodings of the same pixels (in [0, 1]: 16 is white)
    images = np.stack([small_digits().splits["validation"][i]["image"] for i in range(3)]).astype(np.float32) / 16
    mean, logvar = jax.jit(stage.encode_fn)(stage.params, images)
    if store == "moments":
        np.testing.assert_allclose(np.stack([r["mean"] for r in got[:3]]), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.stack([r["logvar"] for r in got[:3]]), logvar, rtol=1e-5, atol=1e-6)
    else:  # one draw from the posterior: within a few standard deviations, not the mean
        z = (np.stack([r["latent"] for r in got[:3]]) - mean) / np.exp(0.5 * logvar)
        assert 0.5 < np.std(z) < 1.5 and np.abs(z).max() < 6


def test_interrupted_encode_resumes_skipping_finished_shards(stage, tmp_path):
    whole = tmp_path / "whole"
    encode_dataset(small_digits(), whole, stage, shards=3, batch_size=1, progress=False)
    dest = tmp_path / "dest"
    with pytest.raises(KeyboardInterrupt):  # in the second shard (examples 13..25)
        encode_dataset(small_digits(stop_at=20), dest, stage, shards=3, batch_size=1, progress=False)
    assert sorted(files(dest)) == ["validation-00000-of-00003.array_record"]
    again = small_digits()
    manifest = encode_dataset(again, dest, stage, shards=3, batch_size=1, progress=False)
    assert again.splits["validation"].read == {0} | set(range(13, 40))  # the first shard was not read again
    assert files(dest) == files(whole) and manifest["written"] == {"validation": 40} and manifest["complete"]
    with pytest.raises(ConfigError, match="other settings"):  # the same DEST with another store is refused
        encode_dataset(small_digits(), dest, stage, shards=3, store="sample", batch_size=1, progress=False)


def test_scale_factor_is_stored_and_batches_hold_scaled_latents(stage, tmp_path):
    dest = tmp_path / "latents"
    encode_dataset(small_digits(), dest, stage, shards=1, batch_size=2, progress=False)
    info = read_latents_info(dest)
    assert info["scale_factor"] == SCALE and info["store"] == "moments" and info["latent_shape"] == [4, 4, 4]
    assert info["image_shape"] == [16, 16, 1]
    config = DataConfiguration(source=f"array_record:{dest}/{{split}}-*.array_record", normalize="latent",
                               train_split="validation", shuffle=False)
    stored = records(dest)
    mean = np.stack([r["mean"] for r in stored]) * SCALE
    std = np.exp(0.5 * np.stack([r["logvar"] for r in stored])) * SCALE
    evaluation = next(iter(data.make_eval_input(config, global_batch_size=8)))
    np.testing.assert_array_equal(evaluation["image"], mean[:8].astype(np.float32))  # evaluation: the mean
    assert set(evaluation) == {"image", "label", "mask"}
    train = data.make_train_input(config, global_batch_size=8, seed=0)
    first, second = next(train), next(data.make_train_input(config, global_batch_size=8, seed=0))
    assert first["image"].dtype == np.float32 and set(first) == {"image", "label"}
    np.testing.assert_array_equal(first["image"], second["image"])  # reproducible draws
    eps = (first["image"] - mean[:8]) / std[:8]
    assert 0.7 < eps.std() < 1.3  # a posterior draw per example
    later = train._batches[5]  # the same examples in the next epoch (5 steps of 8): a new draw
    assert np.abs(later["image"] - first["image"]).max() > 0
    with pytest.raises(ConfigError, match=r"set data\.normalize: latent"):
        data.make_train_input(config.model_copy(update={"normalize": "unit"}), global_batch_size=8, seed=0)
    with pytest.raises(ConfigError, match="are about pixels"):
        data.make_train_input(config.model_copy(update={"max_level": 255.0}), global_batch_size=8, seed=0)
    with pytest.raises(ConfigError, match=r"has no latents\.json"):
        data.make_train_input(DataConfiguration(normalize="latent"), global_batch_size=8, seed=0)


def test_bad_inputs_get_one_message_each(weights, tmp_path, capsys):
    def error(*argv: str) -> str:
        assert main(["encode", *argv]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    dest = str(tmp_path / "out")
    assert "no autoencoder at" in error("--autoencoder", str(tmp_path / "missing"), "digits", dest)
    other = write_safetensors(tmp_path / "other.safetensors", {"w": np.zeros(2, np.float32)}, {"format": "other"})
    assert "holds no autoencoder weights" in error("--autoencoder", str(other), "digits", dest)
    (tmp_path / "empty_run").mkdir()
    assert "not an autoencoder run" in error("--autoencoder", str(tmp_path / "empty_run"), "digits", dest)
    message = error("--autoencoder", str(weights), "digits", dest, "--image-size", "18", "--splits", "validation")
    assert "divide by 4" in message and "[18, 18, 1]" in message
    assert "no split(s) ['nope']" in error("--autoencoder", str(weights), "digits", dest, "--splits", "nope")
    assert not (tmp_path / "out").exists()  # nothing written for a bad input
