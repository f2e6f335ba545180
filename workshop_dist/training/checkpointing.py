"""The Trainer's checkpoints: save, load, resume. Storage itself is :mod:`workshop_dist.checkpoint`."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from workshop_dist import checkpoint as ckpt
from workshop_dist import storage
from workshop_dist.config import WorkshopError


class CheckpointMixin:
    """Checkpoint methods of :class:`~workshop_dist.training.trainer.Trainer` (the original design's API)."""

    def init_checkpoints(self) -> None:
        self._checkpoints: ckpt.CheckpointManager | None = None
        directory = self.training_config.checkpoint.directory
        self.checkpoint_dir: storage.AnyPath | None = (
            storage.as_path(directory, absolute=False) if directory else (self.workdir / "checkpoints" if self.workdir else None)
        )

    @property
    def checkpoints(self) -> ckpt.CheckpointManager:
        if self._checkpoints is None:
            if self.checkpoint_dir is None:
                raise WorkshopError("This trainer has no workdir/checkpoint_dir: pass a path to save_checkpoint().")
            options = self.training_config.checkpoint
            self._checkpoints = ckpt.CheckpointManager(
                self.checkpoint_dir,
                max_to_keep=options.max_to_keep,
                async_save=options.async_save,
                replica_parallel=options.replica_parallel,
            )
        return self._checkpoints

    @property
    def _data_iterator(self) -> Any:
        """The pipeline position to save (none with data on the device: its position is the step)."""
        if self.train_input is None or self.device_data is not None:
            return None
        return self.train_input.checkpointable_iterator

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

    def save_checkpoint(
        self, path: str | Path | None = None, *, val_loss: float | None = None
    ) -> storage.AnyPath | None:
        """Save the full training state.

        With ``path``: write that directory now (a ``.pkl`` name is just a directory name).
        Without: start an async save of this step under ``WORKDIR/checkpoints/<step>``.
        """
        self.flush_metrics()  # never checkpoint a state whose metrics say it is broken
        with self.metrics.paused("checkpoint"):
            if path is not None:
                return ckpt.save_checkpoint_dir(
                    path, self.state, metadata=self._metadata(), config=self.experiment_config, data_iterator=self._data_iterator
                )
            metrics = {ckpt.BEST_METRIC: val_loss} if val_loss is not None else None
            self.checkpoints.save(
                self.step,
                self.state,
                metadata=self._metadata(),
                config=self.experiment_config,
                data_iterator=self._data_iterator,
                metrics=metrics,
            )
        self.last_save_step = self.step
        return self.checkpoint_dir / str(self.step)

    def load_checkpoint(self, path: str | Path) -> None:
        """Load a checkpoint directory (from :meth:`save_checkpoint` or a run's ``checkpoints/<step>``)."""
        start = time.perf_counter()
        state, metadata, data_restored = ckpt.load_checkpoint_dir(
            path, self.engine.initial_state_shapes(), data_iterator=self._data_iterator
        )
        self._adopt(state, metadata, data_restored, time.perf_counter() - start)

    def restore(self, step: int | None = None) -> int | None:
        """Continue from the latest readable checkpoint in the checkpoint dir (or ``step``).

        Returns the restored step, or None when there is nothing to restore.
        """
        if self.checkpoint_dir is None or not self.checkpoints.all_steps():
            return None
        start = time.perf_counter()
        state, metadata, restored, data_restored = self.checkpoints.restore(
            self.engine.initial_state_shapes(), data_iterator=self._data_iterator, step=step
        )
        self._adopt(state, metadata, data_restored, time.perf_counter() - start)
        return restored

    def _adopt(self, state: Any, metadata: Mapping[str, Any], data_restored: bool, seconds: float) -> None:
        self.state = state
        self.step = self.restored_from = int(jax.device_get(state.step))
        if self.runlog is not None:
            self.runlog.timed("restore", seconds, self.step)
        self._best_loss = float(jax.device_get(state.best_loss))
        self.train_seconds = float(metadata.get("train_seconds", 0.0))
        self.epochs_done = int(metadata.get("epoch", 0))
        self.last_eval_step = self.last_save_step = -1
        self.metrics.reset()
        if self.train_input is not None and not data_restored:
            self.train_input.seek(self.step)

    def close_checkpoints(self) -> None:
        if self._checkpoints is not None:
            self._checkpoints.close()
