"""Goodput under preemption: a job on a `gs://` workdir (a Cloud Storage emulator on 127.0.0.1)
killed at random intervals, with and without the local checkpoint tier.

The job saves to the workdir every ``--save-every`` steps (rare: bucket saves are slow); with the
local tier it also saves to this machine's disk every ``--local-every`` steps. Both variants are
killed (SIGKILL: a preemption without grace) after the same random numbers of new training steps
and started again until they finish. It prints the steps run and redone (from the processes'
output), the wall time, and the restarts the run report says used the local tier; target: the
local tier cuts the steps redone at least 3x.

    python benchmarks/goodput.py [--steps 84] [--kills 6] [--save-every 21] [--local-every 3]
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import workshop_dist  # noqa: E402, F401 -- first: an idle libtpu stays silent (workshop_dist.backends)
from tests.helpers import StreamedProcess  # noqa: E402 -- after the path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=84)
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--save-every", type=int, default=21)
    parser.add_argument("--local-every", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", help="Local directories (default: a temporary one).")
    return parser.parse_args()


def launch(workdir: str, extra: list[str], env: dict[str, str]) -> StreamedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **env}
    env.pop("XLA_FLAGS", None)
    command = [sys.executable, "-m", "workshop_dist.cli", "--workdir", workdir, *extra]
    return StreamedProcess(command, env=env, cwd=REPO)


def trained_steps(run: StreamedProcess) -> list[int]:
    return [int(line.split(" train step ")[1].split(":")[0]) for line in list(run.lines) if " train step " in line]


def resumed_from(run: StreamedProcess) -> int:
    line = next((line for line in run.lines if "Resumed from " in line), None)
    return int(line.rsplit("(step ", 1)[1].split(")")[0]) if line else 0


def run_job(workdir: str, extra: list[str], env: dict[str, str], kills: list[int]) -> dict[str, float]:
    """Start, kill after ``kills[i]`` new training steps, start again... to the end.

    Steps redone are counted from the processes' own output (the last step a killed process
    logged, less the step the next one resumed from): a SIGKILLed process's run log may not have
    reached the bucket (its logs are uploaded every 30 s), so the run report undercounts them."""
    start, processes, done = time.monotonic(), [], 0
    for after in kills:
        run = launch(workdir, extra, env)
        while run.proc.poll() is None and len(trained_steps(run)) < after:
            time.sleep(0.01)
        finished = run.proc.poll() is not None
        if not finished:
            run.proc.kill()
            done += 1
        run.finish()
        processes.append(run)
        if finished:
            break
    else:
        run = launch(workdir, extra, env)
        assert run.finish() == 0, run.output[-3000:]
        processes.append(run)
    redone = sum(max((trained_steps(killed) or [0])[-1] - resumed_from(next_run), 0)
                 for killed, next_run in itertools.pairwise(processes))
    executed = sum(len(trained_steps(run)) for run in processes)
    return {"kills": done, "redone": redone, "executed": executed, "seconds": time.monotonic() - start}


def main() -> None:
    args = parse_args()
    from tests.gcs_emulator import BUCKET, Emulator

    root = Path(args.root or tempfile.mkdtemp(prefix="workshop_goodput_"))
    root.mkdir(parents=True, exist_ok=True)
    emulator = Emulator(root / "fake-gcs-server.log")
    os.environ.update(emulator.env)
    from workshop_dist.report import compute_report

    rng = random.Random(args.seed)
    kills = [rng.randint(5, 15) for _ in range(args.kills)]
    common = [f"training.length.max_steps={args.steps}", f"training.cadence.save_every={args.save_every}",
              "training.cadence.log_every=1", "training.cadence.eval_every=null", "training.cadence.num_samples=0",
              "training.scheduler.warmup_steps=5", "eval.fid_every=null"]
    local = [f"training.checkpoint.local={{directory: {root / 'local'}, every: {args.local_every}, max_to_keep: 2}}"]
    print(f"{args.steps} steps, workdir saves every {args.save_every}, kills after {kills} new steps")
    print("| variant | kills | steps run | steps redone | wall time | restarts from the local tier |")
    print("|---|---|---|---|---|---|")
    redone = {}
    try:
        for name, extra in (("workdir only", common), ("with the local tier", common + local)):
            workdir = f"gs://{BUCKET}/goodput/{name.replace(' ', '_')}"
            job = run_job(workdir, extra, emulator.env, kills)
            redone[name] = job["redone"]
            local_restarts = sum(restart.tier == "local" for restart in compute_report(workdir).restarts)
            print(f"| {name} | {job['kills']} | {job['executed']} | {job['redone']} | {job['seconds']:.0f} s | "
                  f"{local_restarts} |", flush=True)
    finally:
        emulator.stop()
    ratio = redone["workdir only"] / max(redone["with the local tier"], 1)
    print(f"steps redone: {ratio:.1f}x fewer with the local tier (target >= 3x)")


if __name__ == "__main__":
    main()
