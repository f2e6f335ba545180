"""Checkpoints with Orbax: sharded state, data-iterator position, config and metadata.

Layout: ``WORKDIR/checkpoints/<step>/{state,data,config,metadata}`` (written by every process;
each host writes its own shards and its own ``data/process_<i>-of-<n>.json``). A save is
atomic: Orbax writes ``<step>.orbax-checkpoint-tmp`` and renames it when complete, so a
killed save leaves only a temporary directory, which is ignored and cleaned up. No pickle
anywhere: loading a checkpoint reads arrays and JSON and never runs code.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np
import orbax.checkpoint as ocp
import pydantic
from orbax.checkpoint import checkpoint_managers as policies

from workshop_dist import parallel, save_failures, storage
from workshop_dist.config import StrictConfig, WorkshopError
from workshop_dist.save_failures import CheckpointSaveError, SaveGuard  # noqa: F401 -- re-exported

STATE, DATA, CONFIG, METADATA = "state", "data", "config", "metadata"
ITEMS = (STATE, DATA, CONFIG, METADATA)
BEST_METRIC = "best"  # the key of the best metric's value in a save's Orbax metrics (earlier releases: "val_loss")
log = logging.getLogger("workshop_dist")


class LocalCheckpointConfiguration(StrictConfig):
    """The local tier (``training.checkpoint.local``): frequent checkpoints on each host's own disk."""

    directory: str = pydantic.Field(description="A local directory on every host (e.g. /tmp/ckpt or a local SSD).")
    every: int = pydantic.Field(gt=0, description="Save to the local tier every this many steps.")
    max_to_keep: int = pydantic.Field(2, gt=0, description="Local checkpoints kept per host.")


class CheckpointConfiguration(StrictConfig):
    """Where and how checkpoints are written (``training.checkpoint``); when: ``training.save_frequency``."""

    directory: str | None = pydantic.Field(None, description="Default: WORKDIR/checkpoints.")
    max_to_keep: int = pydantic.Field(5, gt=0, description="Latest checkpoints kept (the best is kept apart).")
    async_save: bool = pydantic.Field(True, description="Write checkpoints in the background.")
    replica_parallel: bool = pydantic.Field(
        False,
        description="Split the writing of replicated arrays between their replicas (helps multi-host "
        "data parallelism finish saves sooner, costs the loop more time per save).",
    )
    on_error: Literal["stop", "continue"] = pydantic.Field(
        "stop", description="A failed save (disk full, no permission...): stop the run (exit 1), or warn and go on."
    )
    save_retries: int = pydantic.Field(
        3, ge=0, description="Transient storage errors (timeouts, refused connections) retried this many times first."
    )
    lock_timeout: float = pydantic.Field(60.0, gt=0, description="A workdir lock unrefreshed this long (s) is taken over.")
    best_metric: str = pydantic.Field("val/loss", description="The logged metric that picks the best checkpoint (val/fid...).")
    best_mode: Literal["min", "max"] = pydantic.Field("min", description="The best checkpoint's best_metric: lowest or highest.")
    local: LocalCheckpointConfiguration | None = pydantic.Field(
        None, description="Frequent checkpoints on each host's local disk beside these (workshop_dist.tiered_checkpoint)."
    )


# The original design's flat ``training`` fields, accepted for one release.
DEPRECATED_ALIASES = {
    "checkpoint_dir": "directory",
    "max_checkpoints": "max_to_keep",
    "async_checkpointing": "async_save",
    "replica_parallel_checkpoints": "replica_parallel",
}


class _OnlySomeSavesHaveMetrics(logging.Filter):
    """Periodic saves carry no validation loss by design; Orbax warns about each one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_OnlySomeSavesHaveMetrics())
logging.getLogger("absl").addFilter(save_failures.OrbaxThreadTracebacks())


class CheckpointError(WorkshopError):
    """A checkpoint is missing, unreadable or does not fit the model/configuration."""


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint whose arrays do not fit the model/configuration (older ones would not either)."""


