"""The input pipeline against the training loop, on the default configuration.

1. Batches/s of the pipeline alone (no model), with 0 and 2 worker processes, with and
   without ``data.cache`` (the default config caches the digits).
2. Steps/s of the Trainer on the same config (default model and data, all local devices),
   and the ratio pipeline / trainer (target: >= 10).
3. How long the training loop blocks on the pipeline for its next batch
   (``train/data_wait_time``) against the step time, and how long it waits for the device
   (``train/device_wait_time``: it is that far ahead, with the next steps already queued, so
   the device does not wait for data).

4. With ``--images``: an image folder (``data.source: images:PATH``), decoded and resized
   images/s of the pipeline with 1 and 2 Grain workers against a bare Pillow loop doing the
   same work in one process (open, JPEG draft, convert, resize of the crop box, to float),
   interleaved A B A B; target: at least 0.9x the bare loop per worker.

    python benchmarks/input_pipeline.py [--devices 8] [--workers 0 2]
    python benchmarks/input_pipeline.py --images [--image-dir DIR] [--image-workers 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import use_cpu_devices


def measure_pipeline(config, global_batch_size: int, num_batches: int, worker_count: int) -> float:
    """Batches per second of ``make_train_input`` after its first batch (worker start-up excluded)."""
    from workshop_dist.data import make_train_input

    config = config.model_copy(update={"worker_count": worker_count})
    train = make_train_input(config, global_batch_size=global_batch_size, seed=0)
    try:
        next(train)  # starts workers and fills the prefetch buffers
        start = time.perf_counter()
        for _ in range(num_batches):
            next(train)
        return num_batches / (time.perf_counter() - start)
    finally:
        train.close()


def measure_trainer(experiment, epochs: int) -> tuple[float, dict[str, float]]:
    """Steps/s of Trainer.train_epoch and its mean per-step times (step, data wait, device wait)."""
    from flax import nnx

    from workshop_dist import Trainer, create_model
    from workshop_dist.data import make_train_input

    training = experiment.training.model_copy(update={"cadence": experiment.training.cadence.model_copy(update={"log_every": 7}), "num_epochs": 10**6})
    train = make_train_input(experiment.data, global_batch_size=training.batch_size, seed=0)
    rows = []
    trainer = Trainer(
        create_model(experiment.model, rngs=nnx.Rngs(0)), training, train, None, None,
        mesh_config=experiment.mesh, log_callback=lambda step, metrics, prefix: rows.append(metrics),
    )
    trainer.train_epoch()  # compile
    rows.clear()
    start, first = time.perf_counter(), trainer.step
    for _ in range(epochs):
        trainer.train_epoch()
    rate = (trainer.step - first) / (time.perf_counter() - start)
    keys = ("step_time", "data_wait_time", "device_wait_time")
    return rate, {key: statistics.mean(row[key] for row in rows) for key in keys}


def make_images(root, count: int, seed: int = 0):
    """``root/train/{a,b}/``: ``count`` JPEG (3 of 4) and PNG photos-like images, 100-200 px sides."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        height, width = (int(v) for v in rng.integers(100, 201, 2))
        y, x = np.mgrid[0:height, 0:width] / 100.0
        picture = rng.uniform(0.2, 0.8, 3) + rng.uniform(-0.5, 0.5, 3) * y[..., None] + rng.uniform(-0.5, 0.5, 3) * x[..., None]
        picture = np.clip(picture + rng.normal(0, 0.04, (height, width, 3)), 0, 1)
        folder = root / "train" / "ab"[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray((picture * 255).astype(np.uint8))
        image.save(folder / f"{i:05d}.jpg", quality=90) if i % 4 else image.save(folder / f"{i:05d}.png")


class BareLoop:
    """The same work as the pipeline's decoding, in a plain loop: Pillow calls, then a float batch."""

    def __init__(self, paths, size: int, batch: int):
        self.paths, self.size, self.batch, self.position = paths, size, batch, 0

    def load(self, path):
        import numpy as np
        from PIL import Image

        size = self.size
        with Image.open(path) as image:
            width, height = image.size
            scale = size / min(width, height)
            if scale <= 0.5 and image.format == "JPEG":
                image.draft("RGB", (int(width * scale) + 1, int(height * scale) + 1))
            image = image.convert("RGB")
            width, height = image.size
            scale = max(size / width, size / height)
            full_w, full_h = max(size, round(width * scale)), max(size, round(height * scale))
            left, top = (full_w - size) // 2, (full_h - size) // 2
            sx, sy = full_w / width, full_h / height
            box = (left / sx, top / sy, (left + size) / sx, (top + size) / sy)
            return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, box=box), np.uint8)

    def __next__(self):
        import numpy as np

        indices = [(self.position + k) % len(self.paths) for k in range(self.batch)]
        self.position += self.batch
        return {"image": np.stack([self.load(self.paths[i]) for i in indices]).astype(np.float32) / np.float32(255)}


