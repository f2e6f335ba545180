"""Restart-to-first-step time of ``workshop-train`` with and without JAX's compilation cache.

A run of the default config writes a checkpoint; then the same command is restarted several
times (each resumes and trains a few more steps), alternating a warm persistent compilation
cache with no cache. Measured: seconds from launching the process to its "First step done"
log line (imports, distributed init, data, model, restore, compilation, one step).

    python benchmarks/restart.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time


def run(workdir: str, max_steps: int, cache: str | None) -> float:
    """Seconds from launch to the first completed step (the process then finishes its run)."""
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    command = [
        sys.executable, "-m", "workshop_dist.cli", "--workdir", workdir, f"training.length.max_steps={max_steps}",
        f"compilation.cache_dir={cache or 'null'}", "training.cadence.num_samples=0",
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    first = None
    for line in proc.stdout:
        if first is None and "First step done" in line:
            first = time.perf_counter() - start
    if proc.wait() != 0 or first is None:
        raise SystemExit(f"run failed: {' '.join(command)}")
    return first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="restart_bench_")
    cache = tempfile.mkdtemp(prefix="restart_bench_cache_")
    steps = 28
    cold = run(workdir, steps, cache)  # fills the cache, leaves a checkpoint
    times: dict[str, list[float]] = {"warm cache": [], "no cache": []}
    for _ in range(args.repeats):
        for label in times:
            steps += 7
            times[label].append(run(workdir, steps, cache if label == "warm cache" else None))
    print(f"first run (empty cache): {cold:.1f} s to the first step")
    for label, values in times.items():
        print(f"restart, {label:>10}: {statistics.median(values):.1f} s to the first step (median of {len(values)})")
    saved = statistics.median(times["no cache"]) - statistics.median(times["warm cache"])
    print(f"the cache saves {saved:.1f} s per restart")


if __name__ == "__main__":
    main()