def _grain_args():
    import grain.checkpoint as grain_checkpoint

    return grain_checkpoint.CheckpointSave, grain_checkpoint.CheckpointRestore


def _state_handler(replica_parallel: bool) -> ocp.PyTreeCheckpointHandler:
    """Arrays of the training state. Replica-parallel saving (replicated shards split between
    their replicas) spreads the writing over hosts, but slices every shard while the training
    loop waits; off by default, as Orbax does on GPUs."""
    return ocp.PyTreeCheckpointHandler(type_handler_registry=type_handlers(use_replica_parallel=replica_parallel))


def type_handlers(**array_options: Any) -> Any:
    """Orbax's handlers for the state's leaves; ``array_options`` go to its ``ArrayHandler``."""
    handlers = ocp.type_handlers
    scalars = [(kind, handlers.ScalarHandler()) for kind in (int, float, np.number)]
    return handlers.create_type_handler_registry(
        *scalars, (np.ndarray, handlers.NumpyHandler()), (jax.Array, handlers.ArrayHandler(**array_options))
    )


def _item_handlers(replica_parallel: bool = False) -> dict[str, Any]:
    """Each item's handler, so metadata and restore work in a fresh process."""
    import grain.checkpoint as grain_checkpoint

    return {
        STATE: _state_handler(replica_parallel),
        DATA: grain_checkpoint.CheckpointHandler(),
        CONFIG: ocp.JsonCheckpointHandler(),
        METADATA: ocp.JsonCheckpointHandler(),
    }


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(**_item_handlers()))


def _save_args(state: Any, data_iterator: Any, config: Mapping | None, metadata: Mapping) -> ocp.args.Composite:
    items: dict[str, Any] = {STATE: ocp.args.PyTreeSave(state), METADATA: ocp.args.JsonSave(dict(metadata))}
    if config is not None:
        items[CONFIG] = ocp.args.JsonSave(dict(config))
    if data_iterator is not None:
        items[DATA] = _grain_args()[0](data_iterator)
    return ocp.args.Composite(**items)


def _path_str(path: tuple) -> str:
    return "/".join(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path)


def check_shapes(saved: Any, target: Any, where: str) -> None:
    """Raise a CheckpointMismatchError naming each array whose saved shape differs from the target's."""
    saved_leaves = {_path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(saved)[0]}
    target_leaves = {_path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(target)[0]}
    problems = []
    for name, leaf in target_leaves.items():
        if name not in saved_leaves:
            problems.append(f"{name}: in the model but not in the checkpoint")
        elif tuple(getattr(saved_leaves[name], "shape", ())) != tuple(leaf.shape):
            problems.append(
                f"{name}: checkpoint has shape {tuple(saved_leaves[name].shape)}, the model expects {tuple(leaf.shape)}"
            )
    problems += [f"{name}: in the checkpoint but not in the model" for name in saved_leaves if name not in target_leaves]
    if problems:
        shown = "\n  ".join(problems[:10]) + ("\n  ..." if len(problems) > 10 else "")
        raise CheckpointMismatchError(
            f"Checkpoint {where} does not match the model/configuration:\n  {shown}\n"
            "It was written by a different model or optimizer configuration: use the configuration it was "
            "saved with (stored in its 'config' item), or start in a fresh workdir."
        )


def has_data_position(step_dir: str | Path) -> bool:
    """Whether the checkpoint holds this process's data position for the current process count."""
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    return (storage.as_path(step_dir) / DATA / name).is_file()


