"""Quality of every model family on the digits test split: NLL, sample FD, class accuracy, time.

Each family is trained from its config in ``configs/`` by ``workshop-train`` (a subprocess, so
the run is exactly what a user gets), then its final checkpoint is loaded into a Trainer here
and scored on the 447 test images:

- **NLL**: ``model.nll(batch, rng, **options)`` in nats per image where the model defines it
  (VAE: importance-weighted bound with K samples; flow: dequantisation bound; PixelCNN: exact;
  diffusion: variational bound; flow matching: the probability-flow ODE bound), averaged over
  the test set. GANs and EDM have none.
- **FD**: Frechet distance of 1,000 samples to the test set in the feature space of
  :mod:`workshop_dist.quality`, and the floor FD(test set, train set) for scale.
- **class accuracy** (conditional models, ``num_classes``): 100 samples asked of each class,
  how often the quality classifier agrees (its own accuracy on real test images is 0.96).
- **train time**: wall time of the ``workshop-train`` process (imports, compilation, the
  evaluations and checkpoints it does; on this machine's CPU devices).

It prints one markdown table, writes a sample grid per family to ``docs/samples/<family>.png``
and, with ``--out``, the table to a file:

    python benchmarks/digits_quality.py                      # every family whose config exists
    python benchmarks/digits_quality.py --families vae,gan --out quality.md
    python benchmarks/digits_quality.py --families vae --quick   # a few steps: a smoke test
"""

from __future__ import annotations

import argparse
import inspect
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# family -> (config, options for model.nll)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "vae": ("configs/vae_discrete_digits.yaml", {"num_samples": 1000, "chunk": 50}),
    "flow": ("configs/flow_digits.yaml", {"num_samples": 16}),
    "pixelcnn": ("configs/pixelcnn_digits.yaml", {}),
    "ddpm": ("configs/ddpm_unet_digits.yaml", {"time_samples": 16}),
    "dit": ("configs/dit_digits.yaml", {"time_samples": 16}),
    "gan": ("configs/gan_digits.yaml", {}),
    # flow matching: the probability-flow ODE bound with Hutchinson's divergence (one probe per image:
    # an unbiased estimate of the same bound, averaged over the test set; the exact divergence costs
    # 64 Jacobian-vector products per evaluation here, ~30x the time on a CPU)
    "flow_dit": ("configs/flow_dit_digits.yaml", {"exact": False, "rtol": 1e-4, "atol": 1e-4}),
    "flow_unet": ("configs/flow_unet_digits.yaml", {"exact": False, "rtol": 1e-4, "atol": 1e-4}),
    "edm_dit": ("configs/edm_dit_digits.yaml", {}),  # EDM has no likelihood here
    "edm_unet": ("configs/edm_unet_digits.yaml", {}),
}
QUICK_NLL = {"num_samples": 8, "chunk": 8, "time_samples": 2}


