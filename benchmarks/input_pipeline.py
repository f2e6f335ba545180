"""The input pipeline against the training loop, on the default configuration.

1. Batches/s of the pipeline alone (no model), with 0 and 2 worker processes, with and
   without ``data.cache`` (the default config caches the digits).
2. Steps/s of the Trainer on the same config (default model and data, all local devices),
   and the ratio pipeline / trainer (target: >= 10).
3. How long the training loop blocks on the pipeline for its next batch
   (``train/data_wait_time``) against the step time, and how long it waits for the device
   (``train/device_wait_time``: it is that far ahead, with the next steps already queued, so
   the device does not wait for data).

    python benchmarks/input_pipeline.py [--devices 8] [--workers 0 2]
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

    training = experiment.training.model_copy(update={"log_frequency": 7, "num_epochs": 10**6})
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=0, help="Simulated CPU devices (0: the real local devices).")
    parser.add_argument("--num-batches", type=int, default=300, help="Batches timed per pipeline setting.")
    parser.add_argument("--epochs", type=int, default=20, help="Epochs timed for the trainer.")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="Worker counts to compare.")
    args = parser.parse_args()
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
