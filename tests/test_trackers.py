"""The ``logging`` section and its trackers: TensorBoard/JSONL selection, console verbosity, and
Weights & Biases in offline mode (no network), read back from W&B's own run files: the same
scalars, sample grids and config, one run id across a resumed training, no repeated steps."""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from flax import nnx

from tests.helpers import digits_images, tiny_model_config, training_config
from workshop_dist import MetricsLogger, Trainer, create_model
from workshop_dist.config import ConfigError
from workshop_dist.experiment import ExperimentConfiguration
from workshop_dist.logging_config import LoggingConfiguration

pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2

REPO = Path(__file__).resolve().parents[1]
TRAIN = digits_images("train")
VAL = digits_images("validation")
WANDB = {"trackers": ["jsonl", "wandb"], "wandb": {"project": "tests", "mode": "offline", "tags": ["ci"]}}


@pytest.fixture(autouse=True)
def offline_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


# --------------------------------------------------------------------------- reading W&B's files


def wandb_records(path: Path):
    """The protobuf records of a ``run-<id>.wandb`` file (a LevelDB-style log: 32 KiB blocks of
    chunks with a 7-byte header: crc32, length, type full/first/middle/last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"not a W&B run file: {path}"
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # block trailer padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 1:
            whole = chunk
        elif kind == 2:
            pending = chunk
            continue
        elif kind == 3:
            pending += chunk
            continue
        elif kind == 4:
            whole = pending + chunk
        else:
            break
        record = wandb_internal_pb2.Record()
        record.ParseFromString(whole)
        yield record


def read_wandb(log_dir: Path, finished: int) -> dict:
    """Everything the offline runs under ``log_dir/wandb`` recorded: run ids, history, config.

    Waits until ``finished`` run files end with their exit record: W&B's service writes them
    out shortly after ``finish()`` returns.
    """
    deadline = time.monotonic() + 60
    while True:
        run_files = sorted((log_dir / "wandb").glob("offline-run-*/run-*.wandb"))
        exits = sum(any(r.WhichOneof("record_type") == "exit" for r in wandb_records(f)) for f in run_files)
        if exits >= finished:
            break
        assert time.monotonic() < deadline, f"only {exits} of {finished} W&B runs were written out"
        time.sleep(0.2)
    run_ids, history, config, images = [], defaultdict(list), {}, defaultdict(list)
    for run_file in run_files:
        for record in wandb_records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_ids.append(record.run.run_id)
            elif kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                step = row["_step"]
                for key, value in row.items():
                    if key.startswith(("train/", "val/")):
                        history[key].append((step, value))
                    elif key == "samples/count":
                        images["samples"].append((step, value))
            elif kind == "config":
                for item in record.config.update:
                    config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return {"files": run_files, "run_ids": run_ids, "history": dict(history), "config": config, "images": dict(images)}


def jsonl_rows(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- W&B through the Trainer


def make_trainer(workdir: Path, epochs: int) -> Trainer:
    training = training_config(batch_size=64, num_epochs=epochs, steps_per_epoch=4, log_every=2, num_samples=4)
    model = create_model(tiny_model_config(), rngs=nnx.Rngs(0))
    metrics_logger = MetricsLogger(workdir / "logs", config=LoggingConfiguration(**WANDB))
    return Trainer(
        model, training, TRAIN, VAL, workdir, metrics_logger=metrics_logger,
        experiment_config={"training": {"num_epochs": epochs}, "model": {"name": "tiny"}},
    )


@pytest.mark.slow
def test_wandb_offline_gets_the_same_scalars_images_and_config_across_a_resume(tmp_path):
    first = make_trainer(tmp_path, epochs=1)
    first.fit()
    first.close()
    second = make_trainer(tmp_path, epochs=2)
    second.restore()
    second.fit()
    second.write_samples()  # a sample grid at step 8, already logged by the evaluation: not repeated
    second.close()

    log_dir = tmp_path / "logs"
    run_id = (log_dir / "wandb_run_id").read_text().strip()
    seen = read_wandb(log_dir, finished=2)
    assert len(seen["files"]) == 2  # one offline file per process start ...
    assert seen["run_ids"] == [run_id, run_id]  # ... of one W&B run
    # Exactly the scalars of metrics.jsonl, each step once.
    expected = defaultdict(list)
    for row in jsonl_rows(log_dir):
        for key, value in row.items():
            if key != "step":
                expected[key].append((row["step"], value))
    assert {"train/loss", "val/loss", "train/learning_rate"} <= expected.keys()
    assert seen["history"].keys() == expected.keys()
    for key, points in expected.items():
        assert [step for step, _ in seen["history"][key]] == [step for step, _ in points], key
        assert [value for _, value in seen["history"][key]] == pytest.approx([value for _, value in points], rel=1e-6), key
    assert [step for step, _ in seen["history"]["train/loss"]] == [2, 4, 6, 8]
    assert [step for step, _ in seen["history"]["val/loss"]] == [4, 8]
    assert seen["images"]["samples"] == [(4, 1), (8, 1)]  # one grid per evaluation
    assert seen["config"]["training"] == {"num_epochs": 2}  # the resumed run's config wins
    assert seen["config"]["model"] == {"name": "tiny"}
    media = sorted(p.name for p in (log_dir / "wandb").glob("offline-run-*/files/media/images/*.png"))
    assert len(media) == 2 and all(name.startswith("samples_") for name in media)


# --------------------------------------------------------------------------- repeated steps


@pytest.mark.slow
def test_steps_logged_again_after_a_restart_are_dropped(tmp_path):
    config = LoggingConfiguration(**WANDB)
    first = MetricsLogger(tmp_path, config=config)
    for step in range(1, 6):
        first.log_metrics(step, {"loss": float(step)})
    first.close()
    second = MetricsLogger(tmp_path, config=config)  # resumed from a checkpoint at step 2
    for step in range(3, 8):
        second.log_metrics(step, {"loss": 10.0 + step})
    second.log_metrics(7, {"loss": 99.0}, prefix="val")
    second.close()
    history = read_wandb(tmp_path, finished=2)["history"]
    assert history["train/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0), (6, 16.0), (7, 17.0)]
    assert history["val/loss"] == [(7, 99.0)]
    # metrics.jsonl keeps every write (its readers take the last value per step).
    assert [row["step"] for row in jsonl_rows(tmp_path)] == [1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 7]


KILLED_WRITER = """
import os, sys
from workshop_dist.logging_config import LoggingConfiguration
from workshop_dist.metrics import MetricsLogger
logger = MetricsLogger(sys.argv[1], enabled=True, config=LoggingConfiguration.model_validate_json(sys.argv[2]))
for step in (1, 2, 3):
    logger.log_metrics(step, {"loss": float(step)})
