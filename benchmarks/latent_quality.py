"""Latent against pixel diffusion on the digits at 32x32: the first stage's reconstructions, then a
flow-matching DiT on its latents against the same DiT on the 8x8 pixels, at the same steps.

Every run is a command, as a user would type it (``workshop-train``, ``workshop-data encode``):

1. the autoencoder, ``configs/autoencoder_digits32.yaml`` (or ``--autoencoder WORKDIR``: a run already done);
2. its **reconstructions** of the 447 test digits at 32x32 (posterior means decoded): MSE and L1 per
   pixel in [0, 1] units, PSNR, and the digits classifier's FD and class accuracy after average-pooling
   them back to 8x8 (the classifier's size; :mod:`workshop_dist.quality`). The FD of the *real* 32x32
   test digits pooled the same way is printed beside it: what resizing up and pooling back costs alone;
3. ``workshop-data encode --autoencoder AE digits LATENTS --image-size 32``;
4. ``configs/latent_flow_dit_digits32.yaml`` on those latents and ``configs/flow_dit_digits.yaml`` on the
   8x8 pixels, both for ``--steps`` steps (the same DiT: 16 tokens, width 64, depth 4); then 100 samples
   per class from each (Heun, 25 steps), the latent ones decoded and pooled to 8x8, scored with the
   classifier: FD to the test set and class accuracy. Train time is the ``workshop-train`` process's wall time.

    python benchmarks/latent_quality.py --workdir runs/latent_bench [--autoencoder runs/autoencoder] [--steps 1400]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


def command(args: list[str], log: Path) -> float:
    """Run one of the project's commands; its wall time in seconds (an error shows the log's tail)."""
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.call([sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if code:
        raise RuntimeError(f"{' '.join(args)} exited {code}:\n" + "".join(log.read_text().splitlines(True)[-15:]))
    return time.perf_counter() - start


def train(config: str, workdir: Path, overrides: list[str], log: Path) -> float:
    if workdir.exists():
        shutil.rmtree(workdir)
    return command(["workshop_dist.cli", "--config", str(ROOT / config), "--workdir", str(workdir), "--quiet",
                    *overrides], log)


def to_8x8_levels(images: np.ndarray, white: float) -> np.ndarray:
    """Decoded 32x32 images in [0, white] -> the classifier's 8x8 levels 0..16 (4x4 average pooling)."""
    from workshop_dist.training.hooks.fid import pool_to

    return np.asarray(pool_to(np.asarray(images, np.float32), (8, 8, 1))) * (16.0 / white)


def reconstructions(autoencoder: Path) -> dict[str, float]:
    """Reconstruction error and classifier scores of the autoencoder on the 32x32 test digits."""
    import jax

    from workshop_dist import quality
    from workshop_dist.encode import digits_dataset
    from workshop_dist.training.first_stage import load_first_stage

    stage = load_first_stage(autoencoder)
    split = digits_dataset(32, ["test"]).splits["test"]
    images = np.stack([split[i]["image"] for i in range(len(split))]).astype(np.float32) / 16.0  # [0, 1]
    labels = np.asarray([split[i]["label"] for i in range(len(split))])
    encode = jax.jit(stage.encode_fn)
    means = np.concatenate([np.asarray(encode(stage.params, images[i : i + 64] * stage.max_value)[0])
                            for i in range(0, len(images), 64)])
    decoded = np.concatenate([stage.decode(means[i : i + 64] * stage.scale_factor) for i in range(0, len(means), 64)])
    decoded = decoded / stage.max_value
    error = decoded - images
    mse = float(np.mean(error**2))
    real, recon = quality.sample_quality(to_8x8_levels(images, 1.0), labels), quality.sample_quality(
        to_8x8_levels(decoded, 1.0), labels)
    return {"mse": mse, "l1": float(np.mean(np.abs(error))), "psnr": 10 * np.log10(1.0 / mse), "fd": recon["fd"],
            "accuracy": recon["accuracy"], "pooled_real_fd": real["fd"], "pooled_real_accuracy": real["accuracy"],
            "floor": real["fd_floor"], "latent_std": float(np.std(means)), "scale_factor": stage.scale_factor}


