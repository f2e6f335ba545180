"""FID feature throughput: the FID hook's on-mesh statistics against a bare jitted InceptionV3.

Both compute the 2048-d Inception pool features of the same ``--batches`` x ``--batch`` random
32x32 RGB images with the same (random) weights, resized to 299x299 inside the program. The hook's
path (:class:`workshop_dist.eval.features.OnMesh`, as in ``FIDHook``) splits each batch over the
mesh, computes the features there and reduces their sums and outer products across devices,
reading back once at the end; the bare loop is ``jax.jit(lambda w, x: inception(x))`` on the same
arrays, its features left on the device (blocked on at the end). Repetitions are interleaved
(A B A B) after a compiling warm-up; the ratio is hook images/s over bare images/s (target
>= 0.95), per repetition, median and range.

    python benchmarks/fid.py --devices 1
    python benchmarks/fid.py --devices 8
    python benchmarks/fid.py --devices 0 --batch 256 --batches 8     # the machine's real devices (GPU)
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import use_cpu_devices


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1, help="Simulated CPU devices (0: the real devices).")
    parser.add_argument("--batch", type=int, default=16, help="Images per call (split over the devices).")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    use_cpu_devices(args.devices)
    import jax
    import numpy as np
    from flax import nnx

    from workshop_dist import parallel
    from workshop_dist.eval import features

    mesh = parallel.make_mesh(parallel.MeshConfiguration())
    network = features.inception(None)  # random weights: speed does not depend on them
    on_mesh = features.OnMesh(network, mesh)
    rng = np.random.default_rng(0)
    host = [rng.uniform(0, 1, (args.batch, 32, 32, 3)).astype(np.float32) for _ in range(args.batches)]
    batches = [parallel.host_batch_to_global({"image": x, "mask": np.ones(args.batch, np.float32)}, mesh) for x in host]
    graphdef = network.graphdef
    bare_fn = jax.jit(lambda w, x: nnx.merge(graphdef, w)(x))
    bare_weights = on_mesh.weights

    def hook() -> None:
        on_mesh.statistics(batches)  # reads the sums back: done

    def bare() -> None:
        outputs = [bare_fn(bare_weights, batch["image"]) for batch in batches]
        jax.block_until_ready(outputs)

    images = args.batch * args.batches
    print(f"{mesh.devices.size} {jax.devices()[0].platform} device(s), {args.batches} x {args.batch} images 32x32 -> 299x299")
    start = time.perf_counter()
    hook()
    bare()
    print(f"compile + first run: {time.perf_counter() - start:.1f} s")
    ratios, rates = [], {"hook": [], "bare": []}
    for _ in range(args.repeats):
        measured = {}
        for name, fn in (("hook", hook), ("bare", bare)):
            start = time.perf_counter()
            fn()
            measured[name] = images / (time.perf_counter() - start)
            rates[name].append(measured[name])
        ratios.append(measured["hook"] / measured["bare"])
        print(f"  hook {measured['hook']:.1f} images/s  bare {measured['bare']:.1f} images/s  ratio {ratios[-1]:.3f}")
    print(f"hook {statistics.median(rates['hook']):.1f} images/s, bare {statistics.median(rates['bare']):.1f}; "
          f"hook / bare {statistics.median(ratios):.3f} [{min(ratios):.3f}-{max(ratios):.3f}] (target >= 0.95)")


if __name__ == "__main__":
    main()
