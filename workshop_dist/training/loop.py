"""The training loop, top to bottom: feed n batches, run n steps, then each periodic action whose time it is.

``steps_per_call`` steps run in one jitted call, but a call never crosses a step where something
must happen (log, evaluate, save, profile, epoch end), so every decision lands on the same step
as with one step per call. Preemption is checked after every call.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from workshop_dist import parallel
from workshop_dist.config import WorkshopError
from workshop_dist.training.preemption import Preempted
from workshop_dist.training.reporting import average

if TYPE_CHECKING:
    from workshop_dist.training.trainer import Trainer


def itstime(step: int, every: int | None) -> bool:
    return bool(every) and step % every == 0


def steps_to_boundary(step: int, limit: int, periods: list[int | None], marks: tuple[int, ...]) -> int:
    """How many steps the next call may run: at most ``limit``, never past a multiple of a period or a mark."""
    n = limit
    for every in periods:
        if every:
            n = min(n, every - step % every)
    for mark in marks:
        if mark > step:
            n = min(n, mark - step)
    return max(n, 1)


class Feed:
    """One epoch's inputs for calls of ``n`` steps: stacked host batches, or indices into data on the mesh."""

    def __init__(self, trainer: Trainer, remaining: int | None, skip: int):
        self.trainer = trainer
        self.on_device = trainer.device_data is not None
        self._host: Iterator[dict[str, np.ndarray]] | None = None
        if not self.on_device:
            self._host = trainer.train_input.epoch(remaining, skip=skip)
        self.remaining = remaining

    def take(self, step: int, n: int) -> tuple[Callable[[Any], tuple[Any, jax.Array]], int] | None:
        """A function ``state -> (state, metrics)`` running the next ``k <= n`` steps, and ``k``; None at the end."""
        trainer, engine = self.trainer, self.trainer.engine
        if self.remaining is not None:
            n = min(n, self.remaining)
            if n <= 0:
                return None
        if self.on_device:
            data, indices_of = trainer.device_data
            indices = np.stack([indices_of(s) for s in range(step, step + n)]).astype(np.int32)
            indices = parallel.place(indices, parallel.replicated(trainer.mesh))
            self._count(n)
            return (lambda state: engine.train_steps_on_device(state, data, indices)), n
        batches = []
        with trainer.metrics.waiting("data_wait_time"):
            for _ in range(n):
                batch = next(self._host, None)
                if batch is None:
                    break
                batches.append(batch)
        if not batches:
            return None
        stacked = {key: np.stack([b[key] for b in batches]) for key in batches[0]}
        global_batches = parallel.host_batch_to_global(stacked, trainer.mesh, engine.stacked_sharding)
        if not engine.metric_names:
            first = {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype, sharding=engine.batch_sharding) for k, v in global_batches.items()}
            engine.build(first)
            trainer.on_build(first)
        self._count(len(batches))
        return (lambda state: engine.train_steps(state, global_batches)), len(batches)

    def _count(self, n: int) -> None:
        if self.remaining is not None:
            self.remaining -= n


def run_epoch(trainer: Trainer, *, validate_at_end: bool) -> dict[str, float]:
    """Train one epoch (its remainder after a mid-epoch resume); return its averaged metrics."""
    config = trainer.training_config
    if trainer.train_input is None:
        raise WorkshopError("No training data: pass train_data_loader to the Trainer.")
    per_epoch = trainer.steps_per_epoch
    done = trainer.step % per_epoch if per_epoch else 0
    feed = Feed(trainer, per_epoch - done if per_epoch else None, done)
    first_row = len(trainer.metrics.rows) + trainer.metrics.unread
    epoch_start = time.perf_counter()
    trainer.metrics.restart_interval(trainer.step)
    periods = [config.log_frequency, config.eval_frequency, config.save_frequency, per_epoch if validate_at_end else None]
    while not trainer.finished:
        # --- Run the next steps (at most steps_per_call, never past an action's step) -------
        limit = config.steps_per_call
        if trainer.total_steps is not None:
            limit = min(limit, trainer.total_steps - trainer.step)
        taken = feed.take(trainer.step, steps_to_boundary(trainer.step, limit, periods, trainer.profile_marks))
        if taken is None:
            break
        run, count = taken
        trainer.state, metrics = run(trainer.state)
        trainer.step += count
        trainer.metrics.add(metrics)
        step = trainer.step

        # --- Periodic actions ----------------------------------------------------------------
        if trainer.first_step_pending:
            trainer.report_first_step(metrics)
        if step in trainer.profile_marks:
            trainer.profile(metrics)
        done_read = trainer.metrics.finish_read()  # the previous interval, read while this call runs
        if done_read is not None:
            trainer.write_interval(*done_read)
        if itstime(step, config.log_frequency):
            trainer.metrics.start_read(step)
        evaluate = itstime(step, config.eval_frequency) or (validate_at_end and itstime(step, per_epoch))
        preempted = trainer.preemption is not None and trainer.preemption.reached(step)
        save = (itstime(step, config.save_frequency) or preempted) and trainer.checkpoint_dir is not None
        if evaluate and trainer.val_data_loader is not None:
            trainer.validate_and_track()
        if save and trainer.last_save_step != step:
            trainer.save_checkpoint()
        if preempted:
            if trainer.checkpoint_dir is not None:
                with trainer.metrics.paused("checkpoint"):
                    trainer.checkpoints.wait()
            trainer.logger.info("Checkpoint for step %d is on disk; exiting for preemption.", step)
            raise Preempted(step, trainer.preemption.signal_name or "signal")
    trainer.flush_metrics()
    trainer.train_seconds += time.perf_counter() - epoch_start
    trainer.epochs_done += 1
    return average(trainer.metrics.rows[first_row:])
