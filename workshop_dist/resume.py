"""What ``workshop-train`` does at a start in a workdir that holds checkpoints, decided before anything is built.

The Trainer builds its learning-rate schedules when it is constructed, so the checkpoint's config
is read first (JSON only, :func:`workshop_dist.resume_config.saved_config`) and :func:`plan` says:

- which fields differ from the checkpoint's (``field: old -> new``), to log, or to refuse with
  ``training.on_config_change=refuse`` (exit 2 with the list);
- which schedule the new run length would re-stretch, and the config with that schedule's length
  pinned to the old run's, so the learning rate goes on where it was (see :mod:`workshop_dist.resume_config`);
- whether the run is finished already: then nothing is built, trained or written.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any

from workshop_dist import resume_config, storage
from workshop_dist.config import ConfigError
from workshop_dist.resume_config import ConfigChange, ScheduleChange

log = logging.getLogger("workshop_dist")
NOT_A_CHANGE = ("training.on_config_change",)  # how to resume is not part of the run


@dataclasses.dataclass(frozen=True)
class ResumePlan:
    """A start's decision: the config to build from (schedule pins applied) and what changed."""

    config: Any  # ExperimentConfiguration
    step: int | None  # the checkpoint this start resumes from (None: nothing to resume)
    changes: list[ConfigChange]  # the checkpoint's config -> ``config``
    schedules: list[ScheduleChange]  # learning rates that the changes move at ``step``
    total_steps: int | None  # the run's length under ``config``

    @property
    def finished(self) -> bool:
        return self.step is not None and self.total_steps is not None and self.step >= self.total_steps

    def finished_message(self) -> str:
        """One line: where the run ended and which field to raise to train on."""
        length = self.config.training.length
        if length.max_steps is not None and length.max_steps == self.total_steps:
            setting, field = f"training.length.max_steps={length.max_steps}", "training.length.max_steps"
        else:
            setting, field = f"training.num_epochs={self.config.training.num_epochs}", "training.num_epochs"
        return f"Run already finished at step {self.step} ({setting}); nothing to do. Raise {field} to train on."


def checkpoint_dir(config: Any, workdir: storage.AnyPath) -> storage.AnyPath:
    """Where the run's checkpoints are: ``training.checkpoint.directory``, else ``WORKDIR/checkpoints``."""
    directory = config.training.checkpoint.directory
    return storage.as_path(directory, absolute=False) if directory else workdir / "checkpoints"


def plan(config: Any, workdir: storage.AnyPath, steps_per_epoch: int | None) -> ResumePlan:
    """Compare ``config`` with the config of the latest checkpoint in the run's checkpoint directory.

    Raises :class:`ConfigError` when they differ and ``training.on_config_change`` is ``refuse``.
    """
    total = config.training.total_steps(steps_per_epoch)
    saved = resume_config.saved_config(checkpoint_dir(config, workdir)) if config.training.checkpoint.resume else None
    if saved is None:  # a fresh start (resume=false with checkpoints is refused by the caller)
        return ResumePlan(config, None, [], [], total)
    step, raw = saved
    old, readable = _as_this_version_reads_it(type(config), raw)
    schedules: list[ScheduleChange] = []
    if readable:
        schedules = resume_config.schedule_changes(old["training"], config.model_dump(mode="json")["training"],
                                                   step, steps_per_epoch)  # fmt: skip
        pins = [f"{field}={value}" for change in schedules for field, value in change.overrides.items()]
        if pins:
            config = type(config).from_dict(config.model_dump(mode="json"), pins)
            total = config.training.total_steps(steps_per_epoch)
    changes = [c for c in resume_config.config_diff(old, config.model_dump(mode="json")) if c.field not in NOT_A_CHANGE]
    result = ResumePlan(config, step, changes, schedules if changes else [], total)
    if changes and config.training.on_config_change == "refuse":
        raise ConfigError(
            f"The config differs from the one checkpoint {step} was saved with (training.on_config_change=refuse):\n"
            f"{describe(result)}\nResume with the checkpoint's config, or set training.on_config_change=warn."
        )
    return result


def describe(result: ResumePlan) -> str:
    """The changes, one ``  field: old -> new  [kind]`` line each, then each moved learning rate."""
    lines = [resume_config.format_changes(result.changes)] if result.changes else []
    return "\n".join(lines + [f"  {change}" for change in result.schedules])


def log_changes(result: ResumePlan, logger: Any) -> None:
    """Log what changed since the checkpoint (a warning unless every change is harmless)."""
    if not result.changes:
        return
    harmless = all(change.kind == "harmless" for change in result.changes)
    (logger.info if harmless else logger.warning)(
        "Resuming from step %d with a config that differs from the checkpoint's (checkpoint -> now):\n%s",
        result.step, describe(result),
    )  # fmt: skip


def _as_this_version_reads_it(cls: Any, raw: dict) -> tuple[dict, bool]:
    """The saved config validated by this version (old names moved, new fields at their defaults), so
    only real changes show; the raw dict (and False) when it no longer validates."""
    try:
        with warnings.catch_warnings():  # deprecated names in an old checkpoint are not the user's to fix
            warnings.simplefilter("ignore")
            return cls.from_dict(raw).model_dump(mode="json"), True
    except Exception as err:  # a field this version removed: compare as saved
        log.debug("The checkpoint's config does not validate here (%s); comparing it as saved.", err)
        return raw, False
