"""Multi-host training with real processes on 127.0.0.1 (CPU collectives), via ``workshop-launch``.

2 processes x 4 simulated devices against 1 process x 8: same result (floating-point
tolerance: the cross-process all-reduce sums in another order), checkpoints that move
between topologies, preemption of the whole job, and the death of one process.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import StreamedProcess, checkpoint_arrays
from workshop_dist.training.preemption import EXIT_PREEMPTED

pytestmark = pytest.mark.slow  # every test here starts processes or trains a whole family

REPO = Path(__file__).resolve().parents[1]
STEPS = 14  # two epochs of 7 steps (1000 digits, batch 128)
RUN = ["training.length.max_steps=14", "training.cadence.save_every=7", "training.cadence.log_every=1", "training.cadence.num_samples=0",
       "training.scheduler.warmup_steps=3"]
# The same computation, partitioned over processes: all-reduces sum in a different order.
RTOL, ATOL = 1e-4, 1e-6


class Launch(StreamedProcess):
    """``workshop-launch local`` in a subprocess, its prefixed output collected line by line."""

    def __init__(self, processes: int, devices: int, workdir: Path, *extra: str):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
        command = [
            sys.executable, "-m", "workshop_dist.launcher", "local", "--processes", str(processes),
            "--devices-per-process", str(devices), "--grace-seconds", "20", "--", "--workdir", str(workdir), *RUN, *extra,
        ]
        super().__init__(command, env=env, cwd=REPO)

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(pid) for pid in path.read_text().split()]


def steps(workdir: Path) -> list[int]:
    root = workdir / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []


def assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.fixture(scope="module")
def two_by_four(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("2x4")
    run = Launch(2, 4, workdir)
    assert run.finish() == 0, run.output[-4000:]
    assert "process 0/2 | devices: 4 local, 8 global" in run.output  # the topology line
    assert steps(workdir) == [7, 14]
    for step in (7, 14):  # each process wrote its own data position
        assert {p.name for p in (workdir / "checkpoints" / str(step) / "data").glob("*.json")} == {
            "process_0-of-2.json", "process_1-of-2.json"}
    return workdir


def test_two_processes_match_one_process_with_eight_devices(two_by_four, tmp_path):
    run = Launch(1, 8, tmp_path)
    assert run.finish() == 0, run.output[-4000:]
    assert_close(checkpoint_arrays(tmp_path / "checkpoints" / str(STEPS)), checkpoint_arrays(two_by_four / "checkpoints" / str(STEPS)))
    # The FID hook at the end (the digits classifier's val/fd): samples, features and their sums on
    # both topologies, reduced across the two processes: the same score.
    one, two = (final_scores(workdir) for workdir in (tmp_path, two_by_four))
    assert list(one) == list(two) == [STEPS]
    np.testing.assert_allclose(two[STEPS], one[STEPS], rtol=1e-4)


def final_scores(workdir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["val/fd"] for row in rows if "val/fd" in row}


def test_two_processes_match_one_process_with_engine_options_on(tmp_path):
    """EMA, accumulation, several steps per call and data on the device: 2 x 4 == 1 x 8.

    (bf16 compute is left out: it would round the all-reduce's order differences up to bf16's
    precision; its resume is tested bit-identically in test_resume.)"""
    options = ["training.ema.decay=0.9", "training.performance.grad_accum_steps=2", "training.performance.steps_per_call=3",
               "training.performance.data_on_device=true", "mesh.data=4", "mesh.fsdp=2"]
    runs = {}
    for processes, devices in ((2, 4), (1, 8)):
        workdir = tmp_path / f"{processes}x{devices}"
        run = Launch(processes, devices, workdir, *options)
        assert run.finish() == 0, run.output[-4000:]
        runs[processes] = checkpoint_arrays(workdir / "checkpoints" / str(STEPS))
    assert any("ema_params" in name for name in runs[1])
    assert_close(runs[1], runs[2])


def test_tensor_parallel_dit_on_two_processes_matches_one_process(tmp_path):
    """A DiT with attention heads and MLP split over tensor=2 (fsdp=2, data=2): 2 x 4 == 1 x 8."""
    options = ["model.model_class=dit", "data.normalize=levels", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
               "model.parameters={hidden_size: 32, depth: 1, num_heads: 2, patch_size: 2, num_classes: 10}",
               "training.length.max_steps=4", "eval.fid_every=null"]  # 1000 DDPM samples: minutes on CPU
    runs = {}
    for processes, devices in ((2, 4), (1, 8)):
        workdir = tmp_path / f"{processes}x{devices}"
        run = Launch(processes, devices, workdir, *options)
        assert run.finish() == 0, run.output[-4000:]
        runs[processes] = checkpoint_arrays(workdir / "checkpoints" / "4")
    assert any("query" in name for name in runs[1])
    assert_close(runs[1], runs[2])


@pytest.mark.parametrize("devices", [8, 1])
def test_a_two_process_checkpoint_continues_on_one_process(two_by_four, tmp_path, devices):
    run = Launch(1, devices, tmp_path, "--restore", str(two_by_four / "checkpoints" / "7"))
    assert run.finish() == 0, run.output[-4000:]
    assert "Started from checkpoint" in run.output
    # Same model and data position: the 7 steps after it match the 2-process run's.
    tolerance = {} if devices == 8 else {"rtol": 1e-3, "atol": 1e-5}  # one device sums in yet another order
    a, b = checkpoint_arrays(tmp_path / "checkpoints" / str(STEPS)), checkpoint_arrays(two_by_four / "checkpoints" / str(STEPS))
    for name in a:
        np.testing.assert_allclose(a[name], b[name], **{"rtol": RTOL, "atol": ATOL, **tolerance}, err_msg=name)


def test_sigterm_to_the_launcher_saves_the_same_step_everywhere_and_resumes(two_by_four, tmp_path):
    run = Launch(2, 4, tmp_path)
    run.wait_for("train step 4:")
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == EXIT_PREEMPTED, run.output[-4000:]
    saved = steps(tmp_path)[-1]
    assert 4 <= saved < STEPS
    stopped = [line for line in run.lines if "exiting for preemption" in line or "preempted by" in line]
    assert any(line.startswith("[p0]") for line in stopped) and any(line.startswith("[p1]") for line in stopped)
    data = tmp_path / "checkpoints" / str(saved) / "data"
    positions = [json.loads((data / f"process_{i}-of-2.json").read_text()) for i in range(2)]
    assert positions[0] == positions[1]  # both processes stopped after the same batch

    again = Launch(2, 4, tmp_path)
    assert again.finish() == 0, again.output[-4000:]
    assert f"Resumed from {tmp_path / 'checkpoints'}/{saved}" in again.output
    assert_close(checkpoint_arrays(tmp_path / "checkpoints" / str(STEPS)), checkpoint_arrays(two_by_four / "checkpoints" / str(STEPS)))


def test_killing_one_process_stops_the_other_quickly_and_the_job_resumes(tmp_path):
    run = Launch(2, 4, tmp_path)
    run.wait_for("train step 9:")
    children = run.children()
    assert len(children) == 2
    os.kill(children[1], signal.SIGKILL)
    killed_at = time.monotonic()
    code = run.finish(timeout=120)
    assert time.monotonic() - killed_at < 30, run.output[-4000:]
    assert code != 0
    last_complete = steps(tmp_path)[-1]
    assert last_complete == 7

    again = Launch(2, 4, tmp_path)
    assert again.finish() == 0, again.output[-4000:]
    assert f"Resumed from {tmp_path / 'checkpoints'}/{last_complete}" in again.output
    assert steps(tmp_path)[-1] == STEPS


def run_program(name: str, out_dir: Path) -> None:
    """``tests/<name>`` in 2 processes under ``workshop-launch local --program``, given ``out_dir``; it must succeed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    script = f"{sys.executable} {REPO / 'tests' / name}"
    result = subprocess.run(
        [sys.executable, "-m", "workshop_dist.launcher", "local", "--processes", "2", "--program", script,
         "--", str(out_dir)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_real_processes_read_disjoint_parts_that_cover_the_split(tmp_path):
    run_program("multihost_data_ids.py", tmp_path)
    ids = [json.loads((tmp_path / f"ids_{i}_of_2.json").read_text()) for i in range(2)]
    assert len(ids[0]) == len(ids[1]) == 500
    assert not set(ids[0]) & set(ids[1])
    assert set(ids[0]) | set(ids[1]) == set(range(1000))


def test_every_process_trains_the_same_digits_classifier(tmp_path):
    """The FID hook's feature network when it is not cached: each process trains it on a device of its
    own (process 0's first device is not addressable from process 1) and gets the same one."""
    run_program("multihost_classifier.py", tmp_path)
    features = [np.load(tmp_path / f"features_{i}.npy") for i in range(2)]
    assert features[0].shape[0] == 16 and np.isfinite(features[0]).all() and features[0].std() > 0
    np.testing.assert_array_equal(features[0], features[1])


def test_data_axis_over_hosts_with_dcn_data(tmp_path):
    run = Launch(2, 4, tmp_path, "mesh.data=2", "mesh.fsdp=4", "mesh.dcn_data=2", "training.length.max_steps=5")
    assert run.finish() == 0, run.output[-4000:]
    assert "mesh {'data': 2, 'fsdp': 4, 'tensor': 1}" in run.output
    assert steps(tmp_path)[-1] == 5


def test_a_peer_late_to_its_first_computation_is_waited_for(tmp_path):
    """Process 1 starts a cross-process computation 35 s after process 0 (a CPU collective alone gives
    up after 30 s): each new signature is compiled, then met at a barrier, once."""
    run_program("multihost_late_peer.py", tmp_path)
    for i in range(2):
        result = json.loads((tmp_path / f"process_{i}.json").read_text())
        assert result["sums"] == [28.0, 28.0, 15.0]
        assert result["barriers"] == 2  # the signatures (8,) and (6,); the repeated call passed none
