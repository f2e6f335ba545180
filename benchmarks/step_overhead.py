"""Step overhead: the Trainer against a bare jitted loop doing the same work (and an idiomatic NNX loop).

Same model, same host batches (placed on the mesh every step), same mesh, and the same optax
transformation (the packaged default config's: adam, clip-by-global-norm 10, cosine schedule):
  (a) Trainer.train_epoch
  (b) nnx.split once + jax.jit over pure state with donation (the fastest plain JAX loop)
  (c) nnx.jit + nnx.Optimizer (the idiomatic Flax NNX loop)
Prints steps/s of each and the ratios a/b and a/c: the median of the ratios measured within
each repetition, and their range (target: a/b >= 0.97).

``--variants`` adds the same comparison with an option on in both loops: ``ema`` (EMA of the
params, decay 0.999), ``accum4`` (4 micro-batches per step), and ``fast``: the Trainer with
``training.performance.data_on_device`` and ``training.performance.steps_per_call`` against the fastest hand-written loop
(the data set staged on the mesh once, ``--steps-per-call`` steps per jitted call via lax.scan,
batches gathered on the device).
All three keep at most ``max_steps_in_flight`` (2) steps queued, as the Trainer does: on
simulated CPU devices an unbounded queue of steps with collectives deadlocks XLA:CPU.

    python benchmarks/step_overhead.py                   # tiny and default model, 8 simulated CPU devices
    python benchmarks/step_overhead.py --devices 0       # real devices (e.g. a GPU)
    python benchmarks/step_overhead.py --variants base,ema,accum4,fast --devices 1
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time

from common import digits_images, use_cpu_devices


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=8, help="Simulated CPU devices (0: use the real devices).")
    parser.add_argument("--steps", type=int, default=200, help="Timed steps per repetition.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--models", default="tiny,default", help="Comma list of: tiny, default, large.")
    parser.add_argument("--fsdp", type=int, default=1, help="mesh.fsdp (data fills the rest).")
    parser.add_argument(
        "--no-clip", action="store_true", help="Drop the default config's gradient clipping (all three loops)."
    )
    parser.add_argument("--variants", default="base", help="Comma list of: base, ema, accum4, fast.")
    parser.add_argument("--steps-per-call", type=int, default=20, help="Steps per call of the 'fast' variant.")
    parser.add_argument(
        "--timer", choices=["wall", "cpu"], default="wall",
        help="wall: elapsed time; cpu: this process's CPU time (all threads), steadier on a machine shared with other jobs.",
    )
    return parser.parse_args()


IN_FLIGHT = 2  # the Trainer's default training.performance.max_steps_in_flight
MODELS = {
    "tiny": {"hidden_dims": [32], "output_dim": 4},
    "default": {"hidden_dims": [256, 128], "output_dim": 16},
    "large": {"hidden_dims": [4096, 4096, 2048], "output_dim": 64},
}


def main() -> None:
    args = parse_args()
    use_cpu_devices(args.devices)
    import jax
    import numpy as np

    from workshop_dist import parallel

    images = digits_images()
    rng = np.random.default_rng(0)
    batches = [{"image": images[rng.choice(len(images), args.batch_size)]} for _ in range(args.steps)]
    mesh_config = parallel.MeshConfiguration(data=-1, fsdp=args.fsdp)
    mesh = parallel.make_mesh(mesh_config)
    clip = "no clipping" if args.no_clip else "clip-by-norm 10"
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} | mesh {dict(mesh.shape)} | "
          f"batch {args.batch_size} | adam, {clip}, cosine | {args.steps} steps x {args.repeats} repeats | {args.timer} time")
    for variant in args.variants.split(","):
        for name in args.models.split(","):
            if variant == "fast":
                loops = {
                    "a": trainer_loop(name, batches, mesh, mesh_config, args, variant),
                    "b": fast_loop(name, images, mesh, mesh_config, args),
                }
            else:
                loops = {
                    "a": trainer_loop(name, batches, mesh, mesh_config, args, variant),
                    "b": bare_loop(name, batches, mesh, mesh_config, args, variant),
                }
                if variant == "base":
                    loops["c"] = nnx_loop(name, batches, mesh, mesh_config, args)
            rates, ratios = measure(loops, args.repeats, TIMERS[args.timer])
            line = f"{variant:>6} {name:>8}: (a) Trainer {rates['a']:7.1f} steps/s | (b) bare {rates['b']:7.1f}"
            if "c" in rates:
                line += f" | (c) nnx.jit {rates['c']:7.1f}"
            for key, values in ratios.items():
                line += f" | {key} = {statistics.median(values):.3f} [{min(values):.3f}..{max(values):.3f}]"
            print(line)
            sys.stdout.flush()


TIMERS = {"wall": time.perf_counter, "cpu": time.process_time}


def measure(loops: dict, repeats: int, timer=time.perf_counter) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Steps/s of each loop (median over repetitions) and the per-repetition ratios a/b, a/c.

    Repetitions are interleaved, in an order that alternates (a b c, c b a, ...), and ratios are
    taken within a repetition, so drift in the machine's load hits both sides of each ratio.
    One warm-up epoch per loop first (compilation).
    """
    for run_epoch in loops.values():
        run_epoch()
    rates: dict[str, list[float]] = {key: [] for key in loops}
    for repeat in range(repeats):
        order = list(loops) if repeat % 2 == 0 else list(reversed(loops))
        for key in order:
            start = timer()
            steps = loops[key]()
            rates[key].append(steps / (timer() - start))
    ratios = {f"a/{key}": [a / x for a, x in zip(rates["a"], rates[key], strict=True)] for key in loops if key != "a"}
    return {key: statistics.median(values) for key, values in rates.items()}, ratios


