"""Image folders as a data source (data.source: images:PATH): decoding, crops, flips, labels,
determinism, resuming, bad files and bad input."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from tests.image_folders import CLASSES, make_image_folder, random_picture, write_image
from workshop_dist.config import ConfigError
from workshop_dist.data import (
    BadExampleError,
    DataConfiguration,
    label_map,
    make_eval_input,
    make_train_input,
    write_label_map,
)
from workshop_dist.data.images import crop_box, list_folder

SINGLE = {"process_index": 0, "process_count": 1}
SIZE = 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def config(folder) -> DataConfiguration:
    return DataConfiguration(source=f"images:{folder.root}", image_size=SIZE, channels=3, skip_bad_examples=True)


def eval_images(config, split="validation") -> tuple[np.ndarray, np.ndarray]:
    batches = list(make_eval_input(config, global_batch_size=64, split=split, **SINGLE))
    mask = np.concatenate([b["mask"] for b in batches]) > 0
    return np.concatenate([b["image"] for b in batches])[mask], np.concatenate([b["label"] for b in batches])[mask]


def test_labels_come_from_sorted_class_folders_and_are_written_to_the_workdir(folder, config, tmp_path):
    images, labels = eval_images(config)
    assert images.shape == (60, SIZE, SIZE, 3) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    np.testing.assert_array_equal(labels, np.repeat([0, 1, 2], 20))  # eval keeps the sorted file order
    assert label_map(config) == list(CLASSES)
    path = write_label_map(config, tmp_path / "workdir")
    assert json.loads(path.read_text()) == {"source": config.source, "classes": list(CLASSES)}
    digits = DataConfiguration()
    assert label_map(digits) is None and write_label_map(digits, tmp_path / "other") is None
    assert not (tmp_path / "other").exists()


def test_center_crop_equals_resizing_the_whole_image_then_cropping(folder, config):
    images, _ = eval_images(config)
    paths = list_folder(str(folder.root), "validation").paths
    for index in (0, 1, 2, 3, 25, 59):  # modes L, RGB, RGBA, P; JPEG, PNG, WebP
        with Image.open(paths[index]) as original:
            picture = original.convert("RGBA").convert("RGB") if original.mode == "P" else original.convert("RGB")
        width, height = picture.size
        scale = SIZE / min(width, height)
        resized = picture.resize((max(SIZE, round(width * scale)), max(SIZE, round(height * scale))), Image.Resampling.BILINEAR)
        left, top = (resized.size[0] - SIZE) // 2, (resized.size[1] - SIZE) // 2
        expected = np.asarray(resized.crop((left, top, left + SIZE, top + SIZE)), np.float32) / 255
        assert np.abs(images[index] - expected).max() <= 1.5 / 255, paths[index]


def test_grey_images_have_one_channel_and_crop_only_takes_a_window(tmp_path):
    picture = random_picture(np.random.default_rng(1), 20, 30)
    write_image(tmp_path / "train" / "a.png", picture)
    config = DataConfiguration(source=f"images:{tmp_path}", eval_split="train", image_size=12, channels=1, resize=False)
    images, = (b["image"] for b in make_eval_input(config, global_batch_size=1, **SINGLE))
    grey = np.asarray(Image.fromarray(picture).convert("L"), np.float32) / 255
    assert images.shape == (1, 12, 12, 1)
    np.testing.assert_allclose(images[0, ..., 0], grey[4:16, 9:21], atol=1e-6)  # the center 12x12 window


def test_random_crops_are_windows_of_the_resized_image_drawn_anew_each_epoch(tmp_path):
    picture = random_picture(np.random.default_rng(2), 16, 40)  # 16 x 40: 25 horizontal offsets
    for i in range(4):
        write_image(tmp_path / "train" / f"{i}.png", picture)
    config = DataConfiguration(source=f"images:{tmp_path}", image_size=16, channels=3, shuffle=False)
    train = make_train_input(config, global_batch_size=4, seed=3, **SINGLE)
    crops = np.concatenate([next(train)["image"] for _ in range(10)])  # 10 epochs of the 4 copies
    windows = np.stack([picture[:, left : left + 16] for left in range(25)]).astype(np.float32) / 255
    offsets = [int(np.argmin(np.abs(windows - crop).max(axis=(1, 2, 3)))) for crop in crops]
    for crop, left in zip(crops, offsets, strict=True):
        np.testing.assert_allclose(crop, windows[left], atol=1e-6)
    assert len(set(offsets)) > 10  # 40 draws from 25 positions
    center = make_eval_input(config, global_batch_size=4, split="train", **SINGLE)
    np.testing.assert_allclose(next(iter(center))["image"][0], windows[12], atol=1e-6)


def test_flips_mirror_some_examples_and_crops_stay_off(config):
    config = config.model_copy(update={"random_flip": True, "random_crop": False, "shuffle": False, "eval_split": "train"})
    train = make_train_input(config, global_batch_size=60, seed=0, **SINGLE)
    flipped = next(train)["image"]
    plain, _ = eval_images(config, split="train")
    mirrored = np.array([np.array_equal(f, p[:, ::-1]) and not np.array_equal(f, p) for f, p in zip(flipped, plain[:60], strict=True)])
    same = np.array([np.array_equal(f, p) for f, p in zip(flipped, plain[:60], strict=True)])
    assert np.all(mirrored | same) and 10 < mirrored.sum() < 50


def test_same_seed_same_batches_other_seed_other_crops(config):
    def batches(seed):
        train = make_train_input(config, global_batch_size=32, seed=seed, **SINGLE)
        return [next(train) for _ in range(3)]

    first, again, other = batches(5), batches(5), batches(6)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(first[0]["image"], other[0]["image"])


def test_restored_iterator_continues_with_the_same_batches(config):
    config = config.model_copy(update={"random_flip": True})
    reference = make_train_input(config, global_batch_size=48, seed=1, **SINGLE)
    assert reference.steps_per_epoch == 5
    expected = [next(reference) for _ in range(9)]
    train = make_train_input(config, global_batch_size=48, seed=1, **SINGLE)
    for _ in range(4):
        next(train)
    state = json.loads(json.dumps(train.get_state()))
    train.close()
    resumed = make_train_input(config, global_batch_size=48, seed=1, **SINGLE)
    resumed.set_state(state)  # continues across the epoch boundary at batch 5
    for batch, want in zip([next(resumed) for _ in range(5)], expected[4:], strict=True):
        np.testing.assert_array_equal(batch["image"], want["image"])
        np.testing.assert_array_equal(batch["label"], want["label"])


def test_crops_and_flips_do_not_depend_on_the_number_of_processes(config):
    config = config.model_copy(update={"random_flip": True})
    whole = make_train_input(config, global_batch_size=40, seed=9, **SINGLE)
    halves = [make_train_input(config, global_batch_size=40, seed=9, process_index=i, process_count=2) for i in range(2)]
    for _ in range(7):  # past the first epoch (6 batches)
        parts = [next(half) for half in halves]
        np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), next(whole)["image"])


def test_a_corrupt_file_is_an_error_naming_it(folder, config):
    strict = config.model_copy(update={"skip_bad_examples": False, "eval_split": "train"})
    with pytest.raises(BadExampleError, match=r"Cannot read image .*zz_corrupt\.png"):
        eval_images(strict, split="train")


def test_skipped_file_is_replaced_by_the_next_example_and_counted(folder, config, caplog):
    config = config.model_copy(update={"eval_split": "train"})
    with caplog.at_level(logging.WARNING, logger="workshop_dist.data.batches"):
        images, labels = eval_images(config, split="train")
    assert len(images) == folder.counts["train"] == 241  # the batch stays full
    np.testing.assert_array_equal(images[160], images[161])  # the corrupt dog (160) -> the first eel
    assert labels[160] == labels[161] == 2
    skips = [r.getMessage() for r in caplog.records if "Skipped a bad example" in r.getMessage()]
    assert len(skips) == 1 and "zz_corrupt.png" in skips[0] and "1 skipped so far" in skips[0]


def test_cache_decodes_once_with_center_crops(config):
    cached = config.model_copy(update={"cache": True, "shuffle": False, "eval_split": "train"})
    train = make_train_input(cached, global_batch_size=60, seed=0, **SINGLE)
    plain, _ = eval_images(cached, split="train")
    np.testing.assert_array_equal(next(train)["image"], plain[:60])


def test_without_image_size_equal_images_keep_their_size(tmp_path):
    for name in ("a", "b"):
        write_image(tmp_path / "train" / f"{name}.png", random_picture(np.random.default_rng(0), 10, 14))
    config = DataConfiguration(source=f"images:{tmp_path}", eval_split="train")
    batch = next(iter(make_eval_input(config, global_batch_size=2, **SINGLE)))
    assert batch["image"].shape == (2, 10, 14, 3) and "label" not in batch
    write_image(tmp_path / "train" / "c.png", random_picture(np.random.default_rng(0), 12, 12))
    with pytest.raises(ConfigError, match=r"3 different sizes|2 different sizes.*set data\.image_size"):
        make_eval_input(config, global_batch_size=2, **SINGLE)


def test_crop_box_covers_every_offset_uniformly():
    lefts = {crop_box(40, 16, (16, 16), resize=True, offset=(u, 0.0))[0] for u in np.linspace(0, 0.999, 200)}
    assert lefts == set(map(float, range(25)))


# ----------------------------------------------------------------------------- bad input


def test_missing_folder(tmp_path):
    config = DataConfiguration(source=f"images:{tmp_path}/nowhere", image_size=8)
    with pytest.raises(ConfigError, match=r"does not exist.*one folder per split"):
        make_train_input(config, global_batch_size=1, seed=0, **SINGLE)


def test_empty_folder(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("no images here")
    config = DataConfiguration(source=f"images:{tmp_path}", image_size=8)
    with pytest.raises(ConfigError, match=r"holds no image files"):
        make_train_input(config, global_batch_size=1, seed=0, **SINGLE)


def test_mixed_channel_counts_without_data_channels(folder):
    config = DataConfiguration(source=f"images:{folder.root}", image_size=SIZE, skip_bad_examples=True)
    with pytest.raises(ConfigError, match=r"mixed channel counts: \d+ with 1 channel .*Set data\.channels"):
        make_train_input(config, global_batch_size=8, seed=0, **SINGLE)


def test_image_smaller_than_image_size_with_crop_only(folder):
    config = DataConfiguration(source=f"images:{folder.root}", image_size=SIZE, channels=3, resize=False, skip_bad_examples=True)
    with pytest.raises(ConfigError, match=r"smaller than data\.image_size=16, and data\.resize=false only crops"):
        make_train_input(config, global_batch_size=8, seed=0, **SINGLE)


def test_class_folders_must_match_the_training_split(tmp_path):
    write_image(tmp_path / "train" / "cat" / "a.png", random_picture(np.random.default_rng(0), 8, 8))
    write_image(tmp_path / "validation" / "cow" / "a.png", random_picture(np.random.default_rng(0), 8, 8))
    config = DataConfiguration(source=f"images:{tmp_path}", image_size=8)
    with pytest.raises(ConfigError, match=r"class folders \['cow'\] that the training split"):
        make_eval_input(config, global_batch_size=1, **SINGLE)


def test_image_fields_are_rejected_for_other_sources():
    with pytest.raises(ConfigError, match=r"data\.image_size only apply to 'images:PATH' sources"):
        make_train_input(DataConfiguration(source="array_record:/nowhere/{split}", image_size=8), global_batch_size=8,
                         seed=0, **SINGLE)
    with pytest.raises(ConfigError, match=r"data\.channels only apply to 'images:PATH' sources"):  # digits: image_size only
        make_train_input(DataConfiguration(image_size=8, channels=3), global_batch_size=8, seed=0, **SINGLE)
    with pytest.raises(ValueError, match=r"needs a name after .images:."):
        DataConfiguration(source="images:")


# ----------------------------------------------------------------------------- worker processes


@pytest.mark.slow
def test_worker_processes_decode_the_same_batches_and_resume(config):
    config = config.model_copy(update={"random_flip": True})
    reference = make_train_input(config, global_batch_size=48, seed=4, **SINGLE)
    expected = [next(reference) for _ in range(8)]
    workers = config.model_copy(update={"worker_count": 2})
    train = make_train_input(workers, global_batch_size=48, seed=4, **SINGLE)
    try:
        first = [next(train) for _ in range(3)]
        state = train.get_state()
    finally:
        train.close()
    resumed = make_train_input(workers, global_batch_size=48, seed=4, **SINGLE)
    resumed.set_state(state)
    try:
        rest = [next(resumed) for _ in range(5)]
    finally:
        resumed.close()
    for batch, want in zip(first + rest, expected, strict=True):
        np.testing.assert_array_equal(batch["image"], want["image"])
        np.testing.assert_array_equal(batch["label"], want["label"])


@pytest.mark.slow
def test_a_corrupt_file_in_a_worker_is_the_same_error(config):
    strict = config.model_copy(update={"skip_bad_examples": False, "worker_count": 2, "shuffle": False})
    train = make_train_input(strict, global_batch_size=40, seed=0, **SINGLE)
    try:
        with pytest.raises(BadExampleError, match=r"zz_corrupt\.png"):
            for _ in range(6):  # batch 4 holds example 160
                next(train)
    finally:
        train.close()


@pytest.mark.slow
def test_image_benchmark_smoke_checks_same_pixels_and_prints_ratios(tmp_path):
    """benchmarks/input_pipeline.py --images: it asserts the pipeline and the bare loop produce the
    same batch before timing them; here it must run and print one ratio per worker count."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    args = ["--images", "--image-dir", str(tmp_path), "--num-images", "96", "--image-batches", "2", "--rounds", "1",
            "--image-workers", "0", "1"]
    result = subprocess.run([sys.executable, "input_pipeline.py", *args], capture_output=True, text=True,
                            cwd=repo / "benchmarks", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for workers in (0, 1):
        assert re.search(rf"worker_count={workers}: +[\d.]+ images/s = [\d.]+x the bare loop", result.stdout), result.stdout


def test_evaluation_images_get_the_training_split_s_channels_and_size(tmp_path):
    write_image(tmp_path / "train" / "a.png", random_picture(np.random.default_rng(0), 10, 12))
    write_image(tmp_path / "validation" / "b.png", random_picture(np.random.default_rng(1), 10, 12)[..., 0])  # grey
    config = DataConfiguration(source=f"images:{tmp_path}")
    with pytest.raises(ConfigError, match="mixed channel counts"):  # grey validation, RGB training
        make_eval_input(config, global_batch_size=1, **SINGLE)
    batch = next(iter(make_eval_input(config.model_copy(update={"channels": 3}), global_batch_size=1, **SINGLE)))
    assert batch["image"].shape == (1, 10, 12, 3)