def _restore_composite(
    restore: Any, metadata_of: Any, where: str, abstract_state: Any, data_iterator: Any
) -> tuple[Any, dict, bool]:
    """Restore via ``restore(args)`` after checking shapes against ``metadata_of()``.

    Returns the state, the metadata, and whether the data iterator was restored (it is not
    when the checkpoint was written by another number of processes: their positions do not
    map onto this run's; the caller positions the pipeline from the step instead).
    """
    saved = metadata_of()
    saved_state = saved.get(STATE, None)
    if saved_state is None:
        raise CheckpointError(f"Checkpoint {where} has no '{STATE}' item.")
    check_shapes(saved_state, abstract_state, where)
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
    items: dict[str, Any] = {
        STATE: ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args),
        METADATA: ocp.args.JsonRestore(),
    }
    data_restored = data_iterator is not None and has_data_position(where)
    if data_restored:
        items[DATA] = _grain_args()[1](data_iterator)
    restored = restore(ocp.args.Composite(**items))
    return restored[STATE], dict(restored[METADATA] or {}), data_restored


def _best_value(metrics: Mapping[str, float]) -> float:  # earlier releases stored the validation loss as val_loss
    return metrics[BEST_METRIC] if BEST_METRIC in metrics else metrics["val_loss"]


class CheckpointManager:
    """Periodic, async checkpoints of a run; keeps the latest ``max_to_keep`` plus the best one.

    The best checkpoint is the one with the lowest (``best_mode="max"``: highest) best metric
    among those saved with metrics (Orbax tracks it: ``best_fn``/``best_mode``); the latest-N rule
    never removes it.

    A failed save (disk full, no permission, I/O error, unreachable bucket; async or not) is
    one :class:`CheckpointSaveError`, or a warning with ``on_error="continue"``: see
    :class:`~workshop_dist.save_failures.SaveGuard`.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        max_to_keep: int = 5,
        async_save: bool = True,
        replica_parallel: bool = False,
        on_error: Literal["stop", "continue"] = "stop",
        save_retries: int = 3,
        retry_seconds: float = 1.0,
        best_mode: Literal["min", "max"] = "min",
    ):
        self.directory = storage.as_path(directory)  # local (absolute) or gs://
        preservation = policies.AnyPreservationPolicy(
            [
                policies.LatestN(n=max_to_keep),
                policies.BestN(
                    get_metric_fn=_best_value,
                    reverse=best_mode == "min",  # keep the lowest value
                    n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            best_fn=_best_value,  # Orbax stores each save's metrics, ranks by it
            best_mode=best_mode,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True, preservation_policy=preservation, create=True,
            # directories made in save(): one that cannot be made fails it now (async: a 20-minute hang)
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        )
        self._manager = ocp.CheckpointManager(
            self.directory, item_handlers=_item_handlers(replica_parallel), options=options
        )
        self.guard = SaveGuard(
            self._manager, self.directory, on_error=on_error, retries=save_retries, retry_seconds=retry_seconds,
            async_save=async_save,
        )  # fmt: skip

    @classmethod
    def from_config(cls, directory: str | Path, config: CheckpointConfiguration) -> CheckpointManager:
        fields = ("max_to_keep", "async_save", "replica_parallel", "on_error", "save_retries", "best_mode")
        return cls(directory, **{name: getattr(config, name) for name in fields})

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The saved step with the best metric's best value (None if none was saved with one)."""
        return self._manager.best_step()

    def save(
        self,
        step: int,
        state: Any,
        *,
        metadata: Mapping[str, Any],
        config: Mapping[str, Any] | None = None,
        data_iterator: Any = None,
        metrics: Mapping[str, float] | None = None,
    ) -> bool:
        """Start saving ``step`` (async: returns once the device arrays are copied off).

        Returns whether a save was started; False when ``step`` is saved already or the save
        failed under ``on_error="continue"``.
        """
        self.guard.settle()  # a failed earlier async save is reported as itself, not as this one
        if step in self._manager.all_steps():
            return False
        args = _save_args(state, data_iterator, config, metadata)
        metrics = dict(metrics) if metrics else None
        return self.guard.save(step, lambda: self._manager.save(step, args=args, metrics=metrics, force=True))

    def wait(self) -> None:
        """Block until every pending save is complete on disk (and report one that failed)."""
        self.guard.settle()

    def restore(
        self, abstract_state: Any, *, data_iterator: Any = None, step: int | None = None
    ) -> tuple[Any, dict, int, bool]:
        """Restore ``step`` (default: the latest readable one) into ``abstract_state``'s shardings.

        Returns the state, its metadata, the step, and whether the data position was restored.

        An unreadable checkpoint is skipped with a warning naming it and the previous one is
        tried; a shape mismatch is an error (every older checkpoint would mismatch too).
        """
        steps = [step] if step is not None else sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"No checkpoint found in {self.directory}.")
        failures = []
        for candidate in steps:
            where = str(self.directory / str(candidate))
            try:
                state, metadata, data_restored = _restore_composite(
                    lambda args, s=candidate: self._manager.restore(s, args=args),
                    lambda s=candidate: self._manager.item_metadata(s),
                    where,
                    abstract_state,
                    data_iterator,
                )
                return state, metadata, candidate, data_restored
            except CheckpointMismatchError:
                raise
            except CheckpointError as err:
                failures.append(f"{where}: {err}")
            except Exception as err:  # unreadable or damaged files: fall back to an older step
                failures.append(f"{where}: {type(err).__name__}: {err}")
            log.warning("Checkpoint %s is unreadable, trying an older one: %s", where, failures[-1])
        raise CheckpointError(
            f"No readable checkpoint in {self.directory}:\n  " + "\n  ".join(failures) + "\n"
            "Remove the damaged step directories, or start in a fresh workdir."
        )

    def close(self) -> None:  # also when the pending save failed: Orbax's threads end here
        self.guard.close()