def _model(name: str):
    from flax import nnx

    from workshop_dist.models import ModelConfiguration, create_model

    return create_model(ModelConfiguration(**MODELS[name]), rngs=nnx.Rngs(0))


VARIANTS = {
    "base": [],
    "ema": ["training.ema.decay=0.999"],
    "accum4": ["training.performance.grad_accum_steps=4"],
    "fast": ["training.performance.data_on_device=true"],
}


def training_config(args, steps_per_epoch: int, variant: str = "base"):
    """The packaged default's training section (adam, clip-by-norm 10, cosine), sized for the benchmark."""
    from workshop_dist.cli import load_config

    overrides = [*VARIANTS[variant],
        f"training.batch_size={args.batch_size}",
        f"training.length.steps_per_epoch={steps_per_epoch}",
        "training.num_epochs=1000000",
        "training.cadence.log_every=100",
        "training.cadence.num_samples=0",
    ]
    if args.no_clip:
        overrides.append("training.optimizer.gradient_clip_norm=null")
    if variant == "fast":
        overrides.append(f"training.performance.steps_per_call={args.steps_per_call}")
    return load_config(None, overrides).training


def _tx(config):
    """The same optax transformation the Trainer builds from ``config``."""
    from workshop_dist.optim import create_optimizer, create_schedule

    total = config.num_epochs * config.length.steps_per_epoch
    schedule = create_schedule(config.scheduler, config.optimizer.learning_rate, total)
    return create_optimizer(config.optimizer, schedule)


def trainer_loop(name, batches, mesh, mesh_config, args, variant="base"):
    import logging

    from workshop_dist import Trainer
    from workshop_dist.metrics import Logger

    config = training_config(args, len(batches), variant)
    data = fast_data(args) if variant == "fast" else (lambda _: batches)
    quiet = Logger(None, level=logging.WARNING)
    trainer = Trainer(_model(name), config, data, None, workdir=None, logger=quiet, mesh=mesh, mesh_config=mesh_config)

    def run_epoch() -> int:
        before = trainer.step
        trainer.train_epoch()  # ends by reading the metrics, i.e. waits for the last step
        return trainer.step - before

    return run_epoch


def bare_state(name, mesh, mesh_config, tx, ema: bool):
    """Params and optimizer state placed like the Trainer's (plus an EMA copy when asked)."""
    import jax
    from flax import nnx

    from workshop_dist import parallel

    graphdef, params_state, rest = nnx.split(_model(name), nnx.Param, ...)
    params = nnx.to_pure_dict(params_state)
    shardings = parallel.parameter_shardings(params, nnx.to_pure_dict(nnx.get_partition_spec(params_state)), mesh, mesh_config)
    replicated = parallel.replicated(mesh)
    opt_shardings = parallel.optimizer_state_shardings(tx, jax.eval_shape(tx.init, params), shardings, replicated)
    params = parallel.place(params, shardings)
    state = (params, jax.jit(tx.init, out_shardings=opt_shardings)(params), parallel.place(params, shardings) if ema else None)
    return graphdef, nnx.to_pure_dict(rest), state, (shardings, opt_shardings, shardings if ema else None)


