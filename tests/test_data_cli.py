"""workshop-data: convert (deterministic, resumable, read back by the pipeline), inspect, the
stats/convert-weights hooks, and one clear message (exit code 2) for each bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.image_folders import CLASSES, make_image_folder, random_picture, write_image
from workshop_dist.data import DataConfiguration, digits, make_eval_input
from workshop_dist.data import convert as convert_module
from workshop_dist.data.cli import main

SINGLE = {"process_index": 0, "process_count": 1}
CONVERT = ["--image-size", "16", "--channels", "3", "--skip-bad", "--quiet"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def converted(folder, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("converted") / "out"
    assert main(["convert", str(folder.root), str(dest), "--shards", "3", *CONVERT]) == 0
    return dest


def digests(directory: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(directory.iterdir())}


def all_examples(config: DataConfiguration, split: str) -> dict[str, np.ndarray]:
    batches = list(make_eval_input(config, global_batch_size=50, split=split, **SINGLE))
    mask = np.concatenate([b["mask"] for b in batches]) > 0
    return {key: np.concatenate([b[key] for b in batches])[mask] for key in batches[0] if key != "mask"}


def test_convert_writes_shards_the_pipeline_reads_back_as_the_folder_source(folder, converted):
    names = sorted(p.name for p in converted.glob("*.array_record"))
    assert names == [f"{s}-{k:05d}-of-00003.array_record" for s in ("train", "validation") for k in range(3)]
    manifest = json.loads((converted / "conversion.json").read_text())
    assert manifest["complete"] and manifest["written"] == {"train": 240, "validation": 60}
    skipped = [m for shard in manifest["shards"].values() for m in shard["skipped"]]
    assert len(skipped) == 1 and "zz_corrupt.png" in skipped[0]
    assert json.loads((converted / "labels.json").read_text())["classes"] == list(CLASSES)

    records = DataConfiguration(source=f"array_record:{converted}/{{split}}-*-of-*.array_record")
    images = DataConfiguration(source=f"images:{folder.root}", image_size=16, channels=3)
    for split in ("validation", "train"):
        got = all_examples(records, split)
        want = all_examples(images if split == "validation" else images.model_copy(update={"skip_bad_examples": True}), split)
        if split == "train":  # the source stands the next example in for the corrupt one; convert leaves it out
            want = {key: np.delete(value, 160, axis=0) for key, value in want.items()}
        assert got.keys() == want.keys() == {"image", "label"}
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])


def test_convert_is_deterministic(folder, converted, tmp_path):
    again = tmp_path / "again"
    assert main(["convert", str(folder.root), str(again), "--shards", "3", *CONVERT]) == 0
    assert digests(again) == digests(converted)


def test_interrupted_convert_resumes_and_keeps_finished_shards(folder, converted, tmp_path, monkeypatch, capsys):
    dest = tmp_path / "resumed"
    encode, calls = convert_module._encode_chunk, []

    def interrupted(task):
        calls.append(task)
        if len(calls) == 4:  # train shards hold 80, 80, 81 inputs, chunks 64: shard 0 done, shard 1 half
            raise KeyboardInterrupt
        return encode(task)

    monkeypatch.setattr(convert_module, "_encode_chunk", interrupted)
    assert main(["convert", str(folder.root), str(dest), "--shards", "3", *CONVERT]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in dest.glob("*.array_record")) == ["train-00000-of-00003.array_record"]
    assert (dest / ".train-00001-of-00003.array_record.tmp").exists()  # half written, never renamed
    finished = (dest / "train-00000-of-00003.array_record").stat()

    monkeypatch.setattr(convert_module, "_encode_chunk", encode)
    calls.clear()
    assert main(["convert", str(folder.root), str(dest), "--shards", "3", *CONVERT]) == 0
    again = (dest / "train-00000-of-00003.array_record").stat()
    assert (again.st_ino, again.st_mtime_ns) == (finished.st_ino, finished.st_mtime_ns)  # not rewritten
    assert {k: v for k, v in digests(dest).items() if not k.startswith(".")} == digests(converted)
    assert not list(dest.glob(".*.tmp"))


def test_resuming_with_other_settings_is_refused(folder, converted, capsys):
    code = main(["convert", str(folder.root), str(converted), "--shards", "2", *CONVERT])
    assert code == 2 and "holds a conversion with other settings" in capsys.readouterr().err


def test_convert_npz_and_npy_pair(tmp_path):
    rng = np.random.default_rng(0)
    x_train, y_train = rng.integers(0, 256, (30, 10, 12, 3), dtype=np.uint8), rng.integers(0, 5, 30)
    x_test, y_test = rng.integers(0, 256, (7, 10, 12, 3), dtype=np.uint8), rng.integers(0, 5, 7)
    np.savez(tmp_path / "keras.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    assert main(["convert", str(tmp_path / "keras.npz"), str(tmp_path / "a"), "--shards", "2", "--quiet"]) == 0
    config = DataConfiguration(source=f"array_record:{tmp_path}/a/{{split}}-*.array_record")
    for split, (x, y) in {"train": (x_train, y_train), "test": (x_test, y_test)}.items():
        got = all_examples(config, split)
        np.testing.assert_array_equal(got["image"], x.astype(np.float32) / 255)
        np.testing.assert_array_equal(got["label"], y)

    np.save(tmp_path / "images.npy", x_test[..., :1])
    np.save(tmp_path / "labels.npy", y_test)
    args = [str(tmp_path / "images.npy"), str(tmp_path / "b"), "--labels", str(tmp_path / "labels.npy"), "--splits", "test"]
    assert main(["convert", *args, "--image-size", "8", "--quiet"]) == 0
    got = all_examples(DataConfiguration(source=f"array_record:{tmp_path}/b/test-*.array_record"), "test")
    expected = [np.asarray(Image.fromarray(x[..., 0]).resize((10, 8), Image.Resampling.BILINEAR))[:, 1:9] for x in x_test]
    assert got["image"].shape == (7, 8, 8, 3)  # grey arrays become RGB unless --channels 1
    assert np.abs(got["image"][..., 0] * 255 - np.stack(expected)).max() <= 1.5
    np.testing.assert_array_equal(got["label"], y_test)


@pytest.mark.slow  # building the digits TFDS dataset takes 5-20 s on a shared 2-core machine
def test_convert_a_prepared_tfds_dataset(tmp_path):
    data_dir = digits.prepare_digits(tmp_path / "data")
    dest = tmp_path / "digits"
    assert main(["convert", "tfds:workshop_digits", str(dest), "--data-dir", str(data_dir), "--splits", "validation", "--quiet"]) == 0
    tfds_config = DataConfiguration(data_dir=str(data_dir))
    records = DataConfiguration(source=f"array_record:{dest}/{{split}}-*.array_record", max_level=16)
    got, want = all_examples(records, "validation"), all_examples(tfds_config, "validation")
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])


def test_inspect_prints_counts_shapes_labels_and_writes_a_grid(converted, tmp_path, capsys):
    grid = tmp_path / "grid.png"
    assert main(["inspect", str(converted), "--splits", "validation", "--grid", str(grid), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"{converted}[validation]: 60 examples" in out
    assert "image    uint8 (16, 16, 3) x 60" in out and "label    int64 () x 60" in out
    assert "labels   3 classes  0 (cat): 20  1 (dog): 20  2 (eel): 20" in out
    picture = np.asarray(Image.open(grid))
    assert picture.shape == (8 * 34 + 2, 8 * 34 + 2, 3)  # 60 tiles of 16 px scaled x2, 8 columns, 2 px gaps
    assert picture.std() > 10


def test_inspect_a_raw_folder_reports_mixed_sizes_and_the_bad_file(folder, tmp_path, capsys):
    assert main(["inspect", str(folder.root), "--splits", "train", "--grid", "none", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "[train]: 241 examples" in out and "shapes; H 8-40, W 8-40" in out
    assert "bad      1 unreadable" in out and "zz_corrupt.png" in out
    assert not list(Path.cwd().glob("inspect-*.png"))


def test_stats_and_convert_weights_refuse_bad_weights_files(folder, tmp_path, capsys):
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"not weights")
    args = ["stats", str(folder.root), "--split", "validation", "--out", str(tmp_path / "r.npz"), "--weights", str(weights)]
    assert_one_message(capsys, main([*args, "--image-size", "12", "--channels", "3"]), "is not a readable safetensors file")
    assert not (tmp_path / "r.npz").exists()
    missing = tmp_path / "missing.pth"
    assert_one_message(capsys, main(["convert-weights", "inception", str(missing), str(tmp_path / "w.safetensors")]),
                       "does not exist")


@pytest.mark.slow  # compiles InceptionV3 (about a minute on 2 cores)
def test_stats_are_the_inception_statistics_of_every_image(tmp_path, capsys):
    from workshop_dist.eval import fid, inception
    from workshop_dist.weights import model_tensors, write_safetensors

    small = make_image_folder(tmp_path / "small", per_class={"validation": 3})
    model = inception.random_inception(0)
    weights = write_safetensors(tmp_path / "inception.safetensors", model_tensors(model))
    out = tmp_path / "ref.npz"
    args = ["stats", str(small.root), "--split", "validation", "--out", str(out), "--weights", str(weights)]
    assert main([*args, "--image-size", "16", "--channels", "3", "--quiet"]) == 0
    mu, sigma = fid.load_statistics(out)
    from workshop_dist.data.splits import ImageOptions, open_dataset

    split = open_dataset(str(small.root), splits=["validation"], options=ImageOptions(16, 3)).splits["validation"]
    images = np.stack([split[i]["image"] for i in range(len(split))]).astype(np.float32) / 255.0
    expected = fid.FeatureStatistics.of(np.asarray(inception.feature_function(model)(images)))
    np.testing.assert_allclose(mu, expected.mean(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sigma, expected.covariance(), rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------- bad input


def assert_one_message(capsys, code: int, expected: str, want_code: int = 2) -> None:
    err = capsys.readouterr().err
    assert code == want_code, err
    assert err.startswith("workshop-data: error: ") and expected in err
    assert "Traceback" not in err


def test_bad_input_empty_folder(tmp_path, capsys):
    (tmp_path / "src" / "train").mkdir(parents=True)
    assert_one_message(capsys, main(["convert", str(tmp_path / "src"), str(tmp_path / "d")]), "holds no image files")


def test_bad_input_mixed_channel_counts(folder, tmp_path, capsys):
    code = main(["convert", str(folder.root), str(tmp_path / "d"), "--image-size", "16", "--skip-bad"])
    assert_one_message(capsys, code, "mixed channel counts")
    assert not (tmp_path / "d").exists()


def test_bad_input_image_smaller_than_the_crop(tmp_path, capsys):
    write_image(tmp_path / "src" / "train" / "a.png", random_picture(np.random.default_rng(0), 10, 30))
    code = main(["convert", str(tmp_path / "src"), str(tmp_path / "d"), "--image-size", "16", "--crop-only"])
    assert_one_message(capsys, code, "is 30x10, smaller than data.image_size=16")


def test_bad_input_missing_path(tmp_path, capsys):
    assert_one_message(capsys, main(["inspect", str(tmp_path / "nothing")]), "does not exist")
    assert_one_message(capsys, main(["convert", "tfds:no_such_set", str(tmp_path / "d"), "--data-dir", str(tmp_path)]), "not prepared")


def test_corrupt_file_without_skip_bad_names_it(folder, tmp_path, capsys):
    code = main(["convert", str(folder.root), str(tmp_path / "d"), "--image-size", "16", "--channels", "3", "--quiet"])
    assert_one_message(capsys, code, "zz_corrupt.png", want_code=1)


# ----------------------------------------------------------------------------- processes


@pytest.mark.slow
def test_worker_processes_write_the_same_bytes(folder, converted, tmp_path):
    dest = tmp_path / "workers"
    assert main(["convert", str(folder.root), str(dest), "--shards", "3", "--workers", "2", *CONVERT]) == 0
    assert digests(dest) == digests(converted)


@pytest.mark.slow
def test_console_command_exit_code_and_message(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    result = subprocess.run(
        [sys.executable, "-m", "workshop_dist.data.cli", "convert", str(tmp_path / "missing"), str(tmp_path / "d")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"workshop-data: error: {tmp_path / 'missing'} does not exist: give an "
                                                  "image folder, a .npz/.npy file, tfds:NAME or ArrayRecord files."]
