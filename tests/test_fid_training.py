"""FID while training on real image files: `workshop-train` on an image folder and on its converted
ArrayRecord files, 8 devices, val/fid logged with (random) Inception weights, the best checkpoint
chosen by it; the images configs load and point at the right things."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.image_folders import make_image_folder
from workshop_dist import cli
from workshop_dist.data.cli import main as data_main
from workshop_dist.experiment import ExperimentConfiguration

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.parameters.hidden_size=32", "model.parameters.depth=1", "model.parameters.num_heads=2",
    "model.parameters.patch_size=4", "model.parameters.num_classes=3", "model.parameters.sampling_steps=2",
    "model.input_dim=[16,16,3]", "model.dtype=float32", "data.image_size=16", "data.worker_count=0",
    "data.eval_split=validation", "training.batch_size=16", "training.length.max_steps=4",
    "training.cadence.log_every=1", "training.cadence.eval_every=2", "training.cadence.save_every=100",
    "training.cadence.num_samples=0", "training.scheduler.warmup_steps=1", "training.ema.decay=null",
    "eval.fid_every=2", "eval.fid_samples=16", "eval.fid_batch_size=16", "mesh.data=8",
]


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    from workshop_dist.eval import inception
    from workshop_dist.weights import model_tensors, write_safetensors

    return write_safetensors(tmp_path_factory.mktemp("weights") / "inception.safetensors",
                             model_tensors(inception.random_inception(0)))


@pytest.mark.slow  # trains on 8 devices and compiles InceptionV3 twice
@pytest.mark.parametrize("stored", ["folder", "array_record"])
def test_training_from_image_files_logs_val_fid_and_keeps_the_best(stored, tmp_path, inception_weights):
    folder = make_image_folder(tmp_path / "images", per_class={"train": 16, "validation": 4})
    source, image_options = f"images:{folder.root}", ["data.skip_bad_examples=true"]
    if stored == "array_record":
        converted = tmp_path / "records"
        assert data_main(["convert", str(folder.root), str(converted), "--image-size", "16", "--channels", "3",
                          "--skip-bad", "--quiet"]) == 0
        source = f"array_record:{converted}/{{split}}-*.array_record"
        image_options = ["data.image_size=null", "data.channels=null", "data.random_crop=true"]  # resized once
    workdir = tmp_path / "run"
    args = ["--config", str(REPO / "configs" / "flow_dit_images.yaml"), "--workdir", str(workdir), "--quiet",
            *TINY, f"data.source={source}", f"eval.inception_weights={inception_weights}", *image_options]
    assert cli.main(args) == 0
    if stored == "folder":  # label i is the i-th class folder
        assert json.loads((workdir / "labels.json").read_text())["classes"] == ["cat", "dog", "eel"]
    rows = [json.loads(line) for line in (workdir / "logs" / "metrics.jsonl").read_text().splitlines()]
    scores = {row["step"]: row["val/fid"] for row in rows if "val/fid" in row}
    assert sorted(scores) == [2, 4] and all(np.isfinite(v) and v > 0 for v in scores.values())
    best = min(scores, key=scores.get)
    from workshop_dist.checkpoint import CheckpointManager

    manager = CheckpointManager(workdir / "checkpoints")
    try:
        assert manager.best_step() == best
    finally:
        manager.close()


@pytest.mark.parametrize("name", ["flow_dit_images", "flow_unet_images"])
def test_images_configs_train_from_a_folder_with_fid(name):
    config = ExperimentConfiguration.load(REPO / "configs" / f"{name}.yaml")
    assert config.data.source.startswith("images:") and config.data.image_size == 32 and config.data.channels == 3
    assert config.model.input_dim == (32, 32, 3)
    assert config.eval.fid_every and config.eval.resolved_features(config.data.source) == "inception"
    assert config.training.checkpoint.best_metric == "val/fid" and config.training.checkpoint.best_mode == "min"