def save_checkpoint_dir(
    path: str | Path, state: Any, *, metadata: Mapping[str, Any], config: Mapping | None = None, data_iterator: Any = None
) -> storage.AnyPath:
    """Write one checkpoint directory at ``path`` (synchronously), replacing an existing one atomically.

    The new checkpoint is complete on disk before the old one is removed. On Cloud Storage a
    rename copies every object, so the replacement there is safe but not instantaneous.
    """
    path = storage.as_path(path)
    staging = path.with_name(path.name + ".saving")
    checkpointer = _checkpointer()
    checkpointer.save(staging, args=_save_args(state, data_iterator, config, metadata), force=True)
    checkpointer.close()
    if jax.process_index() == 0:
        old = path.with_name(path.name + ".old")
        if path.exists():
            path.rename(old)
        staging.rename(path)
        _remove_tree(old)
    _sync(f"save_checkpoint_dir:{path}")
    return path


def load_checkpoint_dir(
    path: str | Path, abstract_state: Any, *, data_iterator: Any = None
) -> tuple[Any, dict, bool]:
    """Read a checkpoint directory written by :func:`save_checkpoint_dir` or a manager step dir."""
    path = storage.as_path(path)
    if not (path / STATE).is_dir():
        hint = " It looks like a run's checkpoint folder: pass one of its step directories." if path.is_dir() else ""
        raise CheckpointError(f"No checkpoint at {path} (expected a directory with a '{STATE}' item).{hint}")
    checkpointer = _checkpointer()
    try:
        return _restore_composite(
            lambda args: checkpointer.restore(path, args=args),
            lambda: checkpointer.metadata(path).item_metadata,
            str(path),
            abstract_state,
            data_iterator,
        )
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"Checkpoint {path} is unreadable: {type(err).__name__}: {err}") from None
    finally:
        checkpointer.close()


def _remove_tree(path: storage.AnyPath) -> None:
    """Delete a directory tree if it is there (local or remote)."""
    if storage.is_remote(path):
        if path.exists():
            path.rmtree()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _sync(name: str) -> None:
    parallel.barrier(name)
