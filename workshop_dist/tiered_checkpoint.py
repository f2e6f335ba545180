"""Two checkpoint tiers: frequent ones on each host's local disk, the usual ones in the workdir.

A preemptible job whose workdir is a bucket saves rarely there (each save is slow), so every
preemption redoes the steps since the last one. :class:`TieredCheckpointManager` also
writes the training state every ``checkpoint.local.every`` steps to each host's own disk
(``checkpoint.local.directory``), which is fast, and on restart resumes from the newest step
that *every* process has complete in its local tier when that is newer than the workdir's
latest, else from the workdir (the persistent tier): a host replaced by a fresh machine has
an empty local disk, so the job then uses the persistent tier. Both restore bit-identically.
:attr:`TieredCheckpointManager.restored_tier` says which tier a restore used.

Local layout: ``LOCAL/process_<i>-of-<n>/<step>/{state,data,config,metadata}``, one
directory per process (several processes may share a host's disk). Each process writes the
shards it holds (replicated arrays too), its data position and the JSON items, with no
barrier to the others (Orbax ``MultiprocessingOptions(primary_host=None,
active_processes={i})``, the settings Orbax's emergency manager gives its local tier). A
local checkpoint holds only this process's shards, so it is restored only onto the same
topology: its metadata records the process index and count and a fingerprint of every
array's shape, dtype and sharding (mesh axes and device ids), and a step whose fingerprint
differs from the restoring state's is not a candidate. A local save that fails is a
warning (the persistent tier is the safety net); the persistent tier follows
``checkpoint.on_error``.

Why not ``orbax.checkpoint.experimental.emergency.CheckpointManager``: with one slice (every
CPU or single-slice job) it drops the local directory and writes the persistent tier only;
its local tier lives on the non-primary slices and is restored by broadcasting from one
slice, and it takes only a ``state`` item (plus a separately managed ``dataset``), without
our ``config``/``metadata`` items, metrics or ``best_step`` (NotImplementedError). Its
``multi_tier_checkpointing`` package needs GKE's replicator service or Pathways.

Collective calls: in multi-process runs :meth:`all_steps`, :meth:`latest_step` and
:meth:`restore` agree across processes (one small all-gather), so every process must call
them, as with Orbax's own manager.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np
import orbax.checkpoint as ocp

from workshop_dist import checkpoint as ckpt
from workshop_dist import preflight
from workshop_dist.checkpoint import (
    CheckpointConfiguration,
    CheckpointManager,
    LocalCheckpointConfiguration,
)
from workshop_dist.save_failures import SaveGuard

Tier = Literal["local", "persistent"]
TIER_KEY = "_tier"  # added to the metadata item of local checkpoints
log = logging.getLogger("workshop_dist")


class _PerProcessSavesAreIntended(logging.Filter):
    """Orbax warns at every local save that it does not log sizes without a primary host."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Global object size logging disabled" not in record.getMessage()


logging.getLogger("absl").addFilter(_PerProcessSavesAreIntended())


