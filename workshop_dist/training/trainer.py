"""The Trainer: the original design's API as a facade over the engine, the loop and its hooks.

It assembles, once: the mesh and the input; the :class:`~workshop_dist.training.plan.Plan` (the
configuration resolved); the :class:`~workshop_dist.training.engine.Engine` (built from the
input's batch specification); the clock, the hooks, and a latent model's frozen decoder. ``train_epoch``
and ``fit`` hand them to :func:`~workshop_dist.training.loop.train`, which owns the step loop. Between
calls the Trainer holds only what the original API exposes: the state, the step, the hooks' records.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from workshop_dist import hardware, parallel, storage
from workshop_dist.config import WorkshopError
from workshop_dist.eval.config import EvalConfiguration
from workshop_dist.metrics import Logger, MetricsLogger, is_primary
from workshop_dist.parallel import MeshConfiguration
from workshop_dist.runlog import RunLog
from workshop_dist.training import checkpointing, evaluation, init_from, inputs, loop
from workshop_dist.training import feed as feeds
from workshop_dist.training.clock import Clock
from workshop_dist.training.config import TrainingConfiguration
from workshop_dist.training.engine import Engine
from workshop_dist.training.first_stage import decoder_for
from workshop_dist.training.frozen import parameter_table
from workshop_dist.training.hooks import Every
from workshop_dist.training.hooks.checkpoint import CheckpointHook
from workshop_dist.training.hooks.evaluate import Best, EvaluateHook
from workshop_dist.training.hooks.fid import FIDHook
from workshop_dist.training.hooks.log import LogCallback, LogHook, MetricSink, NonFiniteLossError, average
from workshop_dist.training.hooks.posthoc import PosthocSnapshotHook
from workshop_dist.training.hooks.profile import ProfileHook
from workshop_dist.training.hooks.runlog import RunLogHook
from workshop_dist.training.hooks.samples import SamplesHook, data_max
from workshop_dist.training.plan import make_plan
from workshop_dist.training.preemption import Preempted, PreemptionWatcher
from workshop_dist.training.state import TrainingState


class Trainer:
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
        eval_config: EvalConfiguration | None = None,
    ):
        self.clock = Clock()  # the run's one clock: "First step done ... after the trainer was created"
        self.training_config = config = training_config
        cadence, performance = config.cadence, config.performance
        self.workdir = storage.as_path(workdir, absolute=False) if workdir is not None else None  # local or gs://
        self.experiment_config = dict(experiment_config) if experiment_config is not None else None
        self.val_data_loader = val_data_loader
        logs = self.workdir / "logs" if self.workdir else None
        self.logger = logger or Logger(logs)
        self.metrics_logger = metrics_logger or MetricsLogger(logs or "", enabled=None if logs else False)
        if self.experiment_config is not None:
            self.metrics_logger.log_hparams(self.experiment_config)

        # --- Mesh, input and run length ----------------------------------------------------
        self.mesh_config = mesh_config or MeshConfiguration()
        self.mesh = mesh or parallel.make_mesh(self.mesh_config)
        parallel.check_batch_size(config.batch_size, self.mesh)
        parallel.check_batch_size(config.batch_size // performance.grad_accum_steps, self.mesh)
        self.train_input = inputs.as_train_input(
            train_data_loader, global_batch_size=config.batch_size, seed=config.seed,
            per_process_batch_size=config.batch_size // jax.process_count(), steps_per_epoch=config.length.steps_per_epoch,
        )
        self.steps_per_epoch = config.length.steps_per_epoch or (self.train_input.steps_per_epoch if self.train_input else None)
        self.total_steps = config.total_steps(self.steps_per_epoch)
        self.device_data = feeds.stage(self.train_input, self.mesh) if performance.data_on_device else None

        # --- The engine, built once: the resolved plan on the mesh, for the input's batches ----
        self.engine = Engine(make_plan(model, config, self.total_steps), self.mesh, self.mesh_config,
                             feeds.batch_spec(self.train_input, self.device_data, config.batch_size))
        self._state: TrainingState = self.engine.initial_state
        self._best_placed = (float("inf"), self._state.best_loss)
        self.step = 0
        self._epochs_done = 0  # counts epochs when their length is unknown
        self.restored_from: int | None = None
        table = parameter_table(self.engine.state_shapes.params, self.engine.plan.rule.frozen)  # frozen ones marked
        self.logger.info("Model parameters:\n%s", table, console=False)

        # --- The hooks (the loop's periodic actions) ---------------------------------------------
        peak = hardware.peak_flops(self.mesh.devices.flat[0])
        self.decoder = decoder_for(model, self.mesh)  # model.decoder: latent samples decoded for grids and FID
        self._sink = MetricSink(self.metrics_logger, self.logger, callback=log_callback, progress_bar=progress_bar,
                                total_steps=self.total_steps, epoch_of=self._epoch_of)
        self._log = LogHook(self._sink, batch_size=config.batch_size, flops_per_step=self.engine.flops_per_step, every=cadence.log_every,
                            peak_flops=peak * self.mesh.devices.size if peak else None, nan_policy=config.nan_policy)
        self._best = Best(config.checkpoint.best_metric, config.checkpoint.best_mode)
        self._evaluate = EvaluateHook(self.engine, val_data_loader, batch_size=config.batch_size, every=cadence.eval_every,
                                      sink=self._sink, max_in_flight=performance.max_steps_in_flight, best=self._best)
        self._fid = FIDHook.for_run(eval_config, self.engine, sink=self._sink, best=self._best, batch_size=config.batch_size,
                                    experiment_config=self.experiment_config, reference_data=val_data_loader, decoder=self.decoder)
        self._evaluate.extra_metrics = {self._fid.metric} if self._fid else set()  # for the best metric's check
        self._samples = SamplesHook(self.engine, count=cadence.num_samples, metrics_logger=self.metrics_logger,
                                    directory=self.workdir / "samples" if self.workdir else None, follows=self._evaluate,
                                    data_max=data_max(self.experiment_config), decoder=self.decoder)
        directory = config.checkpoint.directory
        self.checkpoint_dir = storage.as_path(directory, absolute=False) if directory else (
            self.workdir / "checkpoints" if self.workdir else None)
        self._checkpoints = checkpointing.Checkpoints(self.checkpoint_dir, config.checkpoint)
        self._state = init_from.initialise(self._state, config.init_from, self.engine, self._checkpoints, self.logger)
        self._contents = checkpointing.Contents(self.experiment_config, self._data_iterator, config.batch_size,
                                                self.mesh, self._epoch_of)
        self._checkpoint = CheckpointHook(self._checkpoints if self.checkpoint_dir else None, self._contents,
                                          every=cadence.save_every, evaluation=self._evaluate, preemption=preemption,
                                          scores=[h for h in (self._fid,) if h])
        self._posthoc = PosthocSnapshotHook.for_run(config.ema.posthoc, self.workdir)
        profile = cadence.profile_steps
        self._profile = ProfileHook(self.workdir / "profile", *profile) if profile and self.workdir else None
        self.runlog = RunLog(self.workdir, enabled=is_primary()) if self.workdir else None
        self._runlog = RunLogHook(self.runlog, self._evaluate, lambda: self._checkpoints.restored_tier) if self.runlog else None
        self._user_hooks: list[Any] = []
        self._loop = {"read_every": cadence.log_every, "steps_per_call": performance.steps_per_call,
                      "max_in_flight": performance.max_steps_in_flight}

    # --- The original design's API ----------------------------------------------------------

    @property
    def state(self) -> TrainingState:
        """The whole training state; ``state["step"]``, ``state.get("best_loss")`` work as in the original design."""
        best = self._best.loss
        if self._best_placed[0] != best:
            self._best_placed = (best, parallel.place(np.float32(best), parallel.replicated(self.mesh)))
        return self._state.replace(best_loss=self._best_placed[1])

    @state.setter
    def state(self, value: TrainingState) -> None:
        self._state = value
        if value.best_loss is not self._best_placed[1]:
            self._best.reset(float(jax.device_get(value.best_loss)))

    @property
    def train_metrics(self) -> list[dict[str, float]]:
        """Every step's metrics so far (``{"step": s, "loss": ..., ...}``)."""
        return self._log.rows

    @property
    def val_metrics(self) -> list[dict[str, float]]:
        return self._evaluate.history

    @property
    def best_loss(self) -> float:
        """The best value of ``checkpoint.best_metric`` (the validation loss unless configured)."""
        return self._best.loss

    @property
    def log_callback(self) -> LogCallback | None:
        return self._sink.callback

    @log_callback.setter
    def log_callback(self, callback: LogCallback | None) -> None:
        self._sink.callback = callback

    @property
    def epoch(self) -> int:
        """Completed epochs (from the step count, so it survives a restart)."""
        return self._epoch_of(self.step)

    @property
    def finished(self) -> bool:
        return self.total_steps is not None and self.step >= self.total_steps

    @property
    def metric_names(self) -> tuple[str, ...]:
        return self.engine.metric_names

    @property
    def flops_per_step(self) -> float | None:
        return self.engine.flops_per_step

    @property
    def model(self) -> nnx.Module:
        """A new module with a copy of the current parameters (the step donates the state's own buffers)."""
        params, model_state = jax.tree.map(jnp.copy, (self._state.params, self._state.model_state))
        return self.engine.calls.merge(params, model_state, training=None)

    @property
    def train_step_fn(self) -> Callable:
        """``(state, batch) -> (state, metrics)``: the loop's compiled step, one step per call."""
        return self.engine.one_step

    train_step = train_step_fn

    def add_hook(self, hook: Any, every: int | None = None) -> Any:
        """Run ``hook`` during training: an object with ``next_step`` and ``__call__`` (see
        :mod:`workshop_dist.training.loop`), or, with ``every``, a function ``fn(info)`` called every
        ``every`` steps. Returns the hook."""
        if every is not None:
            hook = Every(hook, every)
        elif not (callable(getattr(hook, "next_step", None)) and callable(hook)):
            raise TypeError("A hook needs next_step(step) and __call__(info); for a function use add_hook(fn, every=N).")
        self._user_hooks.append(hook)
        return hook

    def fit(self) -> dict[str, float]:
        """Train the configured epochs/steps with periodic validation; always checkpoint the end."""
        if self.runlog is not None:
            self.runlog.started(self.step, self.total_steps, self.restored_from, examples_per_step=self.training_config.batch_size,
                                process_count=jax.process_count(),
                                checkpoint_dir=self.checkpoint_dir if self.training_config.checkpoint.directory else None)
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

    def train_epoch(self) -> dict[str, float]:
        """Train one epoch (the rest of it after a mid-epoch resume); return its averaged metrics."""
        return self._train(fit=False)

    def evaluate(self, data: Any = None, batch_size: int | None = None) -> dict[str, float]:
        """Average loss and model metrics over ``data`` (default: the validation loader), plus ``num_examples``:
        every example counts exactly once (the last partial batch is padded and masked)."""
        data = self.val_data_loader if data is None else data
        if data is None:
            raise WorkshopError("No evaluation data: pass data to evaluate() or val_data_loader to the Trainer.")
        batch_size = batch_size or self.training_config.batch_size
        return evaluation.evaluate(self.engine, self._state, data, batch_size, self._loop["max_in_flight"])

    def generate_samples(self, num_samples: int, seed: int | None = None, labels: Any = None, **sampling_options: Any) -> np.ndarray:
        """``num_samples`` samples as a numpy array (the same for the same seed); ``labels`` condition them."""
        return evaluation.generate(self.engine, self._state, num_samples, seed, labels, sampling_options, self.decoder)

    def write_samples(self) -> storage.AnyPath | None:
        """A sample grid of the current state: ``WORKDIR/samples/step_<N>.png`` (every process must call it)."""
        with self.clock.phase("sample", self.step):
            return self._samples.write(self.step, self._state)

    def save_checkpoint(self, path: str | Path | None = None, *, val_loss: float | None = None) -> storage.AnyPath:
        """Save the full training state.

        With ``path``: write that directory now (a ``.pkl`` name is just a directory name).
        Without: start an async save of this step under ``WORKDIR/checkpoints/<step>``.
        """
        with self.clock.phase("save", self.step):
            if path is not None:
                return checkpointing.save(path, self.step, self._state, self._contents, best_loss=self.best_loss,
                                          train_seconds=self.clock.train_seconds)
            self.checkpoints  # noqa: B018 (a clear error without a checkpoint directory)
            return self._checkpoint.save(self.step, self._state, self.clock.train_seconds, best_value=val_loss)

    def load_checkpoint(self, path: str | Path) -> None:
        """Load a checkpoint directory (from :meth:`save_checkpoint` or a run's ``checkpoints/<step>``)."""
        with self.clock.phase("restore", self.step):
            restored = checkpointing.restore(path, self.engine.state_shapes, data_iterator=self._data_iterator())
        self._adopt(restored)

    def restore(self, step: int | None = None) -> int | None:
        """Continue from the latest readable checkpoint in the checkpoint dir (or ``step``).

        Returns the restored step, or None when there is nothing to restore.
        """
        if self.checkpoint_dir is None or not self.checkpoints.all_steps():
            return None
        with self.clock.phase("restore", self.step):
            restored = checkpointing.restore(self._checkpoints, self.engine.state_shapes,
                                             data_iterator=self._data_iterator(), step=step)
        self._adopt(restored)
        return restored.step

    @property
    def checkpoints(self) -> Any:
        """The run's :class:`~workshop_dist.checkpoint.CheckpointManager`."""
        return self._checkpoints.manager

    def lower_step(self, batch: Mapping[str, Any]) -> jax.stages.Lowered:
        """The training step lowered for ``batch``'s (global) shapes, e.g. to compile and inspect it."""
        return self.engine.lower({key: jax.ShapeDtypeStruct(v.shape, v.dtype) for key, v in batch.items()})

    def close(self) -> None:
        """Finish pending saves, write what the run log has not seen, flush metric writers."""
        self._sink.close()
        if self._runlog is not None:
            self._runlog.write_spans(self.clock)
        self._checkpoints.close()
        self.metrics_logger.close()

    # --- Assembly ---------------------------------------------------------------------------

    def _hooks(self) -> list[Any]:
        hooks = [self._log, self._evaluate, self._fid, self._samples, *self._user_hooks, self._posthoc, self._checkpoint,
                 self._profile, self._runlog]
        return [hook for hook in hooks if hook is not None]

    def _train(self, *, fit: bool) -> dict[str, float]:
        """One epoch (its rest after a mid-epoch resume) through the loop; its averaged metrics."""
        if self.train_input is None:
            raise WorkshopError("No training data: pass train_data_loader to the Trainer.")
        config, per_epoch = self.training_config, self.steps_per_epoch
        done = self.step % per_epoch if per_epoch else 0
        remaining = per_epoch - done if per_epoch else None
        stop = None if remaining is None else self.step + remaining
        if self.total_steps is not None:
            stop = self.total_steps if stop is None else min(stop, self.total_steps)
        # fit() evaluates at each epoch's end unless cadence.eval_every says otherwise
        self._evaluate.epoch_length = per_epoch if fit and config.cadence.eval_every is None else None
        progress = loop.Progress(self.step, self._state)
        first_row = len(self._log.rows)
        try:
            loop.train(
                self.engine, self._state, feeds.epoch_feed(self.engine, self.train_input, self.device_data, remaining, done),
                [*self._hooks(), progress], start=self.step, stop=stop, clock=self.clock, **self._loop,
            )
        finally:
            self._state, self.step = progress.state, progress.step
        self._epochs_done += 1
        return average(self._log.rows[first_row:])

    def _fit(self) -> dict[str, float]:
        last: dict[str, float] = {}
        while self.epoch < self.training_config.num_epochs and not self.finished:
            last = self._train(fit=True)
            if self.training_config.cadence.eval_every is None and self._evaluate.last_step != self.step:
                last = self._validate() or last  # the epoch's length was unknown in advance
        last = self._validate(final=True) or last
        if self.checkpoint_dir is not None:
            if self._checkpoint.last_step != self.step:
                self.save_checkpoint()
            with self.clock.phase("save", self.step):
                self.checkpoints.wait()
        if self._runlog is not None:
            self._runlog.write_spans(self.clock)
        return last

    def _validate(self, *, final: bool = False) -> dict[str, float] | None:
        """Evaluation outside the loop, with its samples and best checkpoint (at the end also the FID hook's)."""
        evaluate = self.val_data_loader is not None and self._evaluate.last_step != self.step
        hooks = [self._evaluate] if evaluate else []
        hooks += [self._fid] if final and self._fid and self._fid.last_step != self.step else []
        if not hooks:
            return None
        hooks += [*([self._samples] if evaluate and self._samples.enabled else []), self._checkpoint]
        loop.run_now(hooks, step=self.step, state=self._state, clock=self.clock, observers=[h for h in [self._runlog] if h])
        if self._evaluate.last_step != self.step:
            return None
        return {key: value for key, value in self._evaluate.history[-1].items() if key != "step"}

    def _ended(self, reason: str, detail: str | None = None) -> None:
        if self.runlog is not None:
            self._runlog.write_spans(self.clock)
            self.runlog.ended(self.step, reason, detail)

    def _adopt(self, restored: checkpointing.Restored) -> None:
        self._state, self.step = restored.state, restored.step
        self.restored_from = restored.step
        self._best.reset(float(jax.device_get(restored.state.best_loss)))
        self.clock.train_seconds = float(restored.metadata.get("train_seconds", 0.0))
        self._epochs_done = int(restored.metadata.get("epoch", 0))
        self._evaluate.last_step = self._checkpoint.last_step = self._checkpoint.last_local_step = None
        if self._fid is not None:
            self._fid.last_step = None
        if self.train_input is not None and not restored.data_restored:
            self.train_input.seek(self.step)

    def _epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch if self.steps_per_epoch else self._epochs_done

    def _data_iterator(self) -> Any:
        """The pipeline position to save (none with data on the device: its position is the step)."""
        if self.train_input is None or self.device_data is not None:
            return None
        return self.train_input.checkpointable_iterator


__all__ = ["NonFiniteLossError", "Trainer", "average"]