def bare_update(graphdef, rest, tx, key, accum: int, ema_decay: float | None):
    """One hand-written step: value_and_grad (over micro-batches), optax update, EMA."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    def grads_of(params, batch, rng):
        def loss_fn(p):
            return nnx.merge(graphdef, p, rest).loss(batch, rng)

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    def step(state, batch, step_index):
        params, opt_state, ema = state
        rng = jax.random.fold_in(key, step_index)
        if accum == 1:
            (loss, _), grads = grads_of(params, batch, rng)
        else:
            micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)

            def body(carry, inputs):
                (loss, _), grads = grads_of(params, inputs[1], jax.random.fold_in(rng, inputs[0]))
                return (jax.tree.map(jnp.add, carry[0], grads), carry[1] + loss), None

            zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros(()))
            (grads, loss), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
            grads, loss = jax.tree.map(lambda g: g / accum, grads), loss / accum
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if ema is not None:
            ema = optax.incremental_update(params, ema, 1.0 - ema_decay)
        return (params, opt_state, ema), loss

    return step


def bare_loop(name, batches, mesh, mesh_config, args, variant="base"):
    import jax

    from workshop_dist import parallel

    config = training_config(args, len(batches), variant)
    tx = _tx(config)
    graphdef, rest, state, shardings = bare_state(name, mesh, mesh_config, tx, config.ema.decay is not None)
    replicated = parallel.replicated(mesh)
    step = bare_update(graphdef, rest, tx, jax.random.PRNGKey(0), config.performance.grad_accum_steps, config.ema.decay)
    jitted = jax.jit(
        step,
        in_shardings=(shardings, parallel.batch_sharding(mesh), replicated),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )
    counter = [0]

    def run_epoch() -> int:
        nonlocal state
        queued = collections.deque()
        for host in batches:
            batch = parallel.host_batch_to_global(host, mesh)
            state, loss = jitted(state, batch, counter[0])
            counter[0] += 1
            queued.append(loss)
            if len(queued) > IN_FLIGHT:
                queued.popleft().block_until_ready()
        jax.block_until_ready(queued[-1])
        return len(batches)

    return run_epoch


def fast_data(args):
    """The digits tiled to ``steps`` batches per epoch: in memory, for data on the device."""
    import numpy as np

    images = digits_images()
    return np.concatenate([images] * (-(-args.steps * args.batch_size // len(images))))[: args.steps * args.batch_size]


def fast_loop(name, images, mesh, mesh_config, args):
    """The fastest hand-written loop: data on the mesh once, n steps per call (lax.scan), on-device gathers."""
    import jax
    import numpy as np

    from workshop_dist import parallel

    config = training_config(args, args.steps, "fast")
    tx = _tx(config)
    graphdef, rest, state, shardings = bare_state(name, mesh, mesh_config, tx, False)
    replicated = parallel.replicated(mesh)
    data = parallel.place(fast_data(args), replicated)
    step = bare_update(graphdef, rest, tx, jax.random.PRNGKey(0), 1, None)
    batch_sharding = parallel.batch_sharding(mesh)

    def steps(state, data, indices, first):
        def body(carry, index):
            state, count = carry
            batch = {"image": jax.lax.with_sharding_constraint(data[index], batch_sharding)}
            state, loss = step(state, batch, count)
            return (state, count + 1), loss

        (state, _), losses = jax.lax.scan(body, (state, first), indices)
        return state, losses

    jitted = jax.jit(steps, in_shardings=(shardings, replicated, replicated, replicated),
                     out_shardings=(shardings, replicated), donate_argnums=0)
    n = args.steps_per_call
    order = np.random.default_rng(0).permutation(args.steps * args.batch_size).reshape(-1, args.batch_size)
    counter = [0]

    def run_epoch() -> int:
        nonlocal state
        queued = collections.deque()
        for start in range(0, args.steps, n):
            indices = jax.device_put(order[start : start + n].astype(np.int32), replicated)
            state, losses = jitted(state, data, indices, np.int32(counter[0]))
            counter[0] += n
            queued.append(losses)
            if len(queued) > IN_FLIGHT:
                queued.popleft().block_until_ready()
        jax.block_until_ready(queued[-1])
        return args.steps

    return run_epoch


def nnx_loop(name, batches, mesh, mesh_config, args):
    import jax
    from flax import nnx

    from workshop_dist import parallel

    model = _model(name)
    params_state = nnx.state(model, nnx.Param)
    specs = nnx.to_pure_dict(nnx.get_partition_spec(params_state))
    shardings = parallel.parameter_shardings(nnx.to_pure_dict(params_state), specs, mesh, mesh_config)
    placed = parallel.place(nnx.to_pure_dict(params_state), shardings)
    nnx.replace_by_pure_dict(params_state, placed)
    nnx.update(model, params_state)
    optimizer = nnx.Optimizer(model, _tx(training_config(args, len(batches))), wrt=nnx.Param)
    key = jax.random.PRNGKey(0)

    @nnx.jit
    def step(model, optimizer, batch, step_index):
        def loss_fn(m):
            return m.loss(batch, jax.random.fold_in(key, step_index))

        (loss, _), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return loss

    counter = [0]

    def run_epoch() -> int:
        queued = collections.deque()
        for host in batches:
            queued.append(step(model, optimizer, parallel.host_batch_to_global(host, mesh), counter[0]))
            counter[0] += 1
            if len(queued) > IN_FLIGHT:
                queued.popleft().block_until_ready()
        jax.block_until_ready(queued[-1])
        return len(batches)

    return run_epoch


if __name__ == "__main__":
    main()