os._exit(9)  # killed: the W&B run is never finished
"""


@pytest.mark.slow
def test_after_a_hard_kill_the_resumed_process_logs_its_steps_again(tmp_path):
    # A fresh process with its own W&B service (not this one's: WANDB_SERVICE points there).
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    env.update({"JAX_PLATFORMS": "cpu", "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    config = LoggingConfiguration(**WANDB)
    result = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path), config.model_dump_json()],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 9, result.stderr[-2000:]
    assert not (tmp_path / "wandb_steps.json").exists()  # W&B may not have written those steps
    resumed = MetricsLogger(tmp_path, config=config)  # from a checkpoint at step 1
    for step in (2, 3, 4):
        resumed.log_metrics(step, {"loss": float(step)})
    resumed.close()
    seen = read_wandb(tmp_path, finished=1)
    assert len(seen["files"]) == 2 and len(set(seen["run_ids"])) == 1
    steps = [step for step, _ in seen["history"]["train/loss"]]
    assert steps[-3:] == [2, 3, 4]
    assert set(steps) <= {1, 2, 3, 4}
    assert json.loads((tmp_path / "wandb_steps.json").read_text()) == {"train/loss": 4}


# --------------------------------------------------------------------------- tracker selection, config


def test_jsonl_only_writes_no_tensorboard_events(tmp_path):
    logger = MetricsLogger(tmp_path, config=LoggingConfiguration(trackers=["jsonl"]))
    logger.log_metrics(1, {"loss": 2.0})
    logger.log_hparams({"a": 1})
    logger.close()
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
    assert jsonl_rows(tmp_path) == [{"step": 1, "train/loss": 2.0}]


def test_tensorboard_only_writes_no_jsonl(tmp_path):
    logger = MetricsLogger(tmp_path, config=LoggingConfiguration(trackers=["tensorboard"]))
    logger.log_metrics(1, {"loss": 2.0})
    logger.close()
    assert not (tmp_path / "metrics.jsonl").exists()
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_the_old_constructor_still_writes_tensorboard_and_jsonl(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=True)
    logger.log_metrics(3, {"loss": 1.5})
    logger.close()
    assert jsonl_rows(tmp_path) == [{"step": 3, "train/loss": 1.5}]
    assert list(tmp_path.glob("events.out.tfevents.*"))
    assert not (tmp_path / "wandb").exists()


def test_logging_section_in_the_experiment_config():
    config = ExperimentConfiguration.from_dict({}, ["logging.trackers=[tensorboard,wandb]", "logging.wandb.tags=[a,b]"])
    assert config.logging.trackers == ["tensorboard", "wandb"]
    assert config.logging.wandb.tags == ["a", "b"]
    assert ExperimentConfiguration().logging.trackers == ["tensorboard", "jsonl"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("logging.trackers=[mlflow]", "logging.trackers.0: Input should be 'tensorboard', 'jsonl', 'wandb' or 'clu'"),
        ("logging.trackers=[jsonl,jsonl]", "logging.trackers: trackers lists jsonl more than once"),
        ("logging.wandb.project=mine", "logging: wandb.project set but trackers ['tensorboard', 'jsonl'] has no 'wandb'"),
        ("logging.console=loud", "logging.console: Input should be 'normal', 'quiet' or 'verbose'"),
        ("logging.wandb.mode=online-ish", "logging.wandb.mode"),
    ],
)
def test_bad_logging_settings_are_config_errors(override, message):
    with pytest.raises(ConfigError) as info:
        ExperimentConfiguration.from_dict({}, [override])
    assert message in str(info.value)


def test_wandb_defaults_spelled_out_without_the_tracker_are_fine(tmp_path):
    # A resolved config.yaml lists the wandb section at its defaults.
    path = tmp_path / "config.yaml"
    ExperimentConfiguration().save(path)
    assert "wandb:" in path.read_text()
    assert ExperimentConfiguration.load(path).logging.trackers == ["tensorboard", "jsonl"]


@pytest.mark.parametrize(
    ("console", "quiet", "verbose", "level"),
    [
        ("normal", False, False, logging.INFO),
        ("quiet", False, False, logging.WARNING),
        ("verbose", False, False, logging.DEBUG),
        ("verbose", True, False, logging.WARNING),  # the command line wins
        ("quiet", False, True, logging.DEBUG),
    ],
)
def test_console_level_from_config_and_flags(console, quiet, verbose, level):
    assert LoggingConfiguration(console=console).console_level(quiet=quiet, verbose=verbose) == level


def test_missing_wandb_is_a_clear_error(tmp_path, monkeypatch):
    from workshop_dist.config import WorkshopError

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(WorkshopError, match=r"pip install 'workshop-dist\[wandb\]'"):
        MetricsLogger(tmp_path, config=LoggingConfiguration(trackers=["wandb"]))


def test_readme_logging_example_is_a_valid_config():
    readme = (REPO / "README.md").read_text()
    block = readme.split("**Trackers.**", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    from workshop_dist.config import parse_yaml

    config = ExperimentConfiguration.from_dict(parse_yaml(block))
    assert config.logging.trackers == ["tensorboard", "jsonl", "wandb"]
    assert config.logging.wandb.tags == ["baseline"]
