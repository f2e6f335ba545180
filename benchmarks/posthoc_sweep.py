"""Post-hoc EMA sweep: sample FD against the EMA width ``sigma_rel``, beside the training EMA's FD.

Trains ``--config`` with two tracked power-function EMAs (EDM2's 0.05 and 0.10) and snapshots
every ``--snapshot-every`` steps, reconstructs each ``--sigma-rel`` with ``workshop-train
--posthoc-ema``, then scores 1,000 class-conditional samples of every reconstruction, of the
training EMA (``training.ema``) and of the raw params, as ``digits_quality.py`` does.

    python benchmarks/posthoc_sweep.py --config configs/flow_dit_digits.yaml --workdir runs/posthoc
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/flow_dit_digits.yaml")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--sigma-rel", default="0.02,0.035,0.05,0.075,0.1,0.15,0.2")
    parser.add_argument("--snapshot-every", type=int, default=100)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--skip-training", action="store_true", help="reuse the run already in --workdir")
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from digits_quality import load, train

    from workshop_dist import cli, quality

    workdir = Path(args.workdir)
    tracked = f"training.ema.posthoc={{sigma_rels: [0.05, 0.1], snapshot_every: {args.snapshot_every}}}"
    seconds = 0.0 if args.skip_training else train(ROOT / args.config, workdir, [tracked], workdir.parent / f"{workdir.name}.log")
    assert cli.main(["--posthoc-ema", str(workdir), "--sigma-rel", args.sigma_rel, "--quiet"]) == 0
    trainer, config = load(workdir)
    labels = np.repeat(np.arange(10), args.samples // 10)

    def score() -> dict:
        images = trainer.generate_samples(len(labels), seed=0, labels=labels)
        return quality.sample_quality(quality.to_levels(images, config.data.normalize), labels)

    floor = quality.floor()
    rows = [("training EMA" if trainer.state.ema_params is not None else "params", score())]
    state = trainer.state
    trainer.state = state.replace(ema_params=state.params) if state.ema_params is not None else state
    rows.append(("raw params", score()))
    for width in args.sigma_rel.split(","):
        trainer.load_checkpoint(workdir / "posthoc_ema" / f"sigma_rel_{float(width):g}")
        rows.append((f"post-hoc sigma_rel {float(width):g}", score()))
    trainer.close()
    print(f"{args.config}: {trainer.step} steps in {seconds:.0f} s; FD floor {floor:.1f}")
    print("| average | FD | FD / floor | class accuracy |\n|---|---|---|---|")
    for name, scores in rows:
        print(f"| {name} | {scores['fd']:.1f} | {scores['fd'] / floor:.2f} | {scores['accuracy']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
