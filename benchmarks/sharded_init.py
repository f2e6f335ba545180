"""Sharded initialisation: peak host memory when a multi-GiB model starts on 8 devices with fsdp=8.

Two ways to start the same model (an MLP VAE with 16384-wide layers, ~4 GiB of float32 params),
each in a fresh process: (a) the Trainer's path for a ModelConfiguration: built abstractly and
initialised by one jitted function straight into its fsdp shards; (b) a built model on the host,
then copied onto the mesh (what a Trainer given a built module does). On simulated CPU devices the
devices' memory is host memory, so the shards themselves (1/8 of the params per device, the
params once in total) are part of the peak; the figure that matters is the peak above the
process's baseline minus the params' own bytes: the extra copies that initialisation needed.

    python benchmarks/sharded_init.py            # both ways, side by side
    python benchmarks/sharded_init.py --width 8192
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

from common import use_cpu_devices


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=16384, help="Width of the VAE's hidden layers.")
    parser.add_argument("--layers", type=int, default=3, help="Hidden layers (each encoder/decoder pair adds 2 x width^2).")
    parser.add_argument("--mode", choices=["sharded", "eager"], help="(internal) run one way and print JSON.")
    return parser.parse_args()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def run_one(args: argparse.Namespace) -> dict:
    use_cpu_devices(8)
    import jax
    from flax import nnx

    from workshop_dist import parallel
    from workshop_dist.models import ModelConfiguration, create_model
    from workshop_dist.training import TrainingConfiguration
    from workshop_dist.training.engine import Engine
    from workshop_dist.training.plan import make_plan

    mesh_config = parallel.MeshConfiguration(data=1, fsdp=8)
    mesh = parallel.make_mesh(mesh_config)
    jax.block_until_ready(jax.device_put(0.0))
    baseline = current_rss_bytes()
    model_config = ModelConfiguration(hidden_dims=[args.width] * args.layers, output_dim=16)
    training = TrainingConfiguration(optimizer={"optimizer_type": "sgd", "learning_rate": 0.1})
    model = model_config if args.mode == "sharded" else create_model(model_config, rngs=nnx.Rngs(training.seed))
    engine = Engine(make_plan(model, training, total_steps=1), mesh, mesh_config)
    params = engine.initial_state.params
    jax.block_until_ready(params)
    del model
    param_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    per_device = max(sum(shard.data.nbytes for leaf in jax.tree.leaves(params) for shard in leaf.addressable_shards
                         if shard.device == device) for device in mesh.devices.flat)
    return {"baseline": baseline, "peak": peak_rss_bytes(), "params": param_bytes, "per_device": per_device}


def main() -> None:
    args = parse_args()
    if args.mode:
        print(json.dumps(run_one(args)))
        return
    gib = 2**30
    results = {}
    for mode in ("sharded", "eager"):
        command = [sys.executable, __file__, "--mode", mode, "--width", str(args.width), "--layers", str(args.layers)]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results[mode] = json.loads(out)
    params = results["sharded"]["params"]
    print(f"model: {params / gib:.2f} GiB of float32 params; 8 devices, fsdp=8: {results['sharded']['per_device'] / gib:.2f} GiB "
          f"per device (a full replica per device would be {params / gib:.2f} GiB each, {8 * params / gib:.1f} GiB in all)")
    for mode, label in (("sharded", "(a) jitted init into shards"), ("eager", "(b) host model, then placed")):
        r = results[mode]
        above = r["peak"] - r["baseline"]
        print(f"{label:30s} peak RSS above baseline {above / gib:6.2f} GiB | extra beyond the params "
              f"{(above - r['params']) / gib:6.2f} GiB | peak / full replica per device {above / (8 * params):.3f}")


if __name__ == "__main__":
    main()
