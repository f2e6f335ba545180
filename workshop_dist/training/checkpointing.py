"""A training run's checkpoints: what they hold and the save/restore functions the checkpoint hook
and the Trainer both call. Storage itself (Orbax, atomic saves, fallback) is :mod:`workshop_dist.checkpoint`.

A checkpoint holds the :class:`TrainingState` (with the best validation loss in ``best_loss``),
each process's data-pipeline position, the resolved configuration, and metadata (step, epoch,
examples seen, training seconds, best loss, mesh).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from workshop_dist import checkpoint as ckpt
from workshop_dist import parallel, storage
from workshop_dist.config import WorkshopError
from workshop_dist.tiered_checkpoint import TieredCheckpointManager
from workshop_dist.training.state import TrainingState


@dataclasses.dataclass(frozen=True)
class Restored:
    state: TrainingState
    step: int
    metadata: dict[str, Any]
    data_restored: bool  # False: the pipeline must be positioned from the step


@dataclasses.dataclass(frozen=True)
class Contents:
    """What every save of a run writes besides the state (fixed for the run)."""

    config: Mapping[str, Any] | None  # the resolved experiment configuration
    data_iterator: Callable[[], Any]  # the pipeline position to save (None with data on the device: the step is it)
    batch_size: int
    mesh: jax.sharding.Mesh
    epoch_of: Callable[[int], int]


class Checkpoints:
    """The run's checkpoint directory; its Orbax manager is opened on first use (which creates it)."""

    def __init__(self, directory: storage.AnyPath | None, options: ckpt.CheckpointConfiguration):
        self.directory, self.options = directory, options
        self._manager: ckpt.CheckpointManager | None = None

    @property
    def manager(self) -> ckpt.CheckpointManager:
        if self._manager is None:
            if self.directory is None:
                raise WorkshopError("This trainer has no workdir/checkpoint_dir: pass a path to save_checkpoint().")
            # on_error and save_retries come with the section: a failed save is one message (SaveGuard);
            # checkpoint.local adds the local tier (frequent saves on each host's disk)
            manager = TieredCheckpointManager if self.options.local is not None else ckpt.CheckpointManager
            self._manager = manager.from_config(self.directory, self.options)
        return self._manager

    @property
    def local_every(self) -> int | None:
        """Steps between local-tier saves (None: no local tier)."""
        return self.options.local.every if self.options.local is not None else None

    @property
    def restored_tier(self) -> str | None:
        """The tier the last restore read (``local`` or ``persistent``; None without tiers)."""
        return getattr(self._manager, "restored_tier", None)

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()


def save(
    target: Checkpoints | str | Path,
    step: int,
    state: TrainingState,
    contents: Contents,
    *,
    best_loss: float,
    train_seconds: float,
    best_value: float | None = None,
    persistent: bool = True,
) -> storage.AnyPath:
    """Save ``state`` at ``step``: an async save into the run's checkpoints (``best_value``: a new best value of
    the best metric, for best-keeping), or, given a path, that directory now (a ``.pkl`` name is just a name)."""
    state = state.replace(best_loss=parallel.place(np.float32(best_loss), parallel.replicated(contents.mesh)))
    metadata = {
        "step": step,
        "epoch": contents.epoch_of(step),
        "examples_seen": step * contents.batch_size,
        "train_seconds": train_seconds,
        "saved_at": time.time(),
        "best_loss": best_loss if np.isfinite(best_loss) else None,
        "process_count": jax.process_count(),
        "mesh": dict(contents.mesh.shape),
    }
    if not isinstance(target, Checkpoints):
        return ckpt.save_checkpoint_dir(target, state, metadata=metadata, config=contents.config, data_iterator=contents.data_iterator())
    metrics = {ckpt.BEST_METRIC: best_value} if best_value is not None else None
    tier = {} if persistent else {"persistent": False}  # False: the local tier only (a TieredCheckpointManager)
    target.manager.save(
        step, state, metadata=metadata, config=contents.config, data_iterator=contents.data_iterator(), metrics=metrics,
        **tier,
    )
    return target.directory / str(step)


def restore(
    target: Checkpoints | str | Path, abstract_state: TrainingState, *, data_iterator: Any, step: int | None = None
) -> Restored:
    """The latest readable checkpoint of the run (or ``step``), or the checkpoint directory ``target``,
    read straight into ``abstract_state``'s shardings."""
    if isinstance(target, Checkpoints):
        state, metadata, step, data_restored = target.manager.restore(abstract_state, data_iterator=data_iterator, step=step)
    else:
        state, metadata, data_restored = ckpt.load_checkpoint_dir(target, abstract_state, data_iterator=data_iterator)
        step = int(jax.device_get(state.step))
    return Restored(state, int(step), metadata, data_restored)