def measure_images(args) -> None:
    """Images/s of the pipeline with each worker count against the bare loop, rounds interleaved."""
    import tempfile
    from pathlib import Path

    import numpy as np

    from workshop_dist.data import DataConfiguration, make_train_input
    from workshop_dist.data.images import list_folder

    root = Path(args.image_dir) if args.image_dir else Path(tempfile.mkdtemp(prefix="bench_images_"))
    if not (root / "train").is_dir():
        make_images(root, args.num_images)
    paths = list_folder(str(root), "train").paths
    batch, size = args.image_batch, args.image_size
    config = DataConfiguration(source=f"images:{root}", image_size=size, channels=3, shuffle=False, random_crop=False, prefetch=2)
    print(f"image folder {root}: {len(paths)} files (3/4 JPEG, 1/4 PNG, 100-200 px) -> {size}x{size} RGB, batch {batch}")
    inputs = {workers: make_train_input(config.model_copy(update={"worker_count": workers}), global_batch_size=batch, seed=0,
                                        process_index=0, process_count=1) for workers in args.image_workers}
    bare = BareLoop(paths, size, batch)
    try:
        for train in inputs.values():  # starts the workers; the same pixels as the bare loop
            bare.position = 0
            np.testing.assert_array_equal(next(train)["image"], next(bare)["image"])
        rates: dict[str, list[float]] = {name: [] for name in [*map(str, inputs), "bare"]}
        cpu: dict[str, list[float]] = {name: [] for name in rates}
        for _ in range(args.rounds):
            for workers, train in inputs.items():
                for _ in range(5 * (workers + 1)):  # drop what was prefetched while the other case ran
                    next(train)
                for name, batches in ((str(workers), train), ("bare", bare)):
                    rate, seconds = images_per_second(batches, args.image_batches, batch, all_processes=name != "bare")
                    rates[name].append(rate)
                    cpu[name].append(seconds)
    finally:
        for train in inputs.values():
            train.close()
    base = statistics.median(rates["bare"])
    base_cpu = statistics.median(cpu["bare"])
    print(f"bare Pillow loop, 1 process: {base:8.1f} images/s (median of {len(rates['bare'])}), {base_cpu * 1e3:.2f} CPU ms/image")
    for workers in inputs:
        rate = statistics.median(rates[str(workers)])
        ratios = [a / b for a, b in zip(rates[str(workers)], rates["bare"][list(inputs).index(workers)::len(inputs)], strict=True)]
        per_worker = rate / base / max(workers, 1)
        efficiency = base_cpu / statistics.median(cpu[str(workers)]) if base_cpu else float("nan")
        print(f"pipeline, worker_count={workers}: {rate:8.1f} images/s = {rate / base:.2f}x the bare loop "
              f"({per_worker:.2f}x per worker, target >= 0.9; rounds: {' '.join(f'{r:.2f}' for r in ratios)}); "
              f"CPU time per image {efficiency:.2f}x as efficient as the bare loop (all processes)")


def images_per_second(batches, count: int, batch: int, *, all_processes: bool) -> tuple[float, float]:
    """(images/s, CPU seconds per image of this process and, with ``all_processes``, its children)."""
    start, cpu = time.perf_counter(), cpu_seconds(all_processes)
    for _ in range(count):
        next(batches)
    images = count * batch
    return images / (time.perf_counter() - start), (cpu_seconds(all_processes) - cpu) / images


def cpu_seconds(all_processes: bool) -> float:
    """User + system CPU time of this process (and its live children: the Grain workers); 0 without psutil."""
    try:
        import psutil
    except ImportError:
        return 0.0
    me = psutil.Process()
    processes = [me, *me.children(recursive=True)] if all_processes else [me]
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=0, help="Simulated CPU devices (0: the real local devices).")
    parser.add_argument("--num-batches", type=int, default=300, help="Batches timed per pipeline setting.")
    parser.add_argument("--epochs", type=int, default=20, help="Epochs timed for the trainer.")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="Worker counts to compare.")
    parser.add_argument("--images", action="store_true", help="Measure the image-folder case (4.) instead.")
    parser.add_argument("--image-dir", help="Image folder with a train/ split (default: generate one in a temp dir).")
    parser.add_argument("--num-images", type=int, default=1024, help="Images generated when --image-dir is not given.")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--image-batch", type=int, default=32)
    parser.add_argument("--image-batches", type=int, default=20, help="Batches timed per case and round.")
    parser.add_argument("--image-workers", type=int, nargs="+", default=[1, 2], help="Grain worker counts.")
    parser.add_argument("--rounds", type=int, default=4, help="Interleaved rounds (A B A B ...).")
    args = parser.parse_args()
    if args.images:
        return measure_images(args)
    use_cpu_devices(args.devices)
    import jax

    from workshop_dist.cli import load_config

    experiment = load_config(None, [])
    batch = experiment.training.batch_size
    print(f"default config: source={experiment.data.source} cache={experiment.data.cache} batch={batch} | "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}")
    rates = {}
    for cache in (True, False):
        for workers in args.workers:
            config = experiment.data.model_copy(update={"cache": cache})
            rates[cache, workers] = rate = measure_pipeline(config, batch, args.num_batches, workers)
            print(f"pipeline alone, cache={cache!s:5} worker_count={workers}: {rate:9.1f} batches/s")
    steps, times = measure_trainer(experiment, args.epochs)
    step_time, data_time, device_time = times["step_time"], times["data_wait_time"], times["device_wait_time"]
    pipeline = rates[experiment.data.cache, experiment.data.worker_count]
    print(f"trainer, default config: {steps:.1f} steps/s")
    print(f"pipeline (default settings) / trainer = {pipeline / steps:.1f}x (target >= 10)")
    print(f"training loop blocked on the pipeline: {data_time * 1e3:.3f} ms per step = {data_time / step_time:.1%} "
          f"of the {step_time * 1e3:.2f} ms step")
    print(f"training loop waiting for the device (steps queued ahead): {device_time * 1e3:.3f} ms per step")


if __name__ == "__main__":  # Grain workers start with spawn and re-import __main__
    main()
