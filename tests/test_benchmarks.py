"""The benchmarks that CI runs as smoke checks: they must run and print their ratios."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs a script in a fresh Python process

REPO = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, *args: str) -> str:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("JAX_", "XLA_"))}
    result = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env,
                            cwd=REPO / "benchmarks", timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def test_mfu_benchmark_smoke_prints_both_loops_and_their_ratio():
    out = run_benchmark("mfu.py", "--size", "tiny", "--repeats", "2")
    for loop in ("trainer", "bare"):
        assert re.search(rf"{loop}: step +[\d.]+ ms \| +[\d.]+ images/s \| +[\d.]+ TFLOP/s", out), out
    ratio = float(re.search(r"Trainer / bare \(speed\) = ([\d.]+)", out).group(1))
    assert 0.2 < ratio < 5, out  # a smoke check: both loops ran the same work


def test_sampling_benchmark_smoke_prints_both_samplers_and_their_ratio():
    out = run_benchmark("sampling.py", "--devices", "8", "--samples", "32", "--steps", "2", "--repeats", "2")
    for name in ("trainer", "bare"):
        assert re.search(rf"{name} +[\d.]+ ms per call \| +[\d.]+ images/s", out), out
    assert "heun 2 steps (4 NFE, guided)" in out
    ratio = float(re.search(r"Trainer / bare \(images/s\) = ([\d.]+)", out).group(1))
    assert 0.2 < ratio < 5, out  # a smoke check: both drew the same samples' worth of work


def test_faults_benchmark_smoke_three_trials_all_bit_identical(tmp_path):
    out = run_benchmark("faults.py", "--trials", "3", "--storage", "local", "--options", "plain", "--root", str(tmp_path))
    trials = re.findall(r"^trial +\d+: (TERM|INT|KILL) .* -> resumed in +[\d.]+ s, (bit-identical|DIFFERENT)$", out, re.M)
    assert len(trials) == 3, out
    assert "3 of 3 trials bit-identical" in out, out


def test_fid_benchmark_smoke_prints_both_paths_and_their_ratio():
    out = run_benchmark("fid.py", "--devices", "8", "--batch", "8", "--batches", "1", "--repeats", "1")
    assert re.search(r"hook +[\d.]+ images/s +bare +[\d.]+ images/s +ratio [\d.]+", out), out
    ratio = float(re.search(r"hook / bare ([\d.]+)", out).group(1))
    assert 0.2 < ratio < 5, out
