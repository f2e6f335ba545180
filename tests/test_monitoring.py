"""What a run reports: TensorBoard events (read back with TensorBoard's own reader), JSONL,
sample grids, MFU, the progress bar and profiler traces."""

import json
import logging

import jax
import pytest
from flax import nnx
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from tests.helpers import digits_images, tiny_model_config, training_config
from workshop_dist import Logger, MetricsLogger, Trainer, create_model, hardware
from workshop_dist.training import trainer as trainer_module

TRAIN = digits_images("train")
VAL = digits_images("validation")


def make_trainer(workdir, **kwargs):
    training = {"batch_size": 64, "num_epochs": 2, "steps_per_epoch": 4, "log_every": 2, "num_samples": 16}
    training.update(kwargs.pop("training", {}))
    model = create_model(tiny_model_config(), rngs=nnx.Rngs(0))
    return Trainer(model, training_config(**training), TRAIN, VAL, workdir, **kwargs)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    trainer = make_trainer(workdir, experiment_config={"training": {"batch_size": 64}, "model": {"name": "tiny"}})
    trainer.fit()
    trainer.close()
    return workdir, trainer


def test_tensorboard_reads_scalars_images_and_hparams(finished_run):
    workdir, _ = finished_run
    events = EventAccumulator(str(workdir / "logs"), size_guidance={"tensors": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    expected = {"train/loss", "train/reconstruction", "train/kl", "train/learning_rate", "train/grad_norm",
                "train/step_time", "train/examples_per_second", "val/loss", "val/kl"}
    assert expected <= set(tags["tensors"])
    # TF2 summaries arrive as tensors tagged with their plugin: images and hparams included.
    assert "samples" in events.PluginTagToContent("images")
    images = events.Tensors("samples")
    assert [event.step for event in images] == [4, 8]
    assert tensor_util.make_ndarray(images[-1].tensor_proto)[2].startswith(b"\x89PNG")
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")
    # The values are the ones in metrics.jsonl.
    rows = [json.loads(line) for line in (workdir / "logs" / "metrics.jsonl").read_text().splitlines()]
    jsonl = {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}
    board = {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in events.Tensors("train/loss")}
    assert board.keys() == jsonl.keys() == {2, 4, 6, 8}
    for step in board:
        assert board[step] == pytest.approx(jsonl[step], rel=1e-6)


def test_sample_grids_are_png_files_per_evaluation(finished_run):
    workdir, _ = finished_run
    files = sorted(p.name for p in (workdir / "samples").glob("*.png"))
    assert files == ["step_4.png", "step_8.png"]
    image = Image.open(workdir / "samples" / "step_8.png")
    assert image.format == "PNG" and image.size == ((4 * 9 + 1) * 4, (4 * 9 + 1) * 4)  # 4x4 grid of 8x8, 4x scale


def test_only_the_writing_process_creates_files(tmp_path):
    silent = MetricsLogger(tmp_path / "silent", enabled=False)
    silent.log_metrics(1, {"loss": 1.0})
    silent.close()
    assert not (tmp_path / "silent").exists()


def test_mfu_uses_the_compiled_steps_flops_and_the_peak_table(tmp_path, monkeypatch):
    assert hardware.peak_flops() is None  # CPUs report no MFU
    trainer = make_trainer(tmp_path)
    trainer.train_epoch()
    assert trainer.flops_per_step > 1e6
    assert "mfu" not in trainer.metrics_logger.jsonl_path.read_text()

    monkeypatch.setattr(hardware, "peak_flops", lambda device=None: 1e9)
    trainer = make_trainer(tmp_path / "mfu")
    seen = []
    trainer.log_callback = lambda step, metrics, prefix: seen.append(metrics)
    trainer.train_epoch()
    expected = trainer.flops_per_step / seen[-1]["step_time"] / (1e9 * trainer.mesh.devices.size)
    assert seen[-1]["mfu"] == pytest.approx(expected)


def test_peak_table_matches_device_kinds():
    class Device:
        def __init__(self, kind):
            self.device_kind = kind

    assert hardware.peak_flops(Device("TPU v5 lite")) == 197e12
    assert hardware.peak_flops(Device("TPU v5")) == 459e12
    assert hardware.peak_flops(Device("NVIDIA H100 80GB HBM3")) == 989e12
    assert hardware.peak_flops(Device("cpu")) is None


def test_progress_bar_replaces_the_console_lines(tmp_path, capsys):
    logger = Logger(tmp_path / "logs")
    trainer = make_trainer(tmp_path, logger=logger, progress_bar=True)
    trainer.train_epoch()
    trainer.close()
    err = capsys.readouterr().err
    assert "step" in err and "loss=" in err and "ex/s=" in err and "4/8" in err
    assert "train step 2:" not in err  # the bar shows it instead
    assert "train step 2:" in (tmp_path / "logs" / "train.log").read_text()  # the log file keeps it


def test_quiet_logger_hides_info(tmp_path, capsys):
    trainer = make_trainer(tmp_path, logger=Logger(tmp_path / "logs", level=logging.WARNING))
    trainer.train_epoch()
    assert "train step" not in capsys.readouterr().err


def test_profile_steps_write_a_trace(tmp_path):
    trainer = make_trainer(tmp_path, training={"profile_steps": (1, 2)})
    trainer.train_epoch()
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0


def test_first_step_time_is_reported_once(tmp_path, caplog):
    trainer = make_trainer(tmp_path)
    with caplog.at_level(logging.INFO, logger="workshop_dist"):
        trainer.train_epoch()
        trainer.train_epoch()
    assert caplog.text.count("First step done (step 1)") == 1
    assert trainer_module  # the module under test


def test_train_log_has_the_parameter_table_from_clu(finished_run):
    workdir, trainer = finished_run
    text = (workdir / "logs" / "train.log").read_text()
    table = text.split("Model parameters:", 1)[1]
    count = sum(leaf.size for leaf in jax.tree.leaves(trainer.state.params))
    assert "| encoder/0/kernel" in table and "| (64, 64)" in table
    assert f"Total: {count:,}" in table or f"Total: {count}" in table