def samples_quality(workdir: Path, latent: bool) -> dict[str, float]:
    """FD and class accuracy of 100 samples per class of a trained DiT (latent ones decoded, pooled)."""
    from digits_quality import load

    from workshop_dist import quality

    trainer, config = load(workdir)
    labels = np.repeat(np.arange(10), 100)
    start = time.perf_counter()
    images = trainer.generate_samples(len(labels), seed=0, labels=labels)  # decoded by model.decoder when latent
    seconds = time.perf_counter() - start
    levels = to_8x8_levels(images, trainer.decoder.max_value) if latent else quality.to_levels(images, config.data.normalize)
    trainer.close()
    return {**quality.sample_quality(levels, labels), "sample_seconds": seconds, "steps": trainer.step}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="where the runs and latents go")
    parser.add_argument("--autoencoder", help="an autoencoder run's workdir to reuse (default: train the config)")
    parser.add_argument("--steps", type=int, default=1400, help="training steps of each DiT (default: the configs' 1400)")
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    root = Path(args.workdir).absolute()
    root.mkdir(parents=True, exist_ok=True)
    autoencoder = Path(args.autoencoder).absolute() if args.autoencoder else root / "autoencoder"
    if not args.autoencoder:
        seconds = train("configs/autoencoder_digits32.yaml", autoencoder, [], root / "autoencoder.log")
        print(f"autoencoder: trained in {seconds:.0f} s", flush=True)
    rec = reconstructions(autoencoder)
    print(f"reconstructions (test, 32x32): MSE {rec['mse']:.2e} (PSNR {rec['psnr']:.1f} dB), L1 {rec['l1']:.4f}; "
          f"FD {rec['fd']:.1f} and class accuracy {rec['accuracy']:.3f} after pooling to 8x8 (real 32x32 digits "
          f"pooled: FD {rec['pooled_real_fd']:.1f}, accuracy {rec['pooled_real_accuracy']:.3f}; floor {rec['floor']:.1f}); "
          f"latent std {rec['latent_std']:.2f}, scale factor {rec['scale_factor']:g}", flush=True)
    latents = root / "latents"
    shutil.rmtree(latents, ignore_errors=True)
    seconds = command(["workshop_dist.data.cli", "encode", "--quiet", "--autoencoder", str(autoencoder), "digits",
                       str(latents), "--image-size", "32"], root / "encode.log")
    print(f"encode: 1797 digits in {seconds:.0f} s (the command's wall time)", flush=True)
    # max_steps decides (the epochs' cap lifted); the FD is scored here, after training
    steps = [f"training.length.max_steps={args.steps}", "training.num_epochs=100000", "eval.fid_every=null"]
    runs = {
        "latent flow DiT (8x8x4 latents of 32x32)": ("configs/latent_flow_dit_digits32.yaml", True, [
            f"model.decoder={autoencoder}", f"data.source=array_record:{latents}/{{split}}-*-of-*.array_record"]),
        "pixel flow DiT (8x8 pixels)": ("configs/flow_dit_digits.yaml", False, []),
    }
    rows = []
    for name, (config, latent, extra) in runs.items():
        workdir = root / ("latent_dit" if latent else "pixel_dit")
        seconds = train(config, workdir, [*steps, *extra], root / f"{workdir.name}.log")
        scores = samples_quality(workdir, latent)
        print(f"{name}: {scores['steps']} steps in {seconds:.0f} s, FD {scores['fd']:.1f}, class accuracy "
              f"{scores['accuracy']:.3f} (1000 samples in {scores['sample_seconds']:.0f} s)", flush=True)
        rows.append(f"| {name} | `{config}` | {scores['steps']} | {seconds:.0f} s | {scores['fd']:.1f} | "
                    f"{scores['accuracy']:.3f} |")
    print("| model | config | steps | train time | FD (1000 samples, 8x8) | class accuracy |\n|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
