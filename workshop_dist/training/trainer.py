"""The Trainer: the original design's API over the engine, the loop, evaluation and checkpoints.

Reading order: :mod:`~workshop_dist.training.engine` (sharded state, compiled step),
:mod:`~workshop_dist.training.loop` (the epoch, top to bottom), then the pieces here that the
loop's periodic actions call (metrics, evaluation and samples, checkpoints).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from workshop_dist import hardware, parallel, storage
from workshop_dist.config import WorkshopError
from workshop_dist.metrics import Logger, MetricsLogger, ProgressBar, is_primary
from workshop_dist.parallel import MeshConfiguration
from workshop_dist.runlog import RunLog
from workshop_dist.training import evaluation, inputs, loop
from workshop_dist.training.checkpointing import CheckpointMixin
from workshop_dist.training.config import TrainingConfiguration
from workshop_dist.training.engine import Engine
from workshop_dist.training.preemption import Preempted, PreemptionWatcher
from workshop_dist.training.reporting import StepMetrics, average

LogCallback = Callable[[int, dict[str, float], str], None]


class NonFiniteLossError(WorkshopError):
    """The loss or gradient became NaN/Inf; the last good checkpoint is left untouched."""

    exit_code = 3


class Trainer(CheckpointMixin):
    """Trains a model (see :mod:`workshop_dist.models.base`) on a device mesh.

    ``train_data_loader`` may be a pipeline from :mod:`workshop_dist.data`, a seed-style
    callable ``loader(batch_size) -> iterator of batches``, or in-memory arrays. Batches are
    dicts of arrays (``{"image": ..., "label": ...}``); a bare array is ``{"image": array}``.
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
        self.workdir = storage.as_path(workdir, absolute=False) if workdir is not None else None  # local or gs://
        self.log_callback, self.preemption, self.progress_bar = log_callback, preemption, progress_bar
        self.experiment_config = dict(experiment_config) if experiment_config is not None else None
        self.logger = logger or Logger(self.workdir / "logs" if self.workdir else None)
        self.metrics_logger = metrics_logger or (
            MetricsLogger(self.workdir / "logs") if self.workdir else MetricsLogger("", enabled=False)
        )
        if self.experiment_config is not None:
            self.metrics_logger.log_hparams(self.experiment_config)
        self._bar: ProgressBar | None = None

        # --- Mesh and data ------------------------------------------------------------------
        self.mesh_config = mesh_config or MeshConfiguration()
        self.mesh = mesh or parallel.make_mesh(self.mesh_config)
        parallel.check_batch_size(config.batch_size, self.mesh)
        parallel.check_batch_size(config.batch_size // config.grad_accum_steps, self.mesh)
        self.per_process_batch_size = config.batch_size // jax.process_count()
        self.train_input = inputs.as_train_input(train_data_loader, config, self.per_process_batch_size)
        self.val_data_loader = val_data_loader
        self.steps_per_epoch = config.steps_per_epoch or (self.train_input.steps_per_epoch if self.train_input else None)
        self.total_steps = config.total_steps(self.steps_per_epoch)

        # --- Engine: sharded state and compiled functions --------------------------------------
        self.engine = Engine(model, config, self.mesh, self.mesh_config, self.total_steps)
        self.schedule = self.engine.schedule
        self.state = self.engine.initial_state
        self.state_shardings = self.engine.state_shardings
        self.device_data = self._stage_device_data() if config.data_on_device else None

        # --- Bookkeeping (host side: decisions never read the device) -------------------------
        peak = hardware.peak_flops(self.mesh.devices.flat[0])
        self.metrics = StepMetrics(
            batch_size=config.batch_size,
            peak_flops=peak * self.mesh.devices.size if peak else None,
            max_in_flight=config.max_steps_in_flight,
        )
        self.step = 0
        self.epochs_done = 0  # counts epochs when their length is unknown
        self.train_seconds = 0.0
        self.val_metrics: list[dict[str, float]] = []
        self._best_loss = float("inf")  # host copy of state.best_loss
        self._created: float | None = time.perf_counter()
        profile = config.profile_steps
        self.profile_marks = (profile[0], profile[0] + profile[1]) if profile and self.workdir else ()
        self.last_eval_step = -1
        self.last_save_step = -1
        self.restored_from: int | None = None
        self.init_checkpoints()
        # The run log (WORKDIR/logs/run_events.jsonl): where the time went, for ``--report``.
        self.runlog = RunLog(self.workdir, enabled=is_primary()) if self.workdir else None
        if self.runlog is not None:
            kinds = {"train": "train", "checkpoint": "save", "sample": "sample", "compile": "compile"}
            self.metrics.on_time = lambda kind, seconds: kind in kinds and self.runlog.timed(kinds[kind], seconds, self.step)

    # --- Properties -----------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """Completed epochs (from the step count, so it survives a restart)."""
        return self.step // self.steps_per_epoch if self.steps_per_epoch else self.epochs_done

    @property
    def finished(self) -> bool:
        return self.total_steps is not None and self.step >= self.total_steps

    @property
    def best_loss(self) -> float:
        return self._best_loss

    @property
    def train_metrics(self) -> list[dict[str, float]]:
        return self.metrics.rows

    @property
    def metric_names(self) -> list[str]:
        return self.engine.metric_names

    @property
    def flops_per_step(self) -> float | None:
        return self.metrics.flops_per_step

    @property
    def first_step_pending(self) -> bool:
        return self._created is not None

    @property
    def model(self) -> nnx.Module:
        """A new module with a copy of the current parameters (the step donates the state's own buffers)."""
        params, model_state = jax.tree.map(jnp.copy, (self.state.params, self.state.model_state))
        return self.engine.calls.merge(params, model_state, training=None)

    @property
    def train_step_fn(self) -> Callable:
        """``(state, batch) -> (state, metrics)``: the loop's compiled step, one step per call."""

        def train_step(state: Any, batch: Mapping[str, Any]) -> tuple[Any, dict[str, jax.Array]]:
            batch = inputs.as_batch(batch)
            if not all(isinstance(v, jax.Array) and not v.is_fully_addressable for v in batch.values()):
                batch = parallel.host_batch_to_global({k: np.asarray(v) for k, v in batch.items()}, self.mesh)
            stacked = {key: value[None] for key, value in batch.items()}
            if not self.engine.metric_names:
                self.engine.build(batch)
                self.on_build(batch)
            state, metrics = self.engine.train_steps(state, stacked)
            return state, dict(zip(self.engine.metric_names, metrics[0], strict=True))

        return train_step

    train_step = train_step_fn

    # --- Training ---------------------------------------------------------------------------

    def fit(self) -> dict[str, float]:
        """Train the configured epochs/steps with periodic validation; always checkpoint the end."""
        if self.runlog is not None:
            self.runlog.started(
                self.step,
                self.total_steps,
                self.restored_from,
                examples_per_step=self.training_config.batch_size,
                process_count=jax.process_count(),
                checkpoint_dir=self.checkpoint_dir if self.training_config.checkpoint.directory else None,
            )
        try:
            last = self._fit()
        except Preempted:
            self._ended("preempted")
            raise
        except BaseException as err:
            self._ended("error", f"{type(err).__name__}: {err}")
            raise
        self._ended("finished")
        return last

    def _ended(self, reason: str, detail: str | None = None) -> None:
        if self.runlog is not None:
            self.runlog.ended(self.step, reason, detail)

    def _fit(self) -> dict[str, float]:
        config = self.training_config
        last: dict[str, float] = {}
        while self.epoch < config.num_epochs and not self.finished:
            # Epoch-end validation runs at the epoch's last step, before that step's checkpoint.
            last = self._train_epoch(validate_at_end=config.eval_frequency is None)
            if config.eval_frequency is None and self.last_eval_step != self.step:
                last = self.validate_and_track() or last  # epoch length unknown in advance
        if self.last_eval_step != self.step:
            last = self.validate_and_track() or last
        if self.checkpoint_dir is not None:
            if self.last_save_step != self.step:
                self.save_checkpoint()
            self.checkpoints.wait()
        return last

    def train_epoch(self) -> dict[str, float]:
        """Train one epoch (the rest of it after a mid-epoch resume); return its averaged metrics."""
        return self._train_epoch(validate_at_end=False)

    def _train_epoch(self, *, validate_at_end: bool) -> dict[str, float]:
        if self.device_data is not None and not self.engine.metric_names:
            data, _ = self.device_data
            batch = {
                k: jax.ShapeDtypeStruct((self.training_config.batch_size, *v.shape[1:]), v.dtype, sharding=self.engine.batch_sharding)
                for k, v in data.items()
            }
            self.engine.build(batch)
            self.on_build(batch)
        return loop.run_epoch(self, validate_at_end=validate_at_end)

    def _stage_device_data(self) -> tuple[dict[str, jax.Array], Callable[[int], np.ndarray]]:
        plan = self.train_input.device_plan() if self.train_input is not None else None
        if plan is None:
            raise WorkshopError(
                "training.data_on_device needs in-memory training data without random flips: pass numpy "
                "arrays, or a pipeline with data.cache=true and data.random_flip=false."
            )
        examples, indices_of = plan
        # Replicated: a gather from an example-sharded array would cost a collective every step.
        return parallel.place(examples, parallel.replicated(self.mesh)), indices_of

    def on_build(self, batch: Mapping[str, Any]) -> None:
        """Once the step's shapes are known: its FLOPs (for MFU), from XLA's cost analysis of one step."""
        self.metrics.names = self.engine.metric_names
        if self.metrics.flops_per_step is None:
            cost = self.lower_step(batch).cost_analysis()
            cost = cost[0] if isinstance(cost, list | tuple) else cost
            self.metrics.flops_per_step = float(cost["flops"]) if cost and cost.get("flops") else None

    def lower_step(self, batch: dict[str, jax.Array]) -> jax.stages.Lowered:
        """The training step lowered for ``batch``'s shapes (e.g. to compile and inspect it)."""
        if not self.engine.metric_names:
            self.engine.build(batch)
            self.on_build(batch)
        stacked = {k: jax.ShapeDtypeStruct((1, *v.shape), v.dtype, sharding=self.engine.stacked_sharding) for k, v in batch.items()}
        return self.engine.lower(self.engine.initial_state_shapes(), stacked)

    def report_first_step(self, marker: jax.Array) -> None:
        """Once per process: how long start-up took (compilation included), waiting for that step only."""
        marker.block_until_ready()
        now = time.perf_counter()
        self.logger.info("First step done (step %d), %.1f s after the trainer was created.", self.step, now - self._created)
        self._created = None
        self.metrics.add_pause("compile", now - self.metrics.interval_started)  # compilation is not step time

    def profile(self, marker: jax.Array) -> None:
        """Start or stop the jax.profiler trace of ``training.profile_steps``."""
        marker.block_until_ready()  # the trace starts and stops at a step boundary
        if self.step == self.profile_marks[0]:
            jax.profiler.start_trace(str(self.workdir / "profile"))
            self.logger.info("Profiling steps %d-%d into %s", self.step + 1, self.profile_marks[1], self.workdir / "profile")
        else:
            jax.profiler.stop_trace()
            self.logger.info("Profile written to %s (open with TensorBoard's profile plugin or XProf)", self.workdir / "profile")

    # --- Metrics ------------------------------------------------------------------------------

    def write_interval(self, step: int, rows: list[dict[str, float]], summary: dict[str, float]) -> None:
        self._check_finite(rows)
        self._log(step, summary, "train")

    def flush_metrics(self) -> None:
        self.metrics.flush(self.step, self.write_interval)

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

    # --- Evaluation and samples -------------------------------------------------------------

    def evaluate(self, data: Any = None, batch_size: int | None = None) -> dict[str, float]:
        """Average loss and model metrics over ``data`` (default: the validation loader).

        Every example counts exactly once: the last partial batch is padded and masked.
        Returns the metrics plus ``num_examples``.
        """
        data = self.val_data_loader if data is None else data
        if data is None:
            raise WorkshopError("No evaluation data: pass data to evaluate() or val_data_loader to the Trainer.")
        return evaluation.evaluate(self.engine, self.state, data, batch_size or self.training_config.batch_size, self.metrics)

    def validate_and_track(self) -> dict[str, float] | None:
        """Periodic validation: log, write samples, update the best loss, keep the best checkpoint."""
        if self.val_data_loader is None:
            return None
        self.flush_metrics()
        start = time.perf_counter()
        with self.metrics.paused("eval"):
            metrics = self.evaluate()
        if self.runlog is not None:
            self.runlog.timed("eval", time.perf_counter() - start, self.step, val_loss=metrics["loss"])
        self.last_eval_step = self.step
        self.val_metrics.append({"step": self.step, **metrics})
        self._log(self.step, metrics, "val")
        with self.metrics.paused("sample"):
            self.write_samples()
        if metrics["loss"] < self._best_loss:
            self._best_loss = metrics["loss"]
            self.state = self.state.replace(best_loss=parallel.place(np.float32(self._best_loss), parallel.replicated(self.mesh)))
            if self.checkpoint_dir is not None:
                self.save_checkpoint(val_loss=self._best_loss)
        return metrics

    def write_samples(self) -> storage.AnyPath | None:
        """Sample grid of ``training.num_samples`` images: ``WORKDIR/samples/step_<N>.png`` and TensorBoard.

        Every process must call this (sampling runs on the whole mesh); only the primary writes.
        """
        count = self.training_config.num_samples
        if count == 0 or self.workdir is None:
            return None
        return evaluation.write_sample_grid(self, count, self.workdir / "samples" / f"step_{self.step}.png")

    def generate_samples(
        self, num_samples: int, seed: int | None = None, labels: Any = None, **sampling_options: Any
    ) -> np.ndarray:
        """``num_samples`` samples as a numpy array (the same for the same seed); ``labels`` condition them."""
        return evaluation.generate(self.engine, self.state, num_samples, seed, labels, sampling_options)

    def close(self) -> None:
        """Finish pending saves and flush metric writers."""
        self.flush_metrics()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.close_checkpoints()
        self.metrics_logger.close()


__all__ = ["NonFiniteLossError", "Trainer", "average"]