def train(config: Path, workdir: Path, overrides: list[str], log: Path) -> float:
    """Run ``workshop-train`` into a fresh ``workdir``; return its wall time in seconds."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    command = [
        sys.executable,
        "-m",
        "workshop_dist.cli",
        "--config",
        str(config),
        "--workdir",
        str(workdir),
        "--quiet",
        *overrides,
    ]
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    seconds = time.perf_counter() - start
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"workshop-train exited {code}: {' '.join(command)}\n{tail}")
    return seconds


def load(workdir: Path, all_devices: bool = False):
    """A Trainer holding the run's latest checkpoint, and the run's resolved config.

    One device unless ``all_devices``: evaluation here is small, and any batch size splits over
    it (a checkpoint restores onto any mesh).
    """
    import logging

    import jax

    from workshop_dist import data, parallel
    from workshop_dist.experiment import ExperimentConfiguration
    from workshop_dist.metrics import Logger, MetricsLogger
    from workshop_dist.parallel import MeshConfiguration
    from workshop_dist.training import Trainer

    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax: "metrics" item not restored (not needed)
    config = ExperimentConfiguration.load(workdir / "config.yaml", [])
    training = config.training
    train_input = data.make_train_input(
        config.data, global_batch_size=training.batch_size, seed=training.seed
    )
    mesh_config = MeshConfiguration()
    trainer = Trainer(
        config.model,
        training,
        train_input,
        None,
        None,
        logger=Logger(None, level=40),
        metrics_logger=MetricsLogger("", enabled=False),
        mesh=parallel.make_mesh(mesh_config, jax.devices() if all_devices else jax.devices()[:1]),
        mesh_config=mesh_config,
    )
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    trainer.load_checkpoint(workdir / "checkpoints" / str(steps[-1]))
    return trainer, config


def eval_model(trainer):
    """The model with the parameters evaluation uses (the EMA when the run keeps one), eval mode."""
    import jax
    import jax.numpy as jnp

    engine = trainer.engine
    params, model_state = jax.tree.map(
        jnp.copy, (engine.eval_params(trainer.state), trainer.state.model_state)
    )
    return engine.calls.merge(params, model_state, training=False)


def test_batches(normalize: str, binarize: bool, batch_size: int):
    """The test split in the model's data space, as batches of ``batch_size``."""
    from workshop_dist.data.digits import MAX_LEVEL, load_digits_split
    from workshop_dist.data.transforms import Standardize

    test = load_digits_split("test")
    standard = Standardize(normalize=normalize, binarize=binarize, max_level=MAX_LEVEL, batched=True)
    full = standard.map(test)
    for start in range(0, len(test["label"]), batch_size):
        yield {key: value[start : start + batch_size] for key, value in full.items()}


def test_nll(model, config, options: dict[str, Any], batch_size: int) -> float | None:
    """Mean ``model.nll`` over the test split (nats per image), or None when the model has none."""
    import jax
    from flax import nnx

    if not hasattr(model, "nll"):
        return None
    signature = inspect.signature(model.nll).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values()):
        options = {key: value for key, value in options.items() if key in signature}
    graphdef, state = nnx.split(model)
    nll = jax.jit(lambda state, batch, rng: nnx.merge(graphdef, state).nll(batch, rng, **options))
    total, count = 0.0, 0
    data = config.data
    for index, batch in enumerate(test_batches(data.normalize, data.binarize, batch_size)):
        values = np.asarray(nll(state, batch, jax.random.fold_in(jax.random.PRNGKey(1), index)))
        total, count = total + float(values.sum()), count + len(values)
    return total / count


