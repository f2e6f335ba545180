"""MFU: a DiT trained by the Trainer and by a bare ``jax.jit`` loop of the same model, in the same run.

The ``h100`` size is a flow-matching DiT-L/2 (hidden 1024, depth 24, 16 heads, ~460M parameters) on 32x32x4
latents with patch 2 (256 tokens), global batch 256, bf16 compute with float32 master weights,
adam. Both loops run the same model, the same optax transformation and the same data (random
latents staged on the devices, gathered per step); repetitions are interleaved (A B A B).
Prints step time, images/s, achieved TFLOP/s (XLA's FLOP count of the compiled step / step
time), MFU (against the device's peak dense bf16 FLOP/s from workshop_dist/hardware.py) and the
Trainer / bare ratio. On CPU the ``tiny`` size is a smoke check (no MFU: CPUs have no peak).

    python benchmarks/mfu.py --size h100 --devices 0      # one real GPU
    python benchmarks/mfu.py --size tiny                  # CPU smoke check (also run in CI)
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

from common import use_cpu_devices

SIZES = {
    "h100": {"image": (32, 32, 4), "hidden_size": 1024, "depth": 24, "num_heads": 16, "batch": 256, "steps": 30},
    "small": {"image": (32, 32, 4), "hidden_size": 384, "depth": 12, "num_heads": 6, "batch": 256, "steps": 30},
    "tiny": {"image": (8, 8, 4), "hidden_size": 64, "depth": 2, "num_heads": 2, "batch": 16, "steps": 5},
}
IN_FLIGHT = 2


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--devices", type=int, default=1, help="Simulated CPU devices (0: the real devices).")
    parser.add_argument("--steps", type=int, help="Timed steps per repetition (default: per size).")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--remat", default="none", help="model.remat for both loops.")
    return parser.parse_args()


def model_config(size: dict, remat: str, dtype: str = "float32"):
    from workshop_dist.models import DataSpec, ModelConfiguration

    return ModelConfiguration(
        model_class="dit",
        input_dim=size["image"],
        remat=remat,
        dtype=dtype,
        data=DataSpec(num_levels=256),
        parameters={
            "patch_size": 2, "hidden_size": size["hidden_size"], "depth": size["depth"], "num_heads": size["num_heads"],
            "objective": "flow_matching", "time_sampling": "logit_normal", "num_classes": 1000,
        },
    )


def main() -> None:
    args = parse_args()
    use_cpu_devices(args.devices)
    import jax
    import numpy as np

    from workshop_dist import hardware, parallel

    size = dict(SIZES[args.size])
    steps = args.steps or size["steps"]
    mesh_config = parallel.MeshConfiguration(data=-1)
    mesh = parallel.make_mesh(mesh_config)
    rng = np.random.default_rng(0)
    data = {
        "image": rng.integers(0, 256, (steps * size["batch"], *size["image"])).astype(np.float32),
        "label": rng.integers(0, 1000, (steps * size["batch"],)).astype(np.int32),
    }
    trainer, trainer_epoch = trainer_loop(args, size, steps, data, mesh, mesh_config)
    bare_epoch, bare_flops = bare_loop(args, size, steps, data, mesh, mesh_config, trainer)
    params = sum(leaf.size for leaf in jax.tree.leaves(trainer.state.params))
    device = jax.devices()[0]
    peak = hardware.peak_flops(device)
    print(f"device: {jax.device_count()} x {device.device_kind} | jax {jax.__version__} | DiT {args.size}: {params / 1e6:.1f}M "
          f"params, {size['image']} latents, patch 2, batch {size['batch']}, {args.precision}, remat {args.remat}")
    loops = {"trainer": trainer_epoch, "bare": bare_epoch}
    for run in loops.values():  # warm-up: compilation
        run()
    times: dict[str, list[float]] = {key: [] for key in loops}
    for repeat in range(args.repeats):
        for key in loops if repeat % 2 == 0 else reversed(list(loops)):
            start = time.perf_counter()
            loops[key]()
            times[key].append((time.perf_counter() - start) / steps)
    flops = {"trainer": trainer.flops_per_step, "bare": bare_flops}
    for key in loops:
        step_time = statistics.median(times[key])
        tflops = flops[key] / step_time / 1e12 if flops[key] else float("nan")
        mfu = f"{flops[key] / step_time / (peak * jax.device_count()):.1%}" if peak and flops[key] else "n/a (no peak for this device)"
        print(f"{key:>8}: step {step_time * 1e3:8.2f} ms | {size['batch'] / step_time:9.1f} images/s | "
              f"{tflops:8.3f} TFLOP/s | MFU {mfu}")
    ratios = [b / a for a, b in zip(times["trainer"], times["bare"], strict=True)]
    print(f"Trainer / bare (speed) = {statistics.median(ratios):.3f} [{min(ratios):.3f}..{max(ratios):.3f}]")


def trainer_loop(args, size, steps, data, mesh, mesh_config):
    import logging

    from workshop_dist import Trainer, TrainingConfiguration
    from workshop_dist.metrics import Logger

    config = TrainingConfiguration(
        batch_size=size["batch"], num_epochs=10**6, cadence={"log_every": 10**6, "num_samples": 0},
        performance={"data_on_device": True, "max_steps_in_flight": IN_FLIGHT},
        optimizer={"optimizer_type": "adam", "learning_rate": 1e-4},
    )
    trainer = Trainer(model_config(size, args.remat, args.precision), config, data, None, workdir=None,
                      logger=Logger(None, level=logging.WARNING), mesh=mesh, mesh_config=mesh_config)

    def run_epoch() -> None:
        trainer.train_epoch()  # ends by reading the metrics: waits for the last step

    return trainer, run_epoch


def bare_loop(args, size, steps, data, mesh, mesh_config, trainer):
    """The same model and optax transformation, hand-written: split once, jit with donation, bf16 layers."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from workshop_dist import parallel
    from workshop_dist.models import create_model

    model = create_model(model_config(size, args.remat, args.precision), rngs=nnx.Rngs(1))  # bf16 layers
    graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
    rest = nnx.to_pure_dict(rest)
    shardings = trainer.engine.state_shardings.params
    params = parallel.place(nnx.to_pure_dict(params_state), shardings)
    tx = optax.adam(1e-4)
    replicated = parallel.replicated(mesh)
    opt_shardings = parallel.optimizer_state_shardings(tx, jax.eval_shape(tx.init, params), shardings, replicated)
    state = (params, jax.jit(tx.init, out_shardings=opt_shardings)(params))
    on_device = parallel.place(data, replicated)
    batch_sharding = parallel.batch_sharding(mesh)

    def loss_fn(params, batch, rng):
        model = nnx.merge(graphdef, params, rest)  # computes in the dtype it was built with
        loss, _ = model.loss(batch, rng)
        return loss.astype(jnp.float32)

    def step(state, data, index, step_index):
        params, opt_state = state
        batch = jax.lax.with_sharding_constraint({k: v[index] for k, v in data.items()}, batch_sharding)
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, jax.random.fold_in(jax.random.PRNGKey(0), step_index))
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    jitted = jax.jit(step, in_shardings=((shardings, opt_shardings), replicated, replicated, replicated),
                     out_shardings=((shardings, opt_shardings), replicated), donate_argnums=0)
    order = np.random.default_rng(0).permutation(steps * size["batch"]).reshape(steps, size["batch"]).astype(np.int32)
    indices = [jax.device_put(row, replicated) for row in order]
    cost = jitted.lower(state, on_device, indices[0], np.int32(0)).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    counter = [0]

    def run_epoch() -> None:
        nonlocal state
        queued = collections.deque()
        for index in indices:
            state, loss = jitted(state, on_device, index, np.int32(counter[0]))
            counter[0] += 1
            queued.append(loss)
            if len(queued) > IN_FLIGHT:
                queued.popleft().block_until_ready()
        jax.block_until_ready(queued[-1])

    return run_epoch, float(cost["flops"]) if cost and cost.get("flops") else None


if __name__ == "__main__":
    main()
