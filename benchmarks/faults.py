"""Fault injection: random interruptions of `workshop-train`, each resumed and compared with a run
that was never interrupted, array by array.

Each trial draws a signal (TERM, INT, KILL), a moment (a random step, right as an async save
starts, during an evaluation, during sampling), a storage (the local disk, or a `gs://` workdir on
a Cloud Storage emulator on 127.0.0.1) and options (plain, EMA, gradient accumulation, two
optimizers), interrupts a run there, starts the same command again until it finishes, and
compares every array of the final checkpoint (and the data position) with the uninterrupted run
of the same options. It prints each trial, how many were bit-identical, and the worst restart
time (from the new process's start to its first training step).

    python benchmarks/faults.py                    # 20 trials, local disk and the emulator
    python benchmarks/faults.py --trials 3 --storage local      # the CI smoke
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import workshop_dist  # noqa: E402, F401 -- first: an idle libtpu stays silent (workshop_dist.backends)
from tests.helpers import StreamedProcess, checkpoint_arrays  # noqa: E402 -- after the path

STEPS = 28  # 4 epochs of the digits at 128
RUN = [f"training.length.max_steps={STEPS}", "training.cadence.save_every=4",
       "training.cadence.log_every=1", "training.cadence.eval_every=7", "training.cadence.num_samples=4",
       "training.checkpoint.max_to_keep=3", "training.scheduler.warmup_steps=5", "eval.fid_every=null"]
OPTIONS = {
    "plain": [],
    "ema": ["training.ema.decay=0.99"],
    "accumulation": ["training.performance.grad_accum_steps=2"],
    "two_optimizers": [
        "model.model_class=tests.engine_models.TwoGroupModel", "training.optimizer.gradient_clip_norm=null",
        "training.optimizers={generator: {learning_rate: 0.01}, discriminator: {optimizer_type: sgd, learning_rate: 0.02}}",
    ],
}
SIGNALS = {"TERM": signal.SIGTERM, "INT": signal.SIGINT, "KILL": signal.SIGKILL}
MOMENTS = ("step", "save", "eval", "sample")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--storage", default="local,gs", help="Comma-separated: local, gs (the emulator).")
    parser.add_argument("--options", default=",".join(OPTIONS), help=f"Comma-separated, from {', '.join(OPTIONS)}.")
    parser.add_argument("--root", help="Where the runs go (default: a temporary directory).")
    return parser.parse_args()


def launch(workdir: str, extra: list[str], env: dict[str, str]) -> StreamedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **env}
    env.pop("XLA_FLAGS", None)
    command = [sys.executable, "-m", "workshop_dist.cli", "--workdir", workdir, *RUN, *extra]
    return StreamedProcess(command, env=env, cwd=REPO)


def final_arrays(workdir: str) -> dict[str, np.ndarray]:
    from etils import epath

    step_dir = epath.Path(workdir) / "checkpoints" / str(STEPS)
    arrays = checkpoint_arrays(step_dir)
    position = json.loads((step_dir / "data" / "process_0-of-1.json").read_text())
    arrays["data"] = np.frombuffer(json.dumps(position).encode(), np.uint8)
    return arrays


def interrupt(run: StreamedProcess, moment: str, rng: random.Random, signal_number: int) -> str:
    """Send ``signal_number`` at ``moment``; returns where it was sent."""
    if moment == "step":
        step = rng.randint(3, STEPS - 3)
        run.wait_for(f"train step {step}:")
        where = f"after step {step}"
    elif moment == "save":  # the checkpoint hook starts the async save right after the step's log line
        step = rng.choice([4, 8, 12, 16, 20])
        run.wait_for(f"train step {step}:")
        where = f"as the save of step {step} starts"
    elif moment == "eval":  # the evaluation runs right after the step's log line
        step = rng.choice([7, 14, 21])
        run.wait_for(f"train step {step}:")
        where = f"in the evaluation at step {step}"
    else:  # the sample grid follows the evaluation's log line
        step = rng.choice([7, 14, 21])
        run.wait_for(f"val step {step}:")
        where = f"in the sampling at step {step}"
    time.sleep(rng.uniform(0.0, 0.05))
    run.proc.send_signal(signal_number)
    return where


def resume(workdir: str, extra: list[str], env: dict[str, str]) -> tuple[int, float, str]:
    """Run again until it finishes; (exit code, seconds to the first training step, output)."""
    start = time.monotonic()
    run = launch(workdir, extra, env)
    first_step = None
    while run.proc.poll() is None and first_step is None:
        if any(line.startswith("train step") or " train step " in line for line in list(run.lines)):
            first_step = time.monotonic() - start
        time.sleep(0.01)
    code = run.finish()
    return code, first_step if first_step is not None else time.monotonic() - start, run.output


def main() -> None:
    args = parse_args()
    storages, options = args.storage.split(","), args.options.split(",")
    root = Path(args.root or tempfile.mkdtemp(prefix="workshop_faults_"))
    root.mkdir(parents=True, exist_ok=True)
    env: dict[str, str] = {}
    emulator = None
    if "gs" in storages:
        from tests.gcs_emulator import BUCKET, Emulator

        emulator = Emulator(root / "fake-gcs-server.log")
        env = emulator.env
        os.environ.update(env)  # this process reads the final checkpoints from the emulator too
    rng = random.Random(args.seed)
    references: dict[str, dict[str, np.ndarray]] = {}
    rows, worst = [], 0.0
    try:
        for trial in range(args.trials):
            name, storage = rng.choice(options), rng.choice(storages)
            signal_name, moment = rng.choice(list(SIGNALS)), rng.choice(MOMENTS)
            extra = OPTIONS[name]
            if name not in references:  # the uninterrupted run of these options, on the local disk
                reference = launch(str(root / f"reference_{name}"), extra, {})
                assert reference.finish() == 0, reference.output[-3000:]
                references[name] = final_arrays(str(root / f"reference_{name}"))
            workdir = f"gs://{BUCKET}/faults/trial{trial}" if storage == "gs" else str(root / f"trial{trial}")
            run = launch(workdir, extra, env)
            where = interrupt(run, moment, rng, SIGNALS[signal_name])
            stopped = run.finish()
            code, restart, output = resume(workdir, extra, env)
            if code != 0:
                raise SystemExit(f"trial {trial}: the resumed run exited {code}:\n{output[-3000:]}")
            got = final_arrays(workdir)
            identical = got.keys() == references[name].keys() and all(
                np.array_equal(got[key], references[name][key]) for key in got
            )
            worst = max(worst, restart)
            rows.append(identical)
            print(f"trial {trial:2d}: {signal_name:4s} {where:32s} {storage:5s} {name:14s} exit {stopped:4d} -> "
                  f"resumed in {restart:5.1f} s, {'bit-identical' if identical else 'DIFFERENT'}", flush=True)
    finally:
        if emulator is not None:
            emulator.stop()
    print(f"{sum(rows)} of {len(rows)} trials bit-identical; worst restart {worst:.1f} s (process start to first step)")
    if not all(rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
