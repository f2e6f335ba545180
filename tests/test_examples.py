"""The original design's complete example runs unchanged (but for import paths) and learns."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs a script in a fresh Python process

REPO = Path(__file__).resolve().parents[1]


def test_seed_complete_example_trains_saves_and_samples(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "seed_complete_example.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    val = [float(v) for v in re.findall(r"Val Loss = ([\d.]+)", result.stdout)]
    assert len(val) == 100
    assert val[-1] < 0.5 * val[0]
    best = tmp_path / "checkpoints" / "vae" / "best_model.pkl"
    assert (best / "state").is_dir() and (best / "metadata").is_dir()
    assert (tmp_path / "experiments" / "vae" / "logs" / "metrics.jsonl").is_file()
