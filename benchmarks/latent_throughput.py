"""Latent pre-extraction against on-the-fly encoding, in training steps per second.

The same flow-matching DiT trains on the same digits at 32x32 two ways, in one process:

* ``pre``: on latents encoded once beforehand (the posterior mean times the scale factor, computed
  by :func:`workshop_dist.training.first_stage.load_first_stage`'s jitted encoder, as
  ``workshop-data encode`` does), fed from memory: the step is the DiT's alone;
* ``onthefly``: ``model_class: latent`` on the pixels, the frozen autoencoder encoding each batch
  inside the jitted step (:mod:`workshop_dist.models.latent`).

Both arms feed in-memory arrays staged on the devices (``data_on_device``), so the figure is the
step's cost, not the input pipeline's (an ArrayRecord source of encoded latents adds its own reading
and decoding on top of ``pre``). The autoencoder is random-weight with ``autoencoder_digits32.yaml``'s
architecture (``--autoencoder PATH``: real converted weights or a run); its weights do not change the
cost. Repetitions interleave (A B A B); the one-time encoding of the 1000 training images is timed too.

    python benchmarks/latent_throughput.py                          # digits32 sizes, 1 CPU device
    python benchmarks/latent_throughput.py --size tiny --repeats 2  # smoke check
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

from common import digits_images, use_cpu_devices

SIZES = {  # autoencoder levels and widths, image side, DiT width/depth, batch, timed steps per repetition
    "digits32": {"ae": [16, 32, 64], "groups": 8, "side": 32, "hidden": 64, "depth": 4, "heads": 4, "batch": 128,
                 "steps": 10},
    "tiny": {"ae": [8, 8], "groups": 4, "side": 8, "hidden": 32, "depth": 1, "heads": 2, "batch": 16, "steps": 3},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="digits32")
    parser.add_argument("--devices", type=int, default=1, help="Simulated CPU devices (0: the real devices).")
    parser.add_argument("--steps", type=int, help="Timed steps per repetition (default: per size).")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--encode", choices=["mean", "sample"], default="mean", help="The on-the-fly arm's latents.")
    parser.add_argument("--autoencoder", help="Converted weights or an autoencoder run (default: random, digits32's shape).")
    return parser.parse_args()


def random_autoencoder(size: dict, directory: Path) -> Path:
    """A random-weight autoencoder of the size's architecture, as convert-weights sd-vae writes it."""
    from flax import nnx

    from workshop_dist.models import ModelConfiguration
    from workshop_dist.models.autoencoder import Autoencoder
    from workshop_dist.models.autoencoder_weights import FORMAT
    from workshop_dist.weights import model_tensors, write_safetensors

    parameters = {"block_out_channels": size["ae"], "layers_per_block": 1, "latent_channels": 4,
                  "norm_num_groups": size["groups"], "mid_block_attention": True, "scaling_factor": 0.27}
    config = ModelConfiguration(model_class="autoencoder", input_dim=(size["side"], size["side"], 1), parameters=parameters)
    model = Autoencoder(config, rngs=nnx.Rngs(0))
    metadata = {"format": FORMAT, "parameters": json.dumps(parameters), "channels": "1", "source": "random"}
    return write_safetensors(directory / "autoencoder.safetensors", model_tensors(model), metadata)


def backbone(size: dict) -> dict:
    return {"model_class": "dit", "parameters": {
        "patch_size": 2, "hidden_size": size["hidden"], "depth": size["depth"], "num_heads": size["heads"],
        "objective": "flow_matching", "time_sampling": "logit_normal", "num_classes": 10, "label_dropout": 0.1}}


def main() -> None:
    args = parse_args()
    use_cpu_devices(args.devices)
    import jax
    import numpy as np

    from workshop_dist import Trainer, TrainingConfiguration
    from workshop_dist.data.digits import load_digits_split
    from workshop_dist.metrics import Logger
    from workshop_dist.models import DataSpec, ModelConfiguration
    from workshop_dist.training.first_stage import load_first_stage

    size = dict(SIZES[args.size])
    steps = args.steps or size["steps"]
    side = size["side"]
    images = digits_images()
    if side != images.shape[1]:  # the digits resized (bilinear), as data.image_size does
        images = np.asarray(jax.image.resize(images, (len(images), side, side, 1), "bilinear"), np.float32)
    labels = load_digits_split("train")["label"].astype(np.int32)
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.autoencoder or str(random_autoencoder(size, Path(tmp)))
        stage = load_first_stage(weights)
        encode = jax.jit(stage.encode_fn)
        jax.block_until_ready(encode(stage.params, images[:250]))  # compiled once
        start = time.perf_counter()
        mean = np.concatenate([np.asarray(encode(stage.params, images[i:i + 250])[0]) for i in range(0, len(images), 250)])
        encode_seconds = time.perf_counter() - start
        latents = mean * stage.scale_factor
        config = TrainingConfiguration(
            batch_size=size["batch"], num_epochs=10**6, length={"steps_per_epoch": steps},
            cadence={"log_every": 10**6, "num_samples": 0}, performance={"data_on_device": True},
            optimizer={"optimizer_type": "adam", "learning_rate": 1e-4},
        )
        quiet = Logger(None, level=logging.WARNING)
        pre_model = ModelConfiguration.model_validate(
            {**backbone(size), "input_dim": latents.shape[1:], "data": DataSpec(normalize="latent")})
        fly_model = ModelConfiguration(model_class="latent", input_dim=(side, side, 1), data=DataSpec(normalize="unit"),
                                       parameters={"autoencoder": weights, "encode": args.encode, "backbone": backbone(size)})
        trainers = {
            "pre": Trainer(pre_model, config, {"image": latents, "label": labels}, None, None, logger=quiet),
            "onthefly": Trainer(fly_model, config, {"image": images, "label": labels}, None, None, logger=quiet),
        }
        for trainer in trainers.values():  # warm-up: compilation
            trainer.train_epoch()
        times: dict[str, list[float]] = {key: [] for key in trainers}
        for repeat in range(args.repeats):
            for key in trainers if repeat % 2 == 0 else reversed(list(trainers)):
                start = time.perf_counter()
                trainers[key].train_epoch()  # ends by reading the metrics: waits for the last step
                times[key].append(steps / (time.perf_counter() - start))
        for trainer in trainers.values():
            trainer.close()
    device = jax.devices()[0]
    print(f"device: {jax.device_count()} x {device.device_kind} | jax {jax.__version__} | {args.size}: {side}x{side}x1 "
          f"digits -> {latents.shape[1:]} latents, autoencoder {size['ae']}, DiT width {size['hidden']} depth "
          f"{size['depth']}, batch {size['batch']}, {steps} steps x {args.repeats}, on-the-fly latents: {args.encode}")
    print(f"encoding once: {len(images)} images in {encode_seconds:.2f} s ({len(images) / encode_seconds:.0f} images/s)")
    for key in trainers:
        rate = statistics.median(times[key])
        print(f"{key:>9}: {rate:8.2f} steps/s | {rate * size['batch']:9.1f} images/s")
    ratios = [a / b for a, b in zip(times["pre"], times["onthefly"], strict=True)]
    print(f"pre-extracted / on-the-fly (steps/s) = {statistics.median(ratios):.3f} [{min(ratios):.3f}..{max(ratios):.3f}]")


if __name__ == "__main__":
    main()
