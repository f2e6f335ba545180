"""Sample quality against network evaluations (NFE) and sampling speed, for trained runs.

For each run (a workdir that ``workshop-train`` or ``benchmarks/digits_quality.py --workdir``
wrote) and each ``SAMPLER:STEPS`` it draws ``--samples`` class-conditional digits in one jitted
call sharded over the devices, scores them (FD to the test split and class accuracy, as
``digits_quality.py``) and times the call. Timing is interleaved: every configuration runs once
per round (A B C A B C ...), after a compiling warm-up, and the table gives the median over
rounds and the ratio to the first configuration of the same run, measured in the same rounds.
With ``--figure`` it plots FD against NFE, one line per run and sampler.

    python benchmarks/digits_quality.py --families flow_dit,edm_dit --workdir runs/quality
    python benchmarks/nfe_sweep.py runs/quality/flow_dit runs/quality/edm_dit \\
        --samplers euler:4,8,16,32 heun:2,4,8,16 --figure docs/fd_vs_nfe.png
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_samplers(items: list[str]) -> list[tuple[str, int]]:
    """``["heun:2,4", "euler:8"]`` -> ``[("heun", 2), ("heun", 4), ("euler", 8)]``."""
    out = []
    for item in items:
        name, _, steps = item.partition(":")
        if not name or not steps:
            raise SystemExit(f"--samplers wants SAMPLER:STEPS[,STEPS...], got '{item}'")
        out.extend((name, int(s)) for s in steps.split(","))
    return out


def read_table(text: str) -> tuple[list[dict], float]:
    """The rows and the floor of a table this script printed."""
    floor = float(text.split("FD (floor ")[1].split(")")[0])
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and cells[4].isdigit():
            rows.append({"run": cells[0], "sampler": cells[1], "guidance": cells[3], "nfe": int(cells[4]),
                         "fd": float(cells[5])})
    return rows, floor


def plot(rows: list[dict] | tuple, figure_path: str, floor: float | None = None) -> None:
    """FD against NFE, one line per run, sampler and guidance; log axes, FD clipped at 4x the floor."""
    if isinstance(rows, tuple):
        rows, floor = rows
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for key in dict.fromkeys((r["run"], r["sampler"], r["guidance"]) for r in rows):
        line = [r for r in rows if (r["run"], r["sampler"], r["guidance"]) == key]
        label = f"{key[0]} {key[1]}" + ("" if key[2] == "config" else f" w={key[2]}")
        axes.plot([r["nfe"] for r in line], [r["fd"] for r in line], marker="o", label=label)
    axes.axhline(floor, color="grey", linestyle="--", label="floor (test vs train)")
    axes.set(xscale="log", yscale="log", xlabel="network evaluations per sample", ylabel="FD to the test digits",
             ylim=(0.9 * floor, 4 * floor))
    axes.legend(fontsize=7, ncol=2)
    axes.grid(True, alpha=0.3, which="both")
    figure.savefig(figure_path, dpi=120, bbox_inches="tight")
    print(f"figure: {figure_path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="workdirs of trained runs")
    parser.add_argument("--samplers", nargs="+", default=["euler:4,8,16,32", "heun:2,4,8,16"])
    parser.add_argument("--samples", type=int, default=1000, help="samples per configuration (default 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--guidance", default="", help="comma-separated guidance scales (default: the config's)")
    parser.add_argument("--figure", help="write FD against NFE to this PNG")
    parser.add_argument("--from-table", metavar="TABLE.md", help="only draw --figure from a table this script printed")
    args = parser.parse_args(argv)
    if args.from_table:
        plot(read_table(Path(args.from_table).read_text()), args.figure)
        return 0
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    from digits_quality import load

    from workshop_dist import quality

    scales = [float(g) for g in args.guidance.split(",") if g.strip()] or [None]
    configurations = [(name, steps, g) for name, steps in parse_samplers(args.samplers) for g in scales]
    floor = quality.floor()
    print(f"{jax.device_count()} x {jax.devices()[0].device_kind}; FD floor {floor:.1f}", flush=True)
    rows = []
    for run in map(Path, args.runs):
        trainer, config = load(run, all_devices=True)
        classes = trainer.engine.num_classes or 10
        labels = np.repeat(np.arange(classes), args.samples // classes)
        model = trainer.model
        known = getattr(getattr(model, "objective", None), "samplers", ("ddpm", "ddim"))  # the DDPM/VDM family: its two
        valid = [c for c in configurations if c[0] in known]
        nfe = getattr(model, "network_evaluations", lambda sampler, steps: steps)  # DDPM/DDIM: one per step

        def draw(name: str, steps: int, guidance: float | None, trainer=trainer, labels=labels) -> np.ndarray:
            options = {} if guidance is None else {"guidance_scale": guidance}
            return trainer.generate_samples(len(labels), seed=0, labels=labels, sampler=name, sampling_steps=steps, **options)

        images = {c: draw(*c) for c in valid}  # the warm-up compiles each; its samples are scored
        times: dict[tuple, list[float]] = {c: [] for c in valid}
        for _ in range(args.rounds):
            for c in valid:
                start = time.perf_counter()
                draw(*c)
                times[c].append(time.perf_counter() - start)
        base = valid[0]
        for c in valid:
            scores = quality.sample_quality(quality.to_levels(images[c], config.data.normalize), labels)
            ratio = statistics.median(t / b for t, b in zip(times[c], times[base], strict=True))
            rows.append({
                "run": run.name, "sampler": c[0], "steps": c[1], "nfe": nfe(c[0], c[1]),
                "guidance": "config" if c[2] is None else f"{c[2]:g}",
                "seconds": statistics.median(times[c]), "ratio": ratio, "fd": scores["fd"],
                "accuracy": scores["accuracy"],
            })  # fmt: skip
            row = rows[-1]
            print(f"{run.name} {c[0]}:{c[1]} guidance {row['guidance']} NFE {row['nfe']} FD {row['fd']:.1f} "
                  f"acc {row['accuracy']:.3f} {row['seconds']:.2f} s ({ratio:.2f}x {base[0]}:{base[1]})", flush=True)
        trainer.close()
    print(f"\n| run | sampler | steps | guidance | NFE | FD (floor {floor:.1f}) | FD / floor | class accuracy | "
          f"s / {args.samples} samples | time / first |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['sampler']} | {r['steps']} | {r['guidance']} | {r['nfe']} | {r['fd']:.1f} | "
              f"{r['fd'] / floor:.2f} | {r['accuracy']:.3f} | {r['seconds']:.2f} | {r['ratio']:.2f} |")
    if args.figure:
        plot(rows, args.figure, floor)
    return 0


if __name__ == "__main__":
    sys.exit(main())
