"""The Trainer: the original design's API over one jitted, SPMD-partitioned train step.

Reading order: construction (mesh -> data -> optimizer -> sharded state -> jitted steps),
then the loop (:meth:`Trainer.train_epoch`), then evaluation, checkpoints and samples.
The device is never waited on per step: metrics stay on device and are read one log
interval late, and every log/eval/checkpoint decision uses a host-side step counter.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from workshop_dist import checkpoint as ckpt
from workshop_dist import hardware, parallel, samples
from workshop_dist.config import WorkshopError
from workshop_dist.metrics import Logger, MetricsLogger, ProgressBar, is_primary
from workshop_dist.optim import create_optimizer, create_schedule
from workshop_dist.parallel import MeshConfiguration
from workshop_dist.training import inputs
from workshop_dist.training.config import TrainingConfiguration
from workshop_dist.training.preemption import Preempted, PreemptionWatcher
from workshop_dist.training.state import TrainingState
from workshop_dist.training.step import (
    SAMPLE_STREAM,
    make_eval_step,
    make_eval_sums,
    make_loop_step,
    make_sample_fn,
    make_train_step,
)

LogCallback = Callable[[int, dict[str, float], str], None]


class NonFiniteLossError(WorkshopError):
    """The loss or gradient became NaN/Inf; the last good checkpoint is left untouched."""

    exit_code = 3


class Trainer:
    """Trains an ``nnx.Module`` with ``loss(batch, rng)`` / ``sample(rng, n)`` on a device mesh.

    ``train_data_loader`` may be a pipeline from :mod:`workshop_dist.data`, a seed-style
    callable ``loader(batch_size) -> iterator of batches``, or in-memory arrays. Batches are
    dicts of arrays (``{"image": ...}``); a bare array is taken as ``{"image": array}``.
    """

    def __init__(
        self,
        model: nnx.Module,
        training_config: TrainingConfiguration,
        train_data_loader: Any = None,
        val_data_loader: Any = None,
        workdir: str | Path | None = "./workdir",
        logger: Logger | None = None,
        metrics_logger: MetricsLogger | None = None,
        log_callback: LogCallback | None = None,
        *,
        mesh_config: MeshConfiguration | None = None,
        mesh: jax.sharding.Mesh | None = None,
        experiment_config: Mapping[str, Any] | None = None,
        preemption: PreemptionWatcher | None = None,
        progress_bar: bool = False,
    ):
        self.training_config = config = training_config
        self.workdir = Path(workdir) if workdir is not None else None
        self.log_callback = log_callback
        self.experiment_config = dict(experiment_config) if experiment_config is not None else None
        self.preemption = preemption
        self.logger = logger or Logger(self.workdir / "logs" if self.workdir else None)
        self.metrics_logger = metrics_logger or (
            MetricsLogger(self.workdir / "logs") if self.workdir else MetricsLogger("", enabled=False)
        )
        if self.experiment_config is not None:
            self.metrics_logger.log_hparams(self.experiment_config)
        self.progress_bar = progress_bar
        self._bar: ProgressBar | None = None

        # --- Mesh ------------------------------------------------------------------------
        self.mesh_config = mesh_config or MeshConfiguration()
        self.mesh = mesh or parallel.make_mesh(self.mesh_config)
        parallel.check_batch_size(config.batch_size, self.mesh)
        self.per_process_batch_size = config.batch_size // jax.process_count()

        # --- Data ------------------------------------------------------------------------
        self.train_input = inputs.as_train_input(train_data_loader, config, self.per_process_batch_size)
        self.val_data_loader = val_data_loader
        self.steps_per_epoch = config.steps_per_epoch or (self.train_input.steps_per_epoch if self.train_input else None)
        self.total_steps = config.total_steps(self.steps_per_epoch)

        # --- Optimizer and schedule ----------------------------------------------------
        self.schedule = create_schedule(config.scheduler, config.optimizer.learning_rate, self.total_steps)
        self.optimizer = create_optimizer(config.effective_optimizer(), self.schedule)

        # --- Sharded training state ----------------------------------------------------
        self.graphdef, params_state, model_state = nnx.split(model, nnx.Param, ...)
        logical_specs = nnx.to_pure_dict(nnx.get_partition_spec(params_state))
        params = nnx.to_pure_dict(params_state)
        replicated = parallel.replicated(self.mesh)
        param_shardings = parallel.parameter_shardings(params, logical_specs, self.mesh, self.mesh_config)
        opt_shapes = jax.eval_shape(self.optimizer.init, params)
        opt_shardings = parallel.optimizer_state_shardings(self.optimizer, opt_shapes, param_shardings, replicated)
        self.state_shardings = TrainingState(
            step=replicated,
            params=param_shardings,
            opt_state=opt_shardings,
            rng=replicated,
            best_loss=replicated,
            model_state=jax.tree.map(lambda _: replicated, nnx.to_pure_dict(model_state)),
        )
        placed_params = parallel.place(params, param_shardings)  # copies: the user's module stays usable
        self.state = TrainingState(
            step=parallel.place(np.int32(0), replicated),
            params=placed_params,
            opt_state=jax.jit(self.optimizer.init, out_shardings=opt_shardings)(placed_params),
            rng=parallel.place(jax.random.PRNGKey(config.seed), replicated),
            best_loss=parallel.place(np.float32(np.inf), replicated),
            model_state=parallel.place(nnx.to_pure_dict(model_state), replicated),
        )

        # --- Jitted steps ----------------------------------------------------------------
        self._batch_sharding = batch_sharding = parallel.batch_sharding(self.mesh)
        self._train_step = make_train_step(
            self.graphdef, self.optimizer, self.schedule, skip_nonfinite=config.nan_policy == "skip"
        )
        self.train_step_fn = jax.jit(  # (state, batch) -> (state, metrics), as in the original design
            self._train_step,
            in_shardings=(self.state_shardings, batch_sharding),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=0,
        )
        self._loop_step = None  # the loop's leaner form of the same step, built at the first batch
        self.metric_names: list[str] = []
        self.flops_per_step: float | None = None  # XLA's count for one step of the whole mesh
        self._peak_flops = hardware.peak_flops(self.mesh.devices.flat[0])
        self.validate_step_fn = jax.jit(
            make_eval_step(self.graphdef),
            in_shardings=(self.state_shardings, batch_sharding, replicated),
            out_shardings=replicated,
        )
        self._eval_sums = make_eval_sums(self.graphdef)
        self._sample_fn = jax.jit(make_sample_fn(self.graphdef), static_argnums=3, out_shardings=replicated)

        # --- Host-side bookkeeping ---------------------------------------------------------
        self.step = 0  # host mirror of state.step: decisions never read the device
        self.best_loss = float("inf")
        self.train_metrics: list[dict[str, float]] = []
        self.val_metrics: list[dict[str, float]] = []
        self.train_seconds = 0.0
        self._epochs_done = 0  # counts epochs when their length is unknown
        self._pending: list[jax.Array] = []  # per-step metric vectors not yet read
        self._queued: collections.deque[jax.Array] = collections.deque()  # one small output per queued step
        self._in_flight: tuple[int, jax.Array, int] | None = None  # (step, stacked metrics, count) being read
        self._interval_start = (0, time.perf_counter())
        self._data_seconds = 0.0  # time the loop waited for the input pipeline, this log interval
        self._device_seconds = 0.0  # time the loop waited for the device (steps queued ahead of it)
        self._created: float | None = time.perf_counter()  # until the first step of this process is done
        profile = config.profile_steps
        self._profile_marks = (profile[0], profile[0] + profile[1]) if profile and self.workdir else (-1, -1)
        self._last_eval_step = -1
        self._checkpoints: ckpt.CheckpointManager | None = None
        self.checkpoint_dir = (
            Path(config.checkpoint_dir) if config.checkpoint_dir else (self.workdir / "checkpoints" if self.workdir else None)
        )

    # ------------------------------------------------------------------------------------
    # Properties
    # ------------------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """Completed epochs (from the step count, so it survives a restart)."""
        return self.step // self.steps_per_epoch if self.steps_per_epoch else self._epochs_done

    @property
    def model(self) -> nnx.Module:
        """A new module with a copy of the current parameters (e.g. for custom inference).

        A copy, because the training step donates (deletes) the state's own buffers.
        """
        state = jax.tree.map(jnp.copy, (self.state.params, self.state.model_state))
        return nnx.merge(self.graphdef, *state)

    @property
    def train_step(self) -> Callable:
        return self.train_step_fn

    @property
    def validate_step(self) -> Callable:
        return self.validate_step_fn

    @property
    def checkpoints(self) -> ckpt.CheckpointManager:
        if self._checkpoints is None:
            if self.checkpoint_dir is None:
                raise WorkshopError("This trainer has no workdir/checkpoint_dir: pass a path to save_checkpoint().")
            self._checkpoints = ckpt.CheckpointManager(
                self.checkpoint_dir,
                max_to_keep=self.training_config.max_checkpoints,
                async_save=self.training_config.async_checkpointing,
                replica_parallel=self.training_config.replica_parallel_checkpoints,
            )
        return self._checkpoints

    # ------------------------------------------------------------------------------------
    # Training loop
    # ------------------------------------------------------------------------------------

    def fit(self) -> dict[str, float]:
        """Train for the configured epochs/steps with periodic validation; always checkpoint the end.

        Returns the last validation metrics (or the last epoch's training metrics).
        """
        config = self.training_config
        last: dict[str, float] = {}
        while self.epoch < config.num_epochs and not self.finished:
            # Epoch-end validation runs at the epoch's last step, before that step's checkpoint,
            # so a checkpoint always includes the evaluation (and best loss) of its own step.
            last = self._train_epoch(validate_at_end=config.eval_frequency is None)
            if config.eval_frequency is None and self._last_eval_step != self.step:
                last = self._validate_and_track() or last  # epoch length unknown in advance
        if self._last_eval_step != self.step:
            last = self._validate_and_track() or last
        if self.checkpoint_dir is not None:
            self.save_checkpoint()
            self.checkpoints.wait()
        return last

    @property
    def finished(self) -> bool:
        return self.total_steps is not None and self.step >= self.total_steps

    def train_epoch(self) -> dict[str, float]:
        """Train one epoch (the rest of it after a mid-epoch resume); return its averaged metrics.

        Validates every ``eval_frequency`` steps when that is set (``fit`` also validates at
        each epoch's end).
        """
        return self._train_epoch(validate_at_end=False)

    def _train_epoch(self, *, validate_at_end: bool) -> dict[str, float]:
        config = self.training_config
        epoch_end = self.steps_per_epoch if validate_at_end else None
        first = len(self.train_metrics) + len(self._pending) + (self._in_flight[2] if self._in_flight else 0)
        batches = self._epoch_batches()
        self._interval_start = (self.step, time.perf_counter())
        epoch_start = time.perf_counter()
        batch = next(batches, None)
        if batch is not None and self._loop_step is None:
            self._build_loop_step(batch)
        # Inside the loop the step-mutable part of the state lives in ``carry`` (its buffers are
        # donated to the next step); self.state is brought up to date where it is read.
        carry = self._carry()
        try:
            while batch is not None and not self.finished:
                carry, metrics = self._loop_step(carry, self.state.rng, batch)
                self.step += 1
                self._pending.append(metrics)
                self._bound_queue(metrics)
                if self._created is not None:
                    self._report_first_step(metrics)
                if self.step in self._profile_marks:
                    self._profile(metrics)
                if self._in_flight is not None:  # read the previous interval while this step runs
                    self._write_interval()
                if self.step % config.log_frequency == 0:
                    self._start_interval_read()
                evaluate = (bool(config.eval_frequency) and self.step % config.eval_frequency == 0) or (
                    bool(epoch_end) and self.step % epoch_end == 0
                )
                preempted = self.preemption is not None and self.preemption.reached(self.step)
                save = (self.step % config.save_frequency == 0 or preempted) and self.checkpoint_dir is not None
                if evaluate or save:
                    self._adopt_carry(carry)
                    if evaluate and self.val_data_loader is not None:
                        self._validate_and_track()
                    if save:
                        self.save_checkpoint()
                    carry = self._carry()
                if preempted:
                    if self.checkpoint_dir is not None:
                        self.checkpoints.wait()
                    self.logger.info("Checkpoint for step %d is on disk; exiting for preemption.", self.step)
                    raise Preempted(self.step, self.preemption.signal_name or "signal")
                batch = next(batches, None)  # fetch and transfer the next batch while the step runs
        finally:
            self._adopt_carry(carry)
        self._flush_metrics()
        self.train_seconds += time.perf_counter() - epoch_start
        self._epochs_done += 1
        return _average(self.train_metrics[first:])

    def _carry(self) -> tuple:
        state = self.state
        return (state.step, state.params, state.opt_state, state.model_state)

    def _adopt_carry(self, carry: tuple) -> None:
        step, params, opt_state, model_state = carry
        self.state = self.state.replace(step=step, params=params, opt_state=opt_state, model_state=model_state)

    def _build_loop_step(self, batch: dict[str, jax.Array]) -> None:
        self.metric_names = sorted(jax.eval_shape(self._train_step, self.state, batch)[1])
        shardings = self.state_shardings
        carry = (shardings.step, shardings.params, shardings.opt_state, shardings.model_state)
        self._loop_step = jax.jit(
            make_loop_step(self._train_step, self.metric_names),
            in_shardings=(carry, shardings.rng, self._batch_sharding),
            out_shardings=(carry, parallel.replicated(self.mesh)),
            donate_argnums=0,
        )
        cost = self._loop_step.lower(self._carry(), self.state.rng, batch).cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        self.flops_per_step = float(cost["flops"]) if cost and cost.get("flops") else None

    def lower_step(self, batch: dict[str, jax.Array]) -> jax.stages.Lowered:
        """The training step lowered for ``batch``'s shapes (e.g. to compile and inspect it)."""
        if self._loop_step is None:
            self._build_loop_step(batch)
        return self._loop_step.lower(self._carry(), self.state.rng, batch)

    def _report_first_step(self, marker: jax.Array) -> None:
        """Once per process: how long start-up took (compilation included), waiting for that step only."""
        marker.block_until_ready()
        self.logger.info("First step done (step %d), %.1f s after the trainer was created.", self.step, time.perf_counter() - self._created)
        self._created = None

    def _profile(self, marker: jax.Array) -> None:
        """Start or stop the jax.profiler trace of ``training.profile_steps``."""
        if self.step == self._profile_marks[0]:
            marker.block_until_ready()  # the trace starts at a step boundary
            jax.profiler.start_trace(str(self.workdir / "profile"))
            self.logger.info("Profiling steps %d-%d into %s", self.step + 1, self._profile_marks[1], self.workdir / "profile")
        else:
            marker.block_until_ready()
            jax.profiler.stop_trace()
            self.logger.info("Profile written to %s (open with TensorBoard's profile plugin or XProf)", self.workdir / "profile")

    def _bound_queue(self, marker: jax.Array) -> None:
        """Wait for the step ``max_steps_in_flight`` back to finish (not the one just queued)."""
        self._queued.append(marker)
        if len(self._queued) > self.training_config.max_steps_in_flight:
            wait_start = time.perf_counter()
            self._queued.popleft().block_until_ready()
            self._device_seconds += time.perf_counter() - wait_start  # the device had work queued

    def _epoch_batches(self) -> Iterator[dict[str, jax.Array]]:
        """This epoch's batches, placed on the mesh (a resumed epoch yields only its remainder)."""
        if self.train_input is None:
            raise WorkshopError("No training data: pass train_data_loader to the Trainer.")
        done = self.step % self.steps_per_epoch if self.steps_per_epoch else 0
        remaining = self.steps_per_epoch - done if self.steps_per_epoch else None
        host_batches = self.train_input.epoch(remaining, skip=done)
        while True:
            wait_start = time.perf_counter()
            host_batch = next(host_batches, None)
            self._data_seconds += time.perf_counter() - wait_start  # blocked on the input pipeline
            if host_batch is None:
                return
            yield parallel.host_batch_to_global(host_batch, self.mesh)

    # ------------------------------------------------------------------------------------
    # Metrics: read from the device one interval late, so the device never waits
    # ------------------------------------------------------------------------------------

    def _start_interval_read(self) -> None:
        stacked = jnp.stack(self._pending)  # [steps, metrics]: one transfer per interval
        stacked.copy_to_host_async()
        self._in_flight = (self.step, stacked, len(self._pending))
        self._pending = []

    def _write_interval(self) -> None:
        step, stacked, count = self._in_flight
        self._in_flight = None
        host = np.asarray(jax.device_get(stacked))
        first_step = step - count + 1
        rows = [
            {"step": first_step + i, **dict(zip(self.metric_names, map(float, values), strict=True))}
            for i, values in enumerate(host)
        ]
        self.train_metrics.extend(rows)
        self._check_finite(rows)
        start_step, start_time = self._interval_start
        now = time.perf_counter()
        summary = _average(rows)
        elapsed = max(now - start_time, 1e-9)
        summary["step_time"] = elapsed / max(step - start_step, 1)
        summary["examples_per_second"] = (step - start_step) * self.training_config.batch_size / elapsed
        summary["data_wait_time"] = self._data_seconds / max(step - start_step, 1)  # per step
        summary["device_wait_time"] = self._device_seconds / max(step - start_step, 1)
        self._data_seconds = self._device_seconds = 0.0
        if self.flops_per_step and self._peak_flops:
            summary["mfu"] = self.flops_per_step / summary["step_time"] / (self._peak_flops * self.mesh.devices.size)
        self._interval_start = (step, now)
        self._log(step, summary, "train")

    def _flush_metrics(self) -> None:
        """Read everything still on the device (end of an epoch, before a save or an eval)."""
        if self._in_flight is not None:
            self._write_interval()
        if self._pending:
            self._start_interval_read()
            self._write_interval()

    def _check_finite(self, rows: list[dict[str, float]]) -> None:
        bad = [row for row in rows if row["nonfinite"] > 0]
        if not bad:
            return
        row = bad[0]
        culprit = next((k for k, v in row.items() if not np.isfinite(v)), "grad_norm")
        if self.training_config.nan_policy == "stop":
            raise NonFiniteLossError(
                f"Non-finite {culprit} ({row[culprit]}) at step {row['step']}: training stopped and the last "
                "checkpoint was left untouched. Lower the learning rate, add gradient clipping "
                "(training.gradient_clip_norm), or set training.nan_policy=skip to skip such updates."
            )
        self.logger.warning("Skipped %d update(s) with non-finite %s (first at step %d).", len(bad), culprit, row["step"])

    def _log(self, step: int, metrics: dict[str, float], prefix: str) -> None:
        self.metrics_logger.log_metrics(step, metrics, prefix)
        if self.log_callback is not None:
            self.log_callback(step, metrics, prefix)
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k in ("loss", "learning_rate", "examples_per_second"))
        on_bar = prefix == "train" and self.progress_bar and is_primary()
        if on_bar:
            if self._bar is None:
                self._bar = ProgressBar(self.total_steps, initial=step)
            self._bar.update(step, self.epoch, metrics)
        self.logger.info("%s step %d: %s", prefix, step, shown, console=not on_bar)

    # ------------------------------------------------------------------------------------
    # Evaluation and samples
    # ------------------------------------------------------------------------------------

    def evaluate(self, data: Any = None, batch_size: int | None = None) -> dict[str, float]:
        """Average loss and model metrics over ``data`` (default: the validation loader).

        Every example counts exactly once: the last partial batch is padded and masked.
        Returns the metrics plus ``num_examples``.
        """
        data = self.val_data_loader if data is None else data
        if data is None:
            raise WorkshopError("No evaluation data: pass data to evaluate() or val_data_loader to the Trainer.")
        batch_size = inputs.round_up(batch_size or self.training_config.batch_size, parallel.data_parallel_size(self.mesh))
        totals = None
        for host_batch in inputs.eval_batches(data, batch_size // jax.process_count()):
            batch = parallel.host_batch_to_global(host_batch, self.mesh)
            if totals is None:
                shapes = jax.eval_shape(self._eval_sums, self.state, batch, 0)
                zeros = {key: np.zeros(shape.shape, shape.dtype) for key, shape in shapes.items()}
                zeros["num_batches"] = np.zeros((), np.float32)
                totals = parallel.place(zeros, {key: parallel.replicated(self.mesh) for key in zeros})
            totals = self.validate_step_fn(self.state, batch, totals)
            self._bound_queue(totals["num_examples"])
        if totals is None:
            raise WorkshopError("Evaluation data is empty.")
        sums = {key: float(value) for key, value in jax.device_get(totals).items()}
        count = sums.pop("num_examples")
        sums.pop("num_batches")
        return {**{key: value / count for key, value in sums.items()}, "num_examples": int(count)}

    def _validate_and_track(self) -> dict[str, float] | None:
        """Periodic validation: log, update the best loss, keep the best checkpoint."""
        if self.val_data_loader is None:
            return None
        self._flush_metrics()
        metrics = self.evaluate()
        self._last_eval_step = self.step
        self.val_metrics.append({"step": self.step, **metrics})
        self._log(self.step, metrics, "val")
        self.write_samples()
        if metrics["loss"] < self.best_loss:
            self.best_loss = metrics["loss"]
            self.state = self.state.replace(best_loss=parallel.place(np.float32(self.best_loss), parallel.replicated(self.mesh)))
            if self.checkpoint_dir is not None:
                self.save_checkpoint(val_loss=self.best_loss)
        return metrics

    def write_samples(self) -> Path | None:
        """Sample grid of ``training.num_samples`` images: ``WORKDIR/samples/step_<N>.png`` and TensorBoard.

        Every process must call this (sampling runs on the whole mesh); only the primary writes.
        """
        count = self.training_config.num_samples
        if count == 0 or self.workdir is None:
            return None
        grid = samples.image_grid(self.generate_samples(count))
        path = self.workdir / "samples" / f"step_{self.step}.png"
        if is_primary():
            samples.save_png(grid, path)
            self.metrics_logger.log_images(self.step, {"samples": grid[None]})
        return path

    def generate_samples(self, num_samples: int, seed: int | None = None) -> np.ndarray:
        """``num_samples`` samples from the model as a numpy array (same samples for the same seed)."""
        rng = jax.random.fold_in(self.state.rng, SAMPLE_STREAM) if seed is None else jax.random.PRNGKey(seed)
        samples = self._sample_fn(self.state.params, self.state.model_state, rng, num_samples)
        return np.asarray(jax.device_get(samples))

    # ------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------

    def _metadata(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "examples_seen": self.step * self.training_config.batch_size,
            "train_seconds": self.train_seconds,
            "saved_at": time.time(),
            "best_loss": self.best_loss if np.isfinite(self.best_loss) else None,
            "process_count": jax.process_count(),
            "mesh": dict(self.mesh.shape),
        }

    def save_checkpoint(self, path: str | Path | None = None, *, val_loss: float | None = None) -> Path | None:
        """Save the full training state.

        With ``path``: write that directory now (a ``.pkl`` name is just a directory name).
        Without: start an async save of this step under ``WORKDIR/checkpoints/<step>``.
        """
        self._flush_metrics()  # never checkpoint a state whose metrics say it is broken
        data_iterator = self.train_input.checkpointable_iterator if self.train_input else None
        if path is not None:
            return ckpt.save_checkpoint_dir(
                path, self.state, metadata=self._metadata(), config=self.experiment_config, data_iterator=data_iterator
            )
        metrics = {ckpt.BEST_METRIC: val_loss} if val_loss is not None else None
        self.checkpoints.save(
            self.step,
            self.state,
            metadata=self._metadata(),
            config=self.experiment_config,
            data_iterator=data_iterator,
            metrics=metrics,
        )
        return self.checkpoint_dir / str(self.step)

    def _abstract_state(self) -> TrainingState:
        return jax.tree.map(
            lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), self.state, self.state_shardings
        )

    def load_checkpoint(self, path: str | Path) -> None:
        """Load a checkpoint directory (from :meth:`save_checkpoint` or a run's ``checkpoints/<step>``)."""
        data_iterator = self.train_input.checkpointable_iterator if self.train_input else None
        state, metadata, data_restored = ckpt.load_checkpoint_dir(
            path, self._abstract_state(), data_iterator=data_iterator
        )
        self._adopt(state, metadata, data_restored)

    def restore(self, step: int | None = None) -> int | None:
        """Continue from the latest readable checkpoint in the checkpoint dir (or ``step``).

        Returns the restored step, or None when there is nothing to restore.
        """
        if self.checkpoint_dir is None or not self.checkpoints.all_steps():
            return None
        data_iterator = self.train_input.checkpointable_iterator if self.train_input else None
        state, metadata, restored, data_restored = self.checkpoints.restore(
            self._abstract_state(), data_iterator=data_iterator, step=step
        )
        self._adopt(state, metadata, data_restored)
        return restored

    def _adopt(self, state: TrainingState, metadata: Mapping[str, Any], data_restored: bool) -> None:
        self.state = state
        self.step = int(jax.device_get(state.step))
        self.best_loss = float(jax.device_get(state.best_loss))
        self.train_seconds = float(metadata.get("train_seconds", 0.0))
        self._epochs_done = int(metadata.get("epoch", 0))
        self._last_eval_step = -1
        self._pending, self._in_flight = [], None
        if self.train_input is not None and not data_restored:
            self.train_input.seek(self.step)

    def close(self) -> None:
        """Finish pending saves and flush metric writers."""
        self._flush_metrics()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._checkpoints is not None:
            self._checkpoints.close()
        self.metrics_logger.close()


def _average(rows: Iterable[Mapping[str, float]]) -> dict[str, float]:
    rows = list(rows)
    if not rows:
        return {}
    keys = [key for key in rows[0] if key != "step"]
    return {key: float(np.mean([row[key] for row in rows])) for key in keys}