def layout_fingerprint(tree: Any) -> str:
    """A hash of every leaf's path, shape, dtype and sharding (mesh axes, sizes, device ids, spec)."""
    items = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        sharding = getattr(leaf, "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        spec = list(getattr(sharding, "spec", ()) or ())
        while spec and spec[-1] is None:
            spec.pop()
        devices = None
        if mesh is not None:
            devices = [list(mesh.axis_names), list(mesh.devices.shape), [int(d.id) for d in mesh.devices.flat]]
        elif sharding is not None:
            devices = sorted(int(d.id) for d in sharding.device_set)
        items.append([ckpt._path_str(path), list(np.shape(leaf)), str(leaf.dtype), [str(s) for s in spec], devices])
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def _local_item_handlers(options: ocp.options.MultiprocessingOptions) -> dict[str, Any]:
    import grain.checkpoint as grain_checkpoint

    # each process writes all it holds
    registry = ckpt.type_handlers(primary_host=None, replica_id=None, use_replica_parallel=False)
    return {
        ckpt.STATE: ocp.PyTreeCheckpointHandler(multiprocessing_options=options, type_handler_registry=registry),
        ckpt.DATA: grain_checkpoint.CheckpointHandler(),
        ckpt.CONFIG: ocp.JsonCheckpointHandler(multiprocessing_options=options),
        ckpt.METADATA: ocp.JsonCheckpointHandler(multiprocessing_options=options),
    }


class TieredCheckpointManager:
    """:class:`~workshop_dist.checkpoint.CheckpointManager`'s API over a local and a persistent tier.

    :meth:`save` writes the persistent tier (as the plain manager does) and the local one; the
    loop calls ``save(step, ..., persistent=False)`` at the steps :meth:`should_save_local`
    names between its persistent saves.
    """

    def __init__(
        self,
        directory: str | Path,
        local: LocalCheckpointConfiguration,
        *,
        max_to_keep: int = 5,
        async_save: bool = True,
        replica_parallel: bool = False,
        on_error: Literal["stop", "continue"] = "stop",
        save_retries: int = 3,
        best_mode: Literal["min", "max"] = "min",
    ):
        self.persistent = CheckpointManager(
            directory, max_to_keep=max_to_keep, async_save=async_save, replica_parallel=replica_parallel,
            on_error=on_error, save_retries=save_retries, best_mode=best_mode,
        )  # fmt: skip
        self.directory = self.persistent.directory
        self.local_config = local
        index, count = jax.process_index(), jax.process_count()
        self.local_directory = Path(local.directory).expanduser().absolute() / f"process_{index}-of-{count}"
        processes = ocp.options.MultiprocessingOptions(
            primary_host=None, active_processes={index}, barrier_sync_key_prefix=f"local-{index}"
        )
        options = ocp.CheckpointManagerOptions(
            max_to_keep=local.max_to_keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            multiprocessing_options=processes,
            save_root_metadata=False,
            create=False,  # Orbax cannot create it with active_processes set: made here
        )
        preflight.check_workdir(self.local_directory, name="checkpoint.local.directory")  # creates it
        self._local = ocp.CheckpointManager(self.local_directory, item_handlers=_local_item_handlers(processes), options=options)
        self.local_guard = SaveGuard(self._local, self.local_directory, on_error="continue", retries=0, async_save=async_save)
        self.restored_tier: Tier | None = None

    @classmethod
    def from_config(cls, directory: str | Path, config: CheckpointConfiguration) -> TieredCheckpointManager:
        if config.local is None:
            raise ValueError("checkpoint.local is not set")
        return cls(
            directory, config.local, max_to_keep=config.max_to_keep, async_save=config.async_save,
            replica_parallel=config.replica_parallel, on_error=config.on_error, save_retries=config.save_retries,
            best_mode=config.best_mode,
        )  # fmt: skip

    # ----------------------------------------------------------------------- steps

    def local_steps(self) -> list[int]:
        """This process's complete local steps."""
        return sorted(self._local.all_steps())

    def common_local_steps(self) -> list[int]:
        """The local steps every process has complete (collective in multi-process runs)."""
        return self._everywhere(self.local_steps())

    def _everywhere(self, steps: list[int]) -> list[int]:
        """Those of ``steps`` (this process's) that every process has too."""
        if jax.process_count() == 1:
            return sorted(steps)
        from jax.experimental import multihost_utils

        width = self.local_config.max_to_keep + 2  # a save in flight may briefly add one
        newest = sorted(steps)[-width:]
        padded = np.full((width,), -1, np.int64)
        padded[: len(newest)] = newest
        rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(jax.process_count(), width)
        common = {int(s) for s in rows[0] if s >= 0}
        for row in rows[1:]:
            common &= {int(s) for s in row if s >= 0}
        return sorted(common)

    def all_steps(self) -> list[int]:
        return sorted(set(self.persistent.all_steps()) | set(self.common_local_steps()))

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        return self.persistent.best_step()  # metrics go to the persistent tier only

    def should_save_local(self, step: int) -> bool:
        return step % self.local_config.every == 0

    # ----------------------------------------------------------------------- save

    def save(self, step: int, state: Any, *, metadata: Mapping[str, Any], persistent: bool = True, **items: Any) -> bool:
        """Save ``step`` to the local tier, and to the persistent one unless ``persistent=False``;
        ``items`` are :meth:`CheckpointManager.save`'s (``config``, ``data_iterator``, ``metrics``)."""
        config, data_iterator = items.get("config"), items.get("data_iterator")
        local_saved = False
        self.local_guard.settle()
        if step not in self._local.all_steps():
            tier = {"process_index": jax.process_index(), "process_count": jax.process_count(),
                    "layout": layout_fingerprint(state)}  # fmt: skip
            args = ckpt._save_args(state, data_iterator, config, {**metadata, TIER_KEY: tier})
            local_saved = self.local_guard.save(step, lambda: self._local.save(step, args=args, force=True))
        persisted = False
        if persistent:
            persisted = self.persistent.save(step, state, metadata=metadata, **items)
        return local_saved or persisted

    def wait(self) -> None:
        self.local_guard.settle()
        self.persistent.wait()

    def close(self) -> None:
        try:
            self.local_guard.close()
        finally:
            self.persistent.close()

    # ----------------------------------------------------------------------- restore

    def _local_candidate(self, step: int, abstract_state: Any) -> bool:
        """Whether this process's local ``step`` was written for exactly this topology and layout."""
        try:
            restored = self._local.restore(step, args=ocp.args.Composite(**{ckpt.METADATA: ocp.args.JsonRestore()}))
            tier = dict(restored[ckpt.METADATA] or {}).get(TIER_KEY) or {}
        except Exception as err:
            log.warning("Local checkpoint %s/%d is unreadable: %s", self.local_directory, step, err)
            return False
        return tier == {"process_index": jax.process_index(), "process_count": jax.process_count(),
                        "layout": layout_fingerprint(abstract_state)}  # fmt: skip

    def _all_agree(self, ok: bool) -> bool:
        if jax.process_count() == 1:
            return ok
        from jax.experimental import multihost_utils

        return bool(np.min(np.asarray(multihost_utils.process_allgather(np.int32(ok)))))

    def restore(
        self, abstract_state: Any, *, data_iterator: Any = None, step: int | None = None
    ) -> tuple[Any, dict, int, bool]:
        """Restore the newest step (or ``step``) from the local tier where every process has it, else persistently.

        Returns the state, its metadata, the step and whether the data position was restored;
        :attr:`restored_tier` names the tier used.
        """
        common = [s for s in self.common_local_steps() if step is None or s == step]
        usable = self._everywhere([s for s in common if self._local_candidate(s, abstract_state)])
        newest_local = max(usable, default=None)
        newest_persistent = max(self.persistent.all_steps(), default=None) if step is None else step
        if newest_local is not None and (newest_persistent is None or newest_local >= newest_persistent):
            result = self._restore_local(newest_local, abstract_state, data_iterator)
            if result is not None:
                self.restored_tier = "local"
                return result
        self.restored_tier = "persistent"
        return self.persistent.restore(abstract_state, data_iterator=data_iterator, step=step)

    def _restore_local(self, step: int, abstract_state: Any, data_iterator: Any) -> tuple[Any, dict, int, bool] | None:
        where = str(self.local_directory / str(step))
        try:
            state, metadata, data_restored = ckpt._restore_composite(
                lambda args: self._local.restore(step, args=args),
                lambda: self._local.item_metadata(step),
                where,
                abstract_state,
                data_iterator,
            )
            ok = True
        except Exception as err:
            log.warning("Local checkpoint %s could not be restored (%s); using the persistent tier.", where, err)
            ok = False
        if not self._all_agree(ok):
            return None
        metadata.pop(TIER_KEY, None)
        log.info("Restored step %d from the local tier (%s).", step, self.local_directory.parent)
        return state, metadata, step, data_restored
