"""Throughput of the input pipeline alone (no model): host batches per second.

    python benchmarks/input_pipeline.py [--batch-size 128] [--num-batches 300] [--workers 0 2]

Uses the default data configuration (the built-in digits, prepared on first use into
``$WORKSHOP_DATA_DIR`` or ``~/.cache/workshop_dist/data``), as is and with ``data.cache``.
:func:`measure_pipeline` can be imported to compare with the trainer's steps/s.
"""

from __future__ import annotations

import argparse
import time

from workshop_dist.data import DataConfiguration, make_train_input


def measure_pipeline(
    config: DataConfiguration, global_batch_size: int, num_batches: int, worker_count: int
) -> float:
    """Batches per second of ``make_train_input`` after its first batch (worker start-up excluded)."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128, help="global batch size")
    parser.add_argument("--num-batches", type=int, default=300, help="batches timed per setting")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="worker counts to compare")
    args = parser.parse_args()
    default = DataConfiguration()
    print(f"source={default.source} global_batch_size={args.batch_size} prefetch={default.prefetch}")
    for config in (default, default.model_copy(update={"cache": True})):
        for workers in args.workers:
            rate = measure_pipeline(config, args.batch_size, args.num_batches, workers)
            print(
                f"cache={config.cache!s:5} worker_count={workers}: {rate:8.1f} batches/s "
                f"({rate * args.batch_size:7.0f} examples/s)"
            )


if __name__ == "__main__":  # Grain workers start with spawn and re-import __main__
    main()
