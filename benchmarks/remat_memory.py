"""Rematerialisation: XLA's compiled memory per device of one DiT training step, for each ``model.remat``.

Compiles (does not run) the Trainer's step with abstract state, so it needs no data and little
memory, and prints arguments, temporaries and their sum per device as XLA's buffer assignment
reports them, plus the FLOPs per step (remat trades memory for recomputation).

    python benchmarks/remat_memory.py                       # the DiT digits config's model, batch 128
    python benchmarks/remat_memory.py --size small --batch 256 --devices 8
    python benchmarks/remat_memory.py --size h100 --batch 256 --precision bfloat16 --target tpu:v5p-8

XLA:CPU's scheduler does not turn rematerialisation into lower peak memory (a plain 12-layer MLP
under jax.checkpoint needs more temporaries there, not fewer), so the CPU figures show only the
recomputation; ``--target`` compiles for a TPU slice instead (ahead of time, with libtpu, see
workshop_dist/aot.py), where the memory saving shows.
"""

from __future__ import annotations

import argparse

from common import use_cpu_devices

POLICIES = ["none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "nothing_saveable"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["digits", "small", "h100"], default="digits",
                        help="digits: configs/dit_digits.yaml's model; small/h100: the MFU benchmark's DiTs.")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--devices", type=int, default=1, help="Simulated CPU devices (0: the real devices).")
    parser.add_argument("--precision", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--target", help="Compile for a TPU slice instead, e.g. tpu:v5p-8 (needs libtpu).")
    return parser.parse_args()


def dit_config(size: str):
    from pathlib import Path

    from workshop_dist.experiment import ExperimentConfiguration

    if size == "digits":
        return ExperimentConfiguration.load(Path(__file__).parents[1] / "configs" / "dit_digits.yaml").model
    from mfu import SIZES, model_config

    return model_config(SIZES[size], "none")


def on_target(args: argparse.Namespace) -> None:
    from workshop_dist import aot
    from workshop_dist.data import DataConfiguration
    from workshop_dist.experiment import ExperimentConfiguration
    from workshop_dist.training import TrainingConfiguration

    base = dit_config(args.size)
    # latents have no data source here: the batch is float32 images of model.input_dim
    data = DataConfiguration(source="array_record:/nonexistent/{split}.array_record")
    mib = 2**20
    print(f"DiT ({args.size}) {tuple(base.input_dim)}, batch {args.batch}, {args.precision}, {args.target}")
    print(f"{'model.remat':34s} {'arguments':>12s} {'temporaries':>12s} {'total':>12s} {'GFLOP/chip':>11s}")
    for policy in POLICIES:
        config = ExperimentConfiguration(
            model=base.model_copy(update={"remat": policy, "dtype": args.precision}),
            training=TrainingConfiguration(batch_size=args.batch),
            data=data,
        )
        report = aot.compile_for_target(config, args.target)
        print(f"{policy:34s} {report.argument_bytes / mib:10.1f}MiB {report.temp_bytes / mib:10.1f}MiB "
              f"{report.total_bytes / mib:10.1f}MiB {(report.flops_per_chip or 0) / 1e9:11.2f}")


def main() -> None:
    args = parse_args()
    if args.target:
        on_target(args)
        return
    use_cpu_devices(args.devices)
    import jax

    from workshop_dist import parallel
    from workshop_dist.training import TrainingConfiguration
    from workshop_dist.training.engine import Engine
    from workshop_dist.training.plan import make_plan

    mesh_config = parallel.MeshConfiguration(data=-1)
    mesh = parallel.make_mesh(mesh_config)
    base = dit_config(args.size)
    training = TrainingConfiguration(batch_size=args.batch)
    mib = 2**20
    print(f"DiT ({args.size}) {tuple(base.input_dim)}, batch {args.batch}, {args.precision}, "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}")
    print(f"{'model.remat':34s} {'arguments':>12s} {'temporaries':>12s} {'total':>12s} {'GFLOP/step':>11s}")
    for policy in POLICIES:
        batch = {"image": jax.ShapeDtypeStruct((args.batch, *base.input_dim), jax.numpy.float32),
                 "label": jax.ShapeDtypeStruct((args.batch,), jax.numpy.int32)}
        plan = make_plan(base.model_copy(update={"remat": policy, "dtype": args.precision}), training, 1)
        compiled = Engine(plan, mesh, mesh_config, batch, abstract=True).lower().compile()
        memory = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        args_bytes, temp = memory.argument_size_in_bytes, memory.temp_size_in_bytes
        print(f"{policy:34s} {args_bytes / mib:10.1f}MiB {temp / mib:10.1f}MiB {(args_bytes + temp) / mib:10.1f}MiB "
              f"{cost['flops'] / 1e9:11.2f}")


if __name__ == "__main__":
    main()
