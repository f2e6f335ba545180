"""``workshop-train``: train from a YAML config plus ``section.field=value`` overrides.

With no arguments it trains the packaged default (``configs/vae_digits.yaml``) on all local
devices and writes to ``./workdir``. Running the same command again resumes.

Exit codes: 0 done; 1 runtime user error (data, checkpoint); 2 configuration error;
3 non-finite loss; 75 preempted after a successful checkpoint (rerun to resume); 130 interrupted
before any checkpoint could be written.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings
from importlib import resources
from pathlib import Path

DEFAULT_CONFIG = "vae_digits.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="workshop-train",
        description="Train a generative model. Overrides look like training.optimizer.learning_rate=3e-4.",
    )
    parser.add_argument("--config", help="YAML or JSON config (default: the packaged vae_digits.yaml).")
    parser.add_argument("--workdir", default="./workdir", help="Checkpoints, logs and samples go here (a directory or gs://bucket/path).")
    parser.add_argument("--restore", metavar="PATH", help="Start from this checkpoint directory (if WORKDIR has none).")
    parser.add_argument("--print-config", action="store_true", help="Print the resolved config as YAML and exit.")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="Build everything and compile one step; print parameters, per-device memory and FLOPs; exit.",
    )
    parser.add_argument(
        "--target",
        metavar="tpu:TYPE-N[xSLICES]",
        help="With --dry-run: compile the step for this TPU slice on this machine (e.g. tpu:v5p-128, "
        "tpu:v5e-256x2); print per-chip memory, FLOPs and a step-time estimate. Needs workshop-dist[tpu-aot].",
    )
    parser.add_argument("--plot-schedule", metavar="OUT.png", help="Plot the learning rate over the run and exit.")
    parser.add_argument(
        "--report", metavar="WORKDIR", help="Print the run report of WORKDIR (steps, restarts, time, goodput) and exit."
    )
    parser.add_argument(
        "--posthoc-ema", metavar="WORKDIR",
        help="Reconstruct the EMA of each --sigma-rel from WORKDIR's post-hoc EMA snapshots (EDM2) into "
        "checkpoints WORKDIR/posthoc_ema/sigma_rel_<w> that --restore, evaluation and sampling take; exit.",
    )  # fmt: skip
    parser.add_argument("--sigma-rel", metavar="W1,W2,...", help="With --posthoc-ema: the widths to reconstruct.")
    parser.add_argument("--quiet", action="store_true", help="Only warnings and errors.")
    parser.add_argument("--verbose", action="store_true", help="Debug logging.")
    parser.add_argument("--debug", action="store_true", help="Show tracebacks for user errors.")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value")
    return parser


def default_config_path() -> Path:
    return Path(str(resources.files("workshop_dist") / "configs" / DEFAULT_CONFIG))


def load_config(path: str | None, overrides: list[str]):
    """The validated experiment configuration (the packaged default when ``path`` is None)."""
    from workshop_dist.experiment import ExperimentConfiguration

    return ExperimentConfiguration.load(path or default_config_path(), overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # Show the configuration's deprecation notices (old field names) to the person running the command.
    warnings.filterwarnings("default", message=r".* is deprecated and will be removed", category=DeprecationWarning)
    from workshop_dist.backends import skip_idle_tpu_backend

    skip_idle_tpu_backend()  # before JAX starts its backends: libtpu off a TPU host stays silent
    from workshop_dist.config import WorkshopError
    from workshop_dist.training.preemption import EXIT_PREEMPTED, Preempted

    try:
        return run(args)
    except WorkshopError as err:
        if args.debug:
            traceback.print_exc()
        print(f"workshop-train: error: {err}", file=sys.stderr)
        return err.exit_code
    except Preempted as stop:
        print(f"workshop-train: {stop}. Run the same command again to resume.", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        print("workshop-train: interrupted.", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    if args.report:  # reads only the workdir: no config, no devices
        from workshop_dist.report import print_report

        return print_report(args.report)
    if args.posthoc_ema:
        return posthoc_ema(args)
    config = load_config(args.config, args.overrides)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    if args.target:  # ahead of time, for devices this machine does not have
        from workshop_dist.aot import dry_run_target
        from workshop_dist.config import ConfigError

        if not args.dry_run:
            raise ConfigError("--target compiles for hardware this machine does not have: use it with --dry-run.")
        return dry_run_target(config, args.target)

    from workshop_dist import distributed

    distributed.initialize(config.distributed)  # before anything else touches the devices
    from workshop_dist import compilation, data, parallel, storage

    compilation.enable_cache(config.compilation)
    from workshop_dist.metrics import Logger
    from workshop_dist.training import Trainer

    training = config.training
    train_input = data.make_train_input(config.data, global_batch_size=training.batch_size, seed=training.seed)
    if args.plot_schedule:
        return plot_schedule(training, train_input.steps_per_epoch, Path(args.plot_schedule))

    workdir = storage.as_path(args.workdir)  # a local directory or gs://bucket/path
    lock = None
    if not args.dry_run:  # before anything is written there: one message, not tracebacks at the first save
        from workshop_dist import preflight, workdir_lock

        preflight.check_storage(workdir, config.data.data_dir)
        lock = workdir_lock.hold_workdir(workdir, timeout=training.checkpoint.lock_timeout)  # one job per workdir
    try:
        level = config.logging.console_level(quiet=args.quiet, verbose=args.verbose)  # the flags win
        logger = Logger(None if args.dry_run else workdir / "logs", level=level)
        mesh = parallel.make_mesh(config.mesh)
        parallel.check_batch_size(training.batch_size, mesh)
        logger.info(distributed.topology_summary(mesh, training.batch_size // _process_count()))
        if args.dry_run:  # the model built abstractly, initialised straight into its shardings
            trainer = Trainer(config.model, training, train_input, None, None, logger=logger, mesh=mesh,
                              mesh_config=config.mesh)
            return dry_run(trainer, next(train_input))
        return _train(args, config, workdir, train_input, logger, mesh, level >= logging.WARNING)
    finally:
        if lock is not None:
            lock.release()


def _train(args, config, workdir, train_input, logger, mesh, quiet: bool) -> int:
    """Build the Trainer, resume or start, train, and say where everything went."""
    from workshop_dist import data, distributed, resume, storage
    from workshop_dist.metrics import MetricsLogger
    from workshop_dist.training import Trainer
    from workshop_dist.training.preemption import PreemptionWatcher

    plan = resume.plan(config, workdir, train_input.steps_per_epoch)  # before the Trainer builds its schedules
    resume.log_changes(plan, logger)
    if plan.finished:  # nothing is built, trained or written
        primary = distributed.is_primary()
        distributed.shutdown()
        if primary and not quiet:
            print(plan.finished_message())
        return 0
    config = plan.config  # an extended run's schedule keeps its length: the learning rate stays continuous
    training, model = config.training, config.model
    val_input = data.make_eval_input(config.data, global_batch_size=training.batch_size)
    watcher = PreemptionWatcher().install()
    trainer = Trainer(
        model,
        training,
        train_input,
        val_input,
        workdir,
        logger=logger,
        metrics_logger=MetricsLogger(workdir / "logs", config=config.logging),
        mesh=mesh,
        mesh_config=config.mesh,
        experiment_config=config.model_dump(mode="json"),
        eval_config=config.eval,
        preemption=watcher,
        progress_bar=sys.stderr.isatty() and not quiet,
    )
    try:
        _resume_or_start(trainer, training, args.restore or training.checkpoint.restore_from, logger)
        start = trainer.step
        if distributed.is_primary():
            if not storage.is_remote(workdir):  # a bucket has no directories to make
                workdir.mkdir(parents=True, exist_ok=True)
            config.save(workdir / "config.yaml")
            if config.data.source.startswith("images:"):  # label i = the i-th class folder's name
                from workshop_dist.data.images import write_label_map

                write_label_map(config.data, workdir)
        trainer.fit()
        final = trainer.write_samples()
    finally:
        trainer.close()
        watcher.uninstall()
        distributed.shutdown()
    if distributed.is_primary() and not quiet:
        print(f"Trained {trainer.step - start} steps ({start} -> {trainer.step}). Outputs in {workdir}:")
        print(f"  checkpoints  {trainer.checkpoint_dir}/<step>/  (latest: {trainer.checkpoints.latest_step()})")
        print(f"  metrics      {workdir / 'logs' / 'metrics.jsonl'}  (TensorBoard: tensorboard --logdir {workdir / 'logs'})")
        if final is not None:
            print(f"  samples      {final}")
        print(f"  config       {workdir / 'config.yaml'}")
    return 0


def posthoc_ema(args: argparse.Namespace) -> int:
    """``--posthoc-ema WORKDIR --sigma-rel ...``: the run's latest checkpoint with its params replaced by
    each reconstructed EMA, one checkpoint directory per width."""
    from workshop_dist import distributed, parallel, resume_config, storage
    from workshop_dist.config import ConfigError
    from workshop_dist.experiment import ExperimentConfiguration
    from workshop_dist.metrics import Logger
    from workshop_dist.training import Trainer
    from workshop_dist.training.posthoc_ema import write_reconstructions

    try:
        widths = [float(w) for w in (args.sigma_rel or "").split(",") if w.strip()]
    except ValueError:
        widths = []
    if not widths:
        raise ConfigError("--posthoc-ema needs --sigma-rel W1,W2,... (relative EMA widths, e.g. 0.05,0.1)")
    workdir = storage.as_path(args.posthoc_ema)
    saved = resume_config.saved_config(workdir / "checkpoints")
    if saved is None:
        raise ConfigError(f"{workdir / 'checkpoints'} holds no complete checkpoint with its config: nothing to reconstruct.")
    config = ExperimentConfiguration.from_dict(saved[1], args.overrides)
    distributed.initialize(config.distributed)
    logger = Logger(None, level=logging.WARNING if args.quiet else logging.INFO)
    mesh = parallel.make_mesh(config.mesh)
    from workshop_dist import data

    train_input = data.make_train_input(config.data, global_batch_size=config.training.batch_size,
                                        seed=config.training.seed)  # the run's length, for its schedules
    trainer = Trainer(config.model, config.training, train_input, None, workdir, logger=logger, mesh=mesh,
                      mesh_config=config.mesh, experiment_config=config.model_dump(mode="json"))
    try:
        trainer.restore()
        paths = write_reconstructions(trainer, widths)
    finally:
        trainer.close()
    if distributed.is_primary():
        for width, path in zip(widths, paths, strict=True):
            print(f"sigma_rel={width:g}: {path}  (use it with --restore {path})")
    return 0


def plot_schedule(training, steps_per_epoch: int | None, out: Path) -> int:
    """The learning rate at every step of the run, as a PNG (like the original visualize_schedule)."""
    import jax
    import jax.numpy as jnp
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from workshop_dist.optim import create_schedule

    total = training.total_steps(steps_per_epoch)
    schedule = create_schedule(training.scheduler, training.optimizer.learning_rate, total)
    steps = jnp.arange(total + 1)
    rates = jax.vmap(schedule)(steps)
    kind = training.scheduler.scheduler_type if training.scheduler else "constant"
    figure, axes = plt.subplots(figsize=(10, 4))
    axes.plot(steps, rates)
    axes.set(xlabel="Step", ylabel="Learning rate", title=f"{kind} schedule ({total} steps)")
    axes.grid(True)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(figure)
    print(f"Learning-rate schedule over {total} steps written to {out}")
    return 0


def dry_run(trainer, host_batch: dict) -> int:
    """Compile one training step and report what a real run would need; train nothing."""
    import time
    from collections import defaultdict

    import jax

    from workshop_dist import parallel

    batch = parallel.host_batch_to_global(host_batch, trainer.mesh)
    start = time.perf_counter()
    compiled = trainer.lower_step(batch).compile()
    compile_seconds = time.perf_counter() - start
    per_device: dict[str, defaultdict] = {"state": defaultdict(int), "batch": defaultdict(int)}
    for name, tree in (("state", trainer.state), ("batch", batch)):
        for leaf in jax.tree.leaves(tree):
            for shard in leaf.addressable_shards:
                per_device[name][shard.device] += shard.data.nbytes
    parameters = sum(leaf.size for leaf in jax.tree.leaves(trainer.state.params))
    memory = compiled.memory_analysis()
    flops = trainer.flops_per_step
    lines = [
        f"parameters           {parameters:,}",
        f"state per device     {max(per_device['state'].values()) / 2**20:.2f} MiB "
        f"(params, optimizer state, rng, step; {len(jax.tree.leaves(trainer.state))} arrays)",
        f"batch per device     {max(per_device['batch'].values()) / 2**20:.3f} MiB (global batch {trainer.training_config.batch_size})",
        f"FLOPs per step       {flops:.4g} (whole mesh, XLA cost analysis)" if flops else "FLOPs per step       unknown",
        f"compile time         {compile_seconds:.2f} s",
        f"mesh                 {dict(trainer.mesh.shape)} over {trainer.mesh.devices.size} {jax.devices()[0].device_kind} devices",
        f"steps                {trainer.total_steps} ({trainer.steps_per_epoch} per epoch)",
    ]
    if memory is not None and getattr(memory, "temp_size_in_bytes", None) is not None:
        lines.insert(3, f"step scratch memory  {memory.temp_size_in_bytes / 2**20:.2f} MiB per device (XLA)")
    print("Dry run: one step compiled, nothing trained or written.\n" + "\n".join("  " + line for line in lines))
    return 0


def _resume_or_start(trainer, training, restore_path: str | None, logger) -> None:
    """Auto-resume from WORKDIR, refuse to overwrite when resume=false, else start (maybe from a path)."""
    from workshop_dist.config import ConfigError

    existing = trainer.checkpoints.all_steps()
    if existing and not training.checkpoint.resume:
        raise ConfigError(
            f"{trainer.checkpoint_dir} already holds checkpoints (latest step {existing[-1]}) and "
            "training.checkpoint.resume=false: refusing to overwrite them. Use a new --workdir, delete the old "
            "one, or drop training.checkpoint.resume=false to continue that run."
        )
    if existing:
        step = trainer.restore()
        logger.info("Resumed from %s/%d (step %d).", trainer.checkpoint_dir, step, trainer.step)
    elif restore_path:
        trainer.load_checkpoint(restore_path)
        logger.info("Started from checkpoint %s (step %d).", restore_path, trainer.step)


def _process_count() -> int:
    import jax

    return jax.process_count()


if __name__ == "__main__":  # guarded: Grain worker processes re-import __main__
    sys.exit(main())
