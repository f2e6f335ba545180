"""The ``clu`` tracker: CLU's metric writers need TensorFlow. Without it, one clear error naming the
extra; with it (the CI leg that installs ``.[tensorflow]``), the scalars, images and hparams that
a run logs read back from CLU's event files with TensorBoard's own reader."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from workshop_dist import MetricsLogger
from workshop_dist._deps import DependencyError
from workshop_dist.logging_config import LoggingConfiguration

CLU = LoggingConfiguration(trackers=["jsonl", "clu"])


def test_without_tensorflow_the_clu_tracker_says_which_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # import tensorflow raises ImportError
    monkeypatch.delitem(sys.modules, "clu.metric_writers", raising=False)
    with pytest.raises(DependencyError) as info:
        MetricsLogger(tmp_path, enabled=True, config=CLU)
    message = str(info.value)
    assert "CLU's metric writers" in message
    assert 'pip install "workshop-dist[tensorflow]"' in message


def test_the_clu_tracker_is_a_valid_choice_in_the_config():
    assert LoggingConfiguration.from_dict({"trackers": ["clu"]}).trackers == ["clu"]


def read_clu_events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir / "clu"), size_guidance={"tensors": 0})
    events.Reload()
    return events


def test_clu_writes_the_same_scalars_images_and_hparams(tmp_path):
    pytest.importorskip("tensorflow", reason="CLU's metric writers need TensorFlow (the tensorflow extra)")
    from tensorboard.util import tensor_util

    logger = MetricsLogger(tmp_path, enabled=True, config=CLU)
    losses = {2: 3.25, 4: 1.5, 6: float("nan")}
    for step, loss in losses.items():
        logger.log_metrics(step, {"loss": loss, "grad_norm": 10.0 * step})
    logger.log_metrics(6, {"loss": 0.75}, prefix="val")
    logger.log_images(6, {"samples": np.linspace(0, 1, 2 * 8 * 8).reshape(2, 8, 8, 1)})
    logger.log_hparams({"training": {"batch_size": 64, "optimizer": {"learning_rate": 1e-3}}, "tags": ["a"]})
    logger.close()

    events = read_clu_events(tmp_path)
    tensors = events.Tags()["tensors"]
    assert {"train/loss", "train/grad_norm", "val/loss", "samples"} <= set(tensors)
    board = {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in events.Tensors("train/loss")}
    assert board.keys() == losses.keys()
    assert board[2] == 3.25 and board[4] == 1.5 and np.isnan(board[6])
    assert [float(tensor_util.make_ndarray(e.tensor_proto)) for e in events.Tensors("val/loss")] == [0.75]
    [image] = events.Tensors("samples")
    encoded = tensor_util.make_ndarray(image.tensor_proto)  # width, height, then one PNG per image
    assert image.step == 6 and encoded[:2].tolist() == [b"8", b"8"] and len(encoded) == 4
    assert all(png.startswith(b"\x89PNG") for png in encoded[2:])
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")
    # The jsonl tracker beside it saw the same values.
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["train/loss"] for row in rows if "train/loss" in row] == [3.25, 1.5, "nan"]


def test_workshop_train_logs_its_training_metrics_through_clu(tmp_path):
    pytest.importorskip("tensorflow", reason="CLU's metric writers need TensorFlow (the tensorflow extra)")
    from tensorboard.util import tensor_util

    from workshop_dist.cli import main

    quick = ["training.length.max_steps=4", "training.cadence.log_every=2", "training.scheduler=null", "training.cadence.num_samples=0"]
    assert main(["--workdir", str(tmp_path), "logging.trackers=[jsonl,clu]", *quick]) == 0
    events = read_clu_events(tmp_path / "logs")
    board = {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in events.Tensors("train/loss")}
    rows = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    jsonl = {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}
    assert board.keys() == jsonl.keys() == {2, 4}
    for step in board:
        assert board[step] == pytest.approx(jsonl[step], rel=1e-6)
    assert not list((tmp_path / "logs").glob("events.out.tfevents.*"))  # no tensorboard tracker asked for
