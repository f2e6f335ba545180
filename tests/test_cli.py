"""``workshop-train``: the default run's outputs, helper flags and user-error handling."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from workshop_dist import ExperimentConfiguration
from workshop_dist.cli import default_config_path, main

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, env=None, timeout=300):
    """Run ``python -m workshop_dist.cli`` in a fresh process (one CPU device unless env says more)."""
    full_env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    full_env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-m", "workshop_dist.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=REPO,
        timeout=timeout,
    )


def test_top_level_configs_dir_holds_the_packaged_default():
    assert (REPO / "configs" / "vae_digits.yaml").read_text() == default_config_path().read_text()


@pytest.mark.slow
def test_default_run_writes_checkpoints_metrics_samples_and_config(tmp_path):
    workdir = tmp_path / "run"
    cache = tmp_path / "jax_cache"
    result = run_cli("--workdir", str(workdir), "training.num_epochs=4", f"compilation.cache_dir={cache}")
    assert result.returncode == 0, result.stderr[-3000:]
    final_step = 4 * (1000 // 128)
    step_dir = workdir / "checkpoints" / str(final_step)
    assert {p.name for p in step_dir.iterdir()} >= {"state", "data", "config", "metadata"}
    rows = [json.loads(line) for line in (workdir / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in row for row in rows) and any("val/loss" in row for row in rows)
    assert rows[-1]["step"] == final_step
    assert list((workdir / "logs").glob("events.out.tfevents.*"))
    assert (workdir / "samples" / f"step_{final_step}.png").stat().st_size > 0
    saved = ExperimentConfiguration.load(workdir / "config.yaml")
    assert saved == ExperimentConfiguration.load(
        default_config_path(), ["training.num_epochs=4", f"compilation.cache_dir={cache}"]
    )
    for name in ("checkpoints", "metrics.jsonl", f"step_{final_step}.png", "config.yaml"):
        assert name in result.stdout
    assert any(cache.iterdir())  # compiled programs were cached for the next start
    assert "First step done" in result.stderr

    again = run_cli("--workdir", str(workdir), "training.num_epochs=5")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"Resumed from {workdir / 'checkpoints'}/{final_step}" in again.stderr
    assert (workdir / "checkpoints" / str(5 * (1000 // 128))).is_dir()


@pytest.mark.slow
def test_configuration_error_exits_2_with_one_message_and_no_traceback(tmp_path):
    result = run_cli("--workdir", str(tmp_path), "training.optimizer.learning_rat=0.1")
    assert result.returncode == 2
    assert "learning_rat" in result.stderr and "did you mean 'learning_rate'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("training.batch_size=0", "batch_size"),
        ("training.optimizer.learning_rate=-1", "learning_rate"),
        ("model.model_class=vea", "did you mean 'vae'"),
        ("mesh.fsdp=3", "Cannot fill mesh.data"),
        ("training.scheduler={scheduler_type: multistep, milestones: [5, 3]}", "strictly increasing"),
        ("training.batch_size=100", "not divisible by the data-parallel size 8"),
    ],
)
def test_user_errors_return_2_with_a_clear_message(override, expected, tmp_path, capsys):
    code = main(["--workdir", str(tmp_path), override])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err
    assert "Traceback" not in err


def test_missing_config_file(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "Config file not found" in capsys.readouterr().err


def test_print_config_applies_overrides(capsys):
    assert main(["--print-config", "training.optimizer.learning_rate=3e-4", "model.hidden_dims=[32,16]"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["training"]["optimizer"]["learning_rate"] == 3e-4
    assert printed["model"]["hidden_dims"] == [32, 16]
    assert ExperimentConfiguration.model_validate(printed).training.optimizer.learning_rate == 3e-4


def test_resume_false_refuses_to_overwrite_existing_checkpoints(tmp_path, capsys):
    workdir = tmp_path / "run"
    quick = ["training.scheduler=null", "training.cadence.num_samples=0"]
    assert main(["--workdir", str(workdir), "training.length.max_steps=2", *quick]) == 0
    capsys.readouterr()
    assert main(["--workdir", str(workdir), "training.length.max_steps=4", "training.checkpoint.resume=false", *quick]) == 2
    err = capsys.readouterr().err
    assert "refusing to overwrite" in err and "training.checkpoint.resume=false" in err
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [2]


QUICK = ["training.scheduler=null", "training.cadence.num_samples=0", "training.cadence.save_every=2"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A finished 4-step run of the default model with checkpoints at steps 2 and 4."""
    workdir = tmp_path_factory.mktemp("small") / "run"
    assert main(["--workdir", str(workdir), "training.length.max_steps=4", *QUICK]) == 0
    return workdir


def test_missing_restore_path_is_a_clear_error(tmp_path, capsys):
    assert main(["--workdir", str(tmp_path / "w"), "--restore", str(tmp_path / "nope"), *QUICK]) == 1
    err = capsys.readouterr().err
    assert "No checkpoint at" in err and "Traceback" not in err


def test_checkpoint_of_another_model_names_the_parameter(small_run, tmp_path, capsys):
    code = main(["--workdir", str(tmp_path / "w"), "--restore", str(small_run / "checkpoints" / "4"),
                 "model.hidden_dims=[256,64]", *QUICK])
    err = capsys.readouterr().err
    assert code == 1
    assert "encoder/1/kernel: checkpoint has shape (256, 128), the model expects (256, 64)" in err
    assert "Traceback" not in err


def test_dataset_not_prepared_says_how_to_prepare_it(tmp_path, capsys):
    code = main(["--workdir", str(tmp_path / "w"), "data.source=tfds:mnist", f"data.data_dir={tmp_path / 'data'}", *QUICK])
    err = capsys.readouterr().err
    assert code == 2
    assert "tfds build mnist --file_format=array_record" in err and "Traceback" not in err


def test_nan_loss_stops_with_exit_3_and_keeps_the_last_good_checkpoint(small_run, tmp_path, capsys):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(small_run, workdir)
    before = {p.name: p.stat().st_mtime_ns for p in (workdir / "checkpoints").iterdir()}
    code = main(["--workdir", str(workdir), "training.length.max_steps=8", "training.optimizer.learning_rate=1e8",
                 "training.cadence.log_every=1", *QUICK])
    err = capsys.readouterr().err
    assert code == 3, err[-2000:]
    assert "Non-finite" in err and "at step" in err and "Traceback" not in err
    after = {p.name: p.stat().st_mtime_ns for p in (workdir / "checkpoints").iterdir()}
    assert after == before  # nothing written over, nothing added


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["--debug", "--workdir", str(tmp_path), "training.batch_size=0"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "batch_size" in err


@pytest.mark.slow  # matplotlib's first use builds its font cache with fc-list (a process)
def test_plot_schedule_writes_the_learning_rate_curve(tmp_path, capsys):
    out = tmp_path / "lr.png"
    assert main(["--plot-schedule", str(out), "training.num_epochs=10"]) == 0
    assert "over 70 steps" in capsys.readouterr().out
    from PIL import Image

    assert Image.open(out).format == "PNG"


def test_dry_run_reports_and_writes_nothing(tmp_path, capsys):
    workdir = tmp_path / "w"
    assert main(["--dry-run", "--workdir", str(workdir), "mesh.data=2", "mesh.fsdp=4"]) == 0
    out = capsys.readouterr().out
    assert "parameters           105,312" in out
    assert "FLOPs per step" in out and "state per device" in out and "batch per device" in out
    assert "{'data': 2, 'fsdp': 4, 'tensor': 1}" in out
    assert not workdir.exists()
