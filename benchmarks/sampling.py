"""Sampling speed: the Trainer's ``generate_samples`` against a bare jitted loop of the same network and sampler.

Both draw ``--samples`` class-conditional samples from the same model (a flow-matching DiT of
``--config``'s size, fresh weights: speed does not depend on training) with the same sampler and
step count, in one jitted call each; the bare loop is ``jax.jit(lambda state, key, labels:
nnx.merge(graphdef, state).sample(...))`` on one device's arrays, the Trainer's is sharded over
the mesh. Repetitions are interleaved (A B A B) after a compiling warm-up; the ratio is
Trainer images/s over bare images/s, per repetition, median and range.

    python benchmarks/sampling.py --devices 1
    python benchmarks/sampling.py --devices 8 --samples 512
    python benchmarks/sampling.py --devices 0 --size large     # the machine's real devices (GPU)
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import use_cpu_devices

SIZES = {  # DiT sizes over 8x8 digits (``digits``) or 32x32x4 latents (``large``: DiT-B/2-like)
    "digits": {"input_dim": [8, 8, 1], "hidden_size": 64, "depth": 4, "num_heads": 4},
    "large": {"input_dim": [32, 32, 4], "hidden_size": 768, "depth": 12, "num_heads": 12},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1, help="Simulated CPU devices (0: the real devices).")
    parser.add_argument("--size", choices=sorted(SIZES), default="digits")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--sampler", default="heun")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    use_cpu_devices(args.devices)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from workshop_dist import ModelConfiguration, Trainer, TrainingConfiguration, create_model, parallel

    size = SIZES[args.size]
    model_config = ModelConfiguration(
        model_class="dit", input_dim=size["input_dim"],
        parameters={"objective": "flow_matching", "num_classes": 10, "guidance_scale": 2.0, "patch_size": 2,
                    **{k: v for k, v in size.items() if k != "input_dim"}},
    )  # fmt: skip
    mesh = parallel.make_mesh(parallel.MeshConfiguration(data=-1))
    trainer = Trainer(model_config, TrainingConfiguration(batch_size=mesh.size, cadence={"num_samples": 0}),
                      None, None, None, mesh=mesh, mesh_config=parallel.MeshConfiguration(data=-1))
    labels = np.arange(args.samples) % 10
    options = {"sampler": args.sampler, "steps": args.steps}

    model = create_model(model_config, rngs=nnx.Rngs(0))
    model.eval()
    graphdef, state = nnx.split(model)
    bare_fn = jax.jit(lambda state, key, labels: nnx.merge(graphdef, state).sample(key, args.samples, labels=labels, **options))
    key, bare_labels = jax.random.key(0), jnp.asarray(labels)

    def trainer_call() -> None:
        trainer.generate_samples(args.samples, seed=0, labels=labels, **options)  # returns numpy: finished

    def bare_call() -> None:
        np.asarray(bare_fn(state, key, bare_labels))

    calls = {"trainer": trainer_call, "bare": bare_call}
    for call in calls.values():
        call()  # compile
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            seconds[name].append(time.perf_counter() - start)
    nfe = trainer.model.network_evaluations(args.sampler, args.steps)
    print(f"{jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}; DiT {args.size} "
          f"{size['input_dim']}, {args.samples} samples, {args.sampler} {args.steps} steps ({nfe} NFE, guided)")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"{name:8s} {median * 1e3:9.1f} ms per call | {args.samples / median:9.1f} images/s")
    ratios = [b / t for t, b in zip(seconds["trainer"], seconds["bare"], strict=True)]
    print(f"Trainer / bare (images/s) = {statistics.median(ratios):.3f} [{min(ratios):.3f}..{max(ratios):.3f}]")
    trainer.close()


if __name__ == "__main__":
    main()
