"""Preemption-safe, bit-identical resume, exercised with the real CLI in subprocesses.

A run interrupted by SIGTERM (it saves and exits 75) or killed by SIGKILL (at any moment,
also during an async save) and then started again with the same command must end with
exactly the same checkpoint, array for array, as a run that was never interrupted.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import STEPS_PER_EPOCH, StreamedProcess, checkpoint_arrays, resume_run_settings
from workshop_dist.training.preemption import EXIT_PREEMPTED

pytestmark = pytest.mark.slow  # every test here starts processes or trains a whole family

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 6
FINAL = EPOCHS * STEPS_PER_EPOCH
RUN = resume_run_settings(EPOCHS)


def Run(workdir: Path, *extra: str) -> StreamedProcess:
    """``workshop-train`` on ``workdir`` with the test's settings, in a subprocess."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    command = [sys.executable, "-m", "workshop_dist.cli", "--workdir", str(workdir), *RUN, *extra]
    return StreamedProcess(command, env=env, cwd=REPO)


def steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def read_checkpoint(step_dir: Path) -> dict[str, np.ndarray]:
    """Every array of a checkpoint's training state, by path, plus the data position."""
    flat = checkpoint_arrays(step_dir)
    flat["data"] = np.frombuffer(json.dumps(read_data_position(step_dir)).encode(), np.uint8)
    return flat


def read_data_position(step_dir: Path) -> dict:
    return json.loads((step_dir / "data" / "process_0-of-1.json").read_text())


def assert_identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, np.ndarray]:
    workdir = tmp_path_factory.mktemp("reference")
    run = Run(workdir)
    assert run.finish() == 0, run.output[-3000:]
    assert steps(workdir)[-1] == FINAL
    return read_checkpoint(workdir / "checkpoints" / str(FINAL))


def test_sigterm_saves_exits_75_and_resumes_bit_identically(tmp_path, reference):
    workdir = tmp_path / "run"
    stops = []
    for stop_at, signals in ((6, 2), (19, 1)):  # the first stop also gets a second SIGTERM mid-save
        run = Run(workdir)
        run.wait_for(f"train step {stop_at}:")
        for _ in range(signals):
            run.proc.send_signal(signal.SIGTERM)
            time.sleep(0.05)
        assert run.finish() == EXIT_PREEMPTED, run.output[-3000:]
        assert "Run the same command again to resume" in run.output
        stops.append(steps(workdir)[-1])
        assert stop_at <= stops[-1] < FINAL
    run = Run(workdir)
    assert run.finish() == 0, run.output[-3000:]
    assert f"Resumed from {workdir / 'checkpoints'}/{stops[-1]}" in run.output
    assert_identical(read_checkpoint(workdir / "checkpoints" / str(FINAL)), reference)


def test_sigkill_at_any_moment_even_mid_save_resumes_bit_identically(tmp_path, reference):
    workdir = tmp_path / "run"
    ckpts = workdir / "checkpoints"
    run = Run(workdir)  # 1: killed while an async save is being written (not the first one)
    run.wait_for("train step 3:")
    deadline = time.monotonic() + 120
    while not steps(workdir) or not any(".orbax-checkpoint-tmp" in p.name for p in ckpts.iterdir()):
        assert run.proc.poll() is None and time.monotonic() < deadline, run.output[-3000:]
        time.sleep(0.001)
    run.proc.kill()
    run.finish()
    killed_mid_save = [p.name for p in ckpts.iterdir() if ".orbax-checkpoint-tmp" in p.name]
    assert killed_mid_save, "the kill should have left an incomplete save behind"

    run = Run(workdir)  # 2: killed between checkpoints
    run.wait_for("Resumed from")
    run.wait_for("train step 22:")
    run.proc.kill()
    run.finish()
    last_complete = steps(workdir)[-1]
    assert last_complete < FINAL

    run = Run(workdir)  # 3: to the end
    assert run.finish() == 0, run.output[-3000:]
    assert f"Resumed from {ckpts}/{last_complete}" in run.output
    assert not [p for p in ckpts.iterdir() if ".orbax-checkpoint-tmp" in p.name]  # cleaned up
    assert_identical(read_checkpoint(ckpts / str(FINAL)), reference)


ENGINE_OPTIONS = {
    "ema_accum_bf16_fast": [
        "training.ema.decay=0.99",
        "training.performance.grad_accum_steps=2",
        "model.dtype=bfloat16",
        "training.performance.steps_per_call=3",
        "training.performance.data_on_device=true",
    ],
    "two_optimizers": [
        "model.model_class=tests.engine_models.TwoGroupModel",
        "training.optimizer.gradient_clip_norm=null",
        "training.optimizers={generator: {learning_rate: 0.01}, discriminator: {optimizer_type: sgd, learning_rate: 0.02}}",
        "training.ema.decay=0.9",
    ],
}


@pytest.mark.parametrize("options", list(ENGINE_OPTIONS), ids=list(ENGINE_OPTIONS))
def test_sigterm_resume_is_bit_identical_with_engine_options(tmp_path, options):
    extra = ENGINE_OPTIONS[options]
    full = tmp_path / "full"
    run = Run(full, *extra)
    assert run.finish() == 0, run.output[-3000:]
    workdir = tmp_path / "run"
    run = Run(workdir, *extra)
    run.wait_for("train step 9:")
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == EXIT_PREEMPTED, run.output[-3000:]
    stopped = steps(workdir)[-1]
    assert stopped < FINAL
    run = Run(workdir, *extra)
    assert run.finish() == 0, run.output[-3000:]
    assert f"Resumed from {workdir / 'checkpoints'}/{stopped}" in run.output
    resumed = checkpoint_arrays(workdir / "checkpoints" / str(FINAL))
    if options != "two_optimizers":
        assert any("ema_params" in name for name in resumed)
    assert_identical(resumed, checkpoint_arrays(full / "checkpoints" / str(FINAL)))
