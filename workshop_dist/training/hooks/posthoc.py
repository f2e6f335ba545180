"""Snapshots of the post-hoc EMA's power-function profiles every ``ema.posthoc.snapshot_every`` steps.

Each is ``WORKDIR/posthoc_ema/<step>/``: the profiles only (no optimizer state, no data
position), written synchronously by every process like a checkpoint directory, on local disk
or ``gs://``. They are never pruned: reconstruction (:func:`~workshop_dist.training.posthoc_ema.
write_reconstructions`) uses all of them.
"""

from __future__ import annotations

import logging
from typing import Any

from workshop_dist import checkpoint, storage
from workshop_dist.training.hooks import next_multiple

log = logging.getLogger("workshop_dist")


class PosthocSnapshotHook:
    """Writes ``{profile name: params}`` of the power-function EMAs, with their widths in the metadata."""

    kind = "save"

    def __init__(self, directory: storage.AnyPath, every: int, widths: dict[str, float]):
        self.directory, self.every, self.widths = directory, every, dict(widths)  # name -> sigma_rel

    @classmethod
    def for_run(cls, config: Any, workdir: storage.AnyPath | None) -> PosthocSnapshotHook | None:
        """The hook of ``training.ema.posthoc`` (None when it is off or there is no workdir)."""
        if config is None or workdir is None:
            return None
        from workshop_dist.training.config import profile_name

        return cls(workdir / "posthoc_ema", config.snapshot_every, {profile_name("sigma_rel", w): w for w in config.sigma_rels})

    def next_step(self, step: int) -> int | None:
        return next_multiple(step, self.every)

    def __call__(self, info: Any) -> None:
        self.write(info.step, info.state)

    def write(self, step: int, state: Any) -> storage.AnyPath:
        profiles = {name: state.ema_profiles[name] for name in self.widths}
        path = self.directory / str(step)
        checkpoint.save_checkpoint_dir(path, profiles, metadata={"step": step, "sigma_rels": self.widths})
        log.debug("Post-hoc EMA snapshot of step %d written to %s", step, path)
        return path
