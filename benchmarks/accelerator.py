"""The accelerator figures in one command: MFU, sampling speed and step overhead on the real devices.

Runs, each in its own process on the machine's devices (``--devices 0``):

- ``mfu.py --size h100``: a flow-matching DiT-L/2 (~460M parameters, 32x32x4 latents, batch 256,
  bf16 compute) trained by the Trainer and by a bare jitted loop: step time, TFLOP/s, MFU, ratio;
- ``sampling.py --size large``: 256 guided Heun samples (8 steps) from a DiT-B/2-sized flow model,
  Trainer against a bare jitted sampler: images/s and ratio;
- ``step_overhead.py --models default,large``: the Trainer's per-step overhead against a bare loop;

then prints one table with the device, the versions and each figure. About 5 minutes on one
H100/H200 (compilation included); ``--quick`` shrinks every run for a smoke check on a CPU.

    python benchmarks/accelerator.py             # on a GPU or TPU host
    python benchmarks/accelerator.py --quick     # anywhere: the same scripts, tiny sizes
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FULL = {
    "mfu": ["mfu.py", "--size", "h100", "--devices", "0", "--repeats", "3"],
    "sampling": ["sampling.py", "--size", "large", "--devices", "0", "--samples", "256", "--repeats", "5"],
    "step overhead": ["step_overhead.py", "--devices", "0", "--models", "default,large", "--repeats", "3"],
}
QUICK = {
    "mfu": ["mfu.py", "--size", "tiny", "--devices", "1", "--repeats", "2"],
    "sampling": ["sampling.py", "--size", "digits", "--devices", "1", "--samples", "32", "--steps", "2", "--repeats", "2"],
    "step overhead": ["step_overhead.py", "--devices", "1", "--models", "tiny", "--steps", "20", "--repeats", "2"],
}
# the lines of each script's output that go in the table
KEEP = re.compile(r"(device|x |Trainer / bare|trainer|bare|images/s|MFU|ratio|a/b)", re.IGNORECASE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes on one device: a smoke check")
    args = parser.parse_args(argv)
    import jax

    runs = QUICK if args.quick else FULL
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} | jax {jax.__version__} | "
          f"python {sys.version.split()[0]}", flush=True)
    failed = []
    for name, command in runs.items():
        start = time.perf_counter()
        result = subprocess.run([sys.executable, *command], cwd=HERE, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        print(f"\n## {name}: {' '.join(command)} ({seconds:.0f} s, exit {result.returncode})")
        lines = [line for line in result.stdout.splitlines() if KEEP.search(line)]
        print("\n".join(lines) if lines else result.stdout[-2000:])
        if result.returncode != 0:
            failed.append(name)
            print(result.stderr[-3000:])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