def evaluate(
    trainer, config, nll_options: dict[str, Any], num_samples: int, batch_size: int, grid: Path | None
):
    """NLL, sample FD and class accuracy of a loaded run; writes the sample grid."""
    from workshop_dist import quality, samples

    classes = trainer.engine.num_classes
    labels = np.repeat(np.arange(classes), num_samples // classes) if classes else None
    count = len(labels) if labels is not None else num_samples
    images = trainer.generate_samples(count, seed=0, labels=labels)
    levels = quality.to_levels(images, config.data.normalize)
    scores = quality.sample_quality(levels, labels)
    scores["nll"] = test_nll(eval_model(trainer), config, nll_options, batch_size)
    if grid is not None:  # 10 x 10: one row per class for a conditional model
        per_row = count // classes if classes else 10
        pick = (
            np.concatenate([np.arange(k * per_row, k * per_row + 10) for k in range(10)])
            if classes
            else np.arange(100)
        )
        picked = levels[pick[pick < len(levels)]] / quality.MAX_LEVEL
        samples.save_png(samples.image_grid(picked, columns=10), grid, scale=4)
    return scores


def run_family(
    family: str,
    config: Path,
    workdir: Path,
    overrides: list[str],
    nll_options: dict[str, Any],
    args: argparse.Namespace,
    num_samples: int,
    root: Path,
) -> dict[str, Any]:
    """Train one family, load its checkpoint, score it; print and return its table row."""
    seconds = train(config, workdir, overrides, root / f"{family}.log")
    trainer, resolved = load(workdir)
    if args.quick:
        nll_options = {**nll_options, **{k: QUICK_NLL[k] for k in nll_options if k in QUICK_NLL}}
    grid = Path(args.grids) / f"{family}.png" if args.grids else None
    start = time.perf_counter()
    scores = evaluate(trainer, resolved, nll_options, num_samples, 64, grid)
    trainer.close()
    nll = f"{scores['nll']:.1f}" if scores["nll"] is not None else "-"
    accuracy = f", class accuracy {scores['accuracy']:.3f}" if "accuracy" in scores else ""
    print(
        f"{family}: {trainer.step} steps in {seconds:.0f} s, NLL {nll}, FD {scores['fd']:.1f}{accuracy} "
        f"(evaluation {time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    return {"family": family, "steps": trainer.step, "seconds": seconds, **scores}


def table(rows: list[dict[str, Any]], floor: float) -> str:
    lines = [
        f"| family | config | steps | train time | test NLL (nats/image) | FD (floor {floor:.1f}) | FD / floor | class accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        nll = f"{row['nll']:.1f}" if row.get("nll") is not None else "-"
        accuracy = f"{row['accuracy']:.3f}" if row.get("accuracy") is not None else "-"
        lines.append(
            f"| {row['family']} | `{row['config']}` | {row['steps']} | {row['seconds']:.0f} s | {nll} | "
            f"{row['fd']:.1f} | {row['fd'] / floor:.2f} | {accuracy} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--families", default=",".join(FAMILIES), help=f"comma-separated, from {', '.join(FAMILIES)}"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a few training steps and few samples (smoke test)"
    )
    parser.add_argument("--workdir", help="where the runs go (default: a temporary directory, removed after)")
    parser.add_argument("--samples", type=int, default=1000, help="samples for the FD (default 1000)")
    parser.add_argument(
        "--grids", default=str(ROOT / "docs" / "samples"), help="sample grid folder ('' for none)"
    )
    parser.add_argument("--out", help="also write the markdown table to this file")
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FAMILY=PATH",
        help="train FAMILY from another config",
    )
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides for every run")
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from workshop_dist import quality

    families = [name.strip() for name in args.families.split(",") if name.strip()]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    configs = {family: config for family, (config, _) in FAMILIES.items()}
    for item in args.config:
        family, _, path = item.partition("=")
        if family not in FAMILIES or not path:
            parser.error(f"--config wants FAMILY=PATH with FAMILY in {', '.join(FAMILIES)}, got '{item}'")
        configs[family] = path
    overrides = ["eval.fid_every=null", *args.overrides]  # the FD is measured here, after training, once
    num_samples = args.samples
    if args.quick:
        overrides += [
            "training.length.max_steps=3",
            "training.performance.steps_per_call=1",
            "training.cadence.num_samples=0",
            "training.cadence.eval_every=1000",
            "training.scheduler=null",
        ]
        num_samples = min(num_samples, 100)
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="digits_quality_"))
    floor = quality.floor()
    print(
        f"quality classifier: test accuracy {quality.train_classifier().test_accuracy:.3f}; "
        f"floor FD(test, train) {floor:.2f}",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    failed: list[str] = []
    try:
        for family in families:
            config_name, nll_options = configs[family], FAMILIES[family][1]
            config = ROOT / config_name
            if not config.exists():
                print(f"skip {family}: {config_name} does not exist yet", flush=True)
                continue
            workdir = root / family
            print(f"{family}: training {config_name} in {workdir} ...", flush=True)
            try:
                row = run_family(family, config, workdir, overrides, nll_options, args, num_samples, root)
            except Exception as err:  # one broken family must not cost the others' results
                failed.append(family)
                print(f"FAILED {family}: {type(err).__name__}: {err}", flush=True)
                continue
            rows.append({"config": config_name, **row})
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    text = table(rows, floor)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
