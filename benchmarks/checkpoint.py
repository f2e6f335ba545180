"""Checkpoint cost seen by the training loop: async vs synchronous saves of a ~100 MB sharded state.

For each mode it measures the time ``Trainer.save_checkpoint()`` blocks the loop, the time
until the save is complete on disk, and the step time while a background write is running,
against the step time with no save in flight. Target: async blocked <= 10% of a sync save.

    python benchmarks/checkpoint.py                 # 8 simulated CPU devices, mesh data=2 fsdp=4
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from common import digits_images, use_cpu_devices


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=8, help="Simulated CPU devices (0: real devices).")
    parser.add_argument("--hidden", type=int, default=2048, help="Width of the VAE's two hidden layers.")
    parser.add_argument("--saves", type=int, default=5, help="Saves measured per mode.")
    parser.add_argument("--steps", type=int, default=10, help="Steps timed after each save.")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    use_cpu_devices(args.devices)
    import jax
    from flax import nnx

    from workshop_dist import ModelConfiguration, Trainer, TrainingConfiguration, create_model, parallel

    images = digits_images()
    mesh_config = parallel.MeshConfiguration(data=2, fsdp=4) if jax.device_count() % 8 == 0 else parallel.MeshConfiguration()
    results = {}
    for mode in ("sync", "async"):
        workdir = tempfile.mkdtemp(prefix=f"ckpt_bench_{mode}_")
        model = create_model(ModelConfiguration(hidden_dims=[args.hidden, args.hidden], output_dim=16), rngs=nnx.Rngs(0))
        config = TrainingConfiguration(
            batch_size=64, num_epochs=1000, length={"steps_per_epoch": args.steps},
            cadence={"log_every": args.steps, "save_every": 10**9, "num_samples": 0},
            checkpoint={"max_to_keep": 2, "async_save": mode == "async"},
        )
        trainer = Trainer(model, config, images, None, workdir, mesh_config=mesh_config)
        size_mb = sum(x.nbytes for x in jax.tree.leaves(trainer.state)) / 2**20
        trainer.train_epoch()  # compile
        blocked, complete, during, idle = [], [], [], []
        for _ in range(args.saves):
            start = time.perf_counter()
            trainer.train_epoch()
            idle.append((time.perf_counter() - start) / args.steps)
            start = time.perf_counter()
            trainer.save_checkpoint()
            blocked.append(time.perf_counter() - start)
            trainer.train_epoch()  # these steps run while an async save is written
            during.append((time.perf_counter() - start - blocked[-1]) / args.steps)
            trainer.checkpoints.wait()
            complete.append(time.perf_counter() - start)
        trainer.close()
        results[mode] = {k: statistics.median(v) for k, v in
                         {"blocked": blocked, "complete": complete, "during": during, "idle": idle}.items()}
        print(f"{mode:>5}: state {size_mb:.0f} MiB on mesh {dict(trainer.mesh.shape)} | loop blocked "
              f"{results[mode]['blocked'] * 1e3:7.1f} ms | save+{args.steps} steps done {results[mode]['complete'] * 1e3:7.1f} ms | "
              f"step {results[mode]['idle'] * 1e3:6.1f} ms, {results[mode]['during'] * 1e3:6.1f} ms after a save")
    ratio = results["async"]["blocked"] / results["sync"]["blocked"]
    print(f"async blocked / sync save = {ratio:.3f} (target <= 0.10); step time after an async save / without: "
          f"{results['async']['during'] / results['async']['idle']:.2f}")


if __name__ == "__main__":
    main()
