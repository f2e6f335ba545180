"""What changed between a checkpoint's config and this start's, and what it does to the run.

A resumed run stores its resolved experiment config in every checkpoint (the ``config``
item). At the next start, :func:`config_diff` lists the fields that differ as
``field: old -> new`` and :func:`classify` says what each change does:

- ``shape``: changes the arrays of the training state (model sizes, optimizer type, EMA or
  gradient clipping switched on/off...): the checkpoint cannot be restored into it.
- ``model``: a model-specific ``model.parameters`` entry; whether it changes parameter shapes
  depends on the family, so the restore's shape check decides.
- ``schedule``: moves the learning rate (learning rate, schedule, or the run length that a
  schedule's length defaults to); see :func:`schedule_changes`.
- ``data``: changes which examples come when (data source, batch size, seed, mesh): the run
  continues, but no longer bit-identical to one that never stopped.
- ``harmless``: logging, checkpointing, names, performance knobs.

Learning-rate continuity. A cosine or linear schedule whose length is not set follows the
run's length, so extending a run (``training.length.max_steps`` 60 -> 90) would re-stretch it and
make the learning rate jump back up at the resume step. :func:`schedule_changes` names the
learning rate before and after at the resume step and gives the overrides that keep it
continuous: the schedule keeps its original length (``scheduler.cycle_length`` /
``scheduler.total_steps`` pinned to it), so every step the old run would have taken gets
exactly the learning rate it would have had, and the extension trains on at the schedule's
final rate. To give an extension a decay of its own, set the length explicitly.

Pure functions over plain dicts (``ExperimentConfiguration.model_dump(mode="json")``):
nothing here touches devices or files.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

ChangeKind = Literal["shape", "model", "schedule", "data", "harmless"]


class _Missing:
    def __repr__(self) -> str:
        return "(unset)"


MISSING: Any = _Missing()  # a field one of the two configs does not have

# First matching pattern wins; fields nobody lists are harmless.
_RULES: tuple[tuple[str, ChangeKind], ...] = (
    ("model.name", "harmless"),
    ("model.remat", "harmless"),
    ("model.dtype", "data"),
    ("model.parameters.*", "model"),
    ("model.parameters", "model"),
    ("model.*", "shape"),
    ("training.optimizer.optimizer_type", "shape"),
    ("training.optimizers.*.optimizer_type", "shape"),
    ("training.optimizers", "shape"),  # groups appear or disappear
    ("training.optimizers.*.frozen", "shape"),  # a group's optimizer state and EMA appear or disappear
    ("training.frozen", "shape"),  # so do those of the params it names
    ("training.init_from*", "harmless"),  # read only by a run's first start
    ("training.optimizers.*.scheduler*", "schedule"),
    ("training.optimizers.*.learning_rate", "schedule"),
    ("training.optimizer.learning_rate", "schedule"),
    ("training.scheduler*", "schedule"),
    ("training.num_epochs", "schedule"),
    ("training.length.max_steps", "schedule"),
    ("training.length.steps_per_epoch", "schedule"),
    ("training.ema.posthoc.snapshot_every", "harmless"),
    ("training.ema.posthoc*", "shape"),  # profiles appear, disappear or change width
    ("training.ema.eval_decay", "shape"),  # another decay's average becomes ema_params
    ("training.batch_size", "data"),
    ("training.seed", "data"),
    ("data.*", "data"),
    ("mesh.*", "data"),
    ("training.performance.grad_accum_steps", "data"),
    ("training.performance.precision", "data"),
)
# Switching these between "off" (None / 0 / False) and "on" adds or removes optimizer or EMA state.
_ON_OFF_SHAPE = (
    "training.ema.decay",
    "training.optimizer.gradient_clip_norm",
    "training.optimizer.gradient_clip_value",
    "training.optimizer.weight_decay",
    "training.optimizer.momentum",
    "training.optimizers.*.gradient_clip_norm",
    "training.optimizers.*.gradient_clip_value",
    "training.optimizers.*.weight_decay",
    "training.optimizers.*.momentum",
)


class ConfigChange(NamedTuple):
    """One field that differs: ``(field, old, new)``; ``str()`` is ``field: old -> new``."""

    field: str
    old: Any
    new: Any

    @property
    def kind(self) -> ChangeKind:
        return classify(self)

    def __str__(self) -> str:
        return f"{self.field}: {_show(self.old)} -> {_show(self.new)}"


def _show(value: Any) -> str:
    if value is MISSING:
        return "(unset)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    return str(value)


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[ConfigChange]:
    """Every leaf field whose value differs, as ``(dotted.field, old, new)``, in field order.

    Nested mappings are compared field by field; lists and other values as a whole. A field
    present on one side only is reported with :data:`MISSING` on the other.
    """
    changes: list[ConfigChange] = []
    for key in [*old, *(k for k in new if k not in old)]:
        field = f"{prefix}{key}"
        a, b = old.get(key, MISSING), new.get(key, MISSING)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            changes += config_diff(a, b, prefix=f"{field}.")
        elif not _same(a, b):
            changes.append(ConfigChange(field, a, b))
    return changes


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def _off(value: Any) -> bool:
    return value is None or value is MISSING or value is False or value == 0


def classify(change: ConfigChange) -> ChangeKind:
    """What ``change`` does to a resumed run (see the module docstring)."""
    field = change.field
    if any(fnmatch.fnmatchcase(field, pattern) for pattern in _ON_OFF_SHAPE):
        return "shape" if _off(change.old) != _off(change.new) else "harmless"
    if fnmatch.fnmatchcase(field, "training.optimizers.*") and (change.old is MISSING or change.new is MISSING):
        return "shape"  # a whole parameter group added or removed
    for pattern, kind in _RULES:
        if fnmatch.fnmatchcase(field, pattern):
            return kind
    return "harmless"


def format_changes(changes: list[ConfigChange]) -> str:
    """One line per change, the kind in brackets when it is not harmless."""
    return "\n".join(f"  {c}" + ("" if c.kind == "harmless" else f"  [{c.kind}]") for c in changes)


# ----------------------------------------------------------------------------- learning rate

_LENGTH_FIELD = {"cosine": "cycle_length", "linear": "total_steps"}  # schedules whose length defaults to the run's


class ScheduleChange(NamedTuple):
    """The learning rate of one optimizer (``group`` None: ``training.optimizer``) at the resume step."""

    group: str | None
    step: int
    before: float  # what the checkpoint's config gives at ``step``
    after: float  # what the new config gives at ``step``, unchanged
    continuous: float  # with :attr:`overrides` applied
    overrides: dict[str, int]  # dotted field -> value that keeps the schedule's original length

    def __str__(self) -> str:
        who = "learning rate" if self.group is None else f"learning rate of '{self.group}'"
        text = f"{who} at step {self.step}: {self.before:.4g} -> {self.after:.4g}"
        if self.overrides:
            pins = ", ".join(f"{k}={v}" for k, v in self.overrides.items())
            text += f" (kept at {self.continuous:.4g} with {pins}: the extension continues at the schedule's final rate)"
        return text


def schedule_changes(
    old_training: Mapping[str, Any], new_training: Mapping[str, Any], step: int, steps_per_epoch: int | None
) -> list[ScheduleChange]:
    """The learning rates at ``step`` under the old and the new ``training`` section, per optimizer.

    Only optimizers whose learning rate at ``step`` differs are listed. ``overrides`` are empty
    unless the new run length re-stretches a schedule whose length is not set; applied to the
    new config they make its schedule equal the old one at every step.
    """
    from workshop_dist.training.config import TrainingConfiguration

    old, new = TrainingConfiguration.model_validate(dict(old_training)), TrainingConfiguration.model_validate(dict(new_training))
    old_total, new_total = old.total_steps(steps_per_epoch), new.total_steps(steps_per_epoch)
    changes = []
    for group, prefix in _optimizers(new):
        old_lr, old_schedule = _schedule_of(old, group)
        new_lr, new_schedule = _schedule_of(new, group)
        if old_lr is None:  # a group the old run did not have: nothing to be continuous with
            continue
        before = _rate(old_schedule, old_lr, old_total, step)
        after = _rate(new_schedule, new_lr, new_total, step)
        overrides: dict[str, int] = {}
        pinned = new_schedule
        length_field = _LENGTH_FIELD.get(new_schedule.scheduler_type) if new_schedule is not None else None
        if length_field and getattr(new_schedule, length_field) is None:  # it would follow the new run length
            old_length = _length(old_schedule, old_total)  # (the old one may be pinned already: a second extension)
            if old_length not in (None, new_total) and old_schedule.scheduler_type == new_schedule.scheduler_type:
                overrides[f"{prefix}.{length_field}"] = old_length
                pinned = new_schedule.model_copy(update={length_field: old_length})
        continuous = _rate(pinned, new_lr, new_total, step)
        if before != after or overrides:
            changes.append(ScheduleChange(group, step, before, after, continuous, overrides))
    return changes


def _optimizers(training: Any) -> list[tuple[str | None, str]]:
    """(group, dotted prefix of the schedule it follows) for each optimizer of the run."""
    if not training.optimizers:
        return [(None, "training.scheduler")]
    return [
        (name, f"training.optimizers.{name}.scheduler" if opt.scheduler is not None else "training.scheduler")
        for name, opt in training.optimizers.items()
    ]


def _schedule_of(training: Any, group: str | None) -> tuple[float | None, Any]:
    if group is None:
        return training.optimizer.learning_rate, training.scheduler
    opt = (training.optimizers or {}).get(group)
    if opt is None:
        return None, None
    return opt.learning_rate, opt.scheduler or training.scheduler


def _length(schedule: Any, total: int | None) -> int | None:
    field = _LENGTH_FIELD.get(schedule.scheduler_type) if schedule is not None else None
    if field is None:
        return None
    return getattr(schedule, field) or total


def _rate(schedule: Any, learning_rate: float, total: int | None, step: int) -> float:
    from workshop_dist.optim import create_schedule

    return float(create_schedule(schedule, learning_rate, total)(step))


# ----------------------------------------------------------------------------- the checkpoint's config


def saved_config(checkpoint_dir: str | Any, step: int | None = None) -> tuple[int, dict] | None:
    """``(step, config)`` of the newest complete checkpoint in ``checkpoint_dir`` (or of ``step``) with a
    readable ``config`` item, None when there is none. Reads JSON only, before any model is built,
    so the loop can apply :func:`schedule_changes`' overrides to the config it builds from."""
    import orbax.checkpoint as ocp

    from workshop_dist import storage

    root = storage.as_path(checkpoint_dir)
    if not root.exists():
        return None
    steps = sorted((int(p.name) for p in root.iterdir() if p.name.isdigit()), reverse=True)
    for candidate in [s for s in steps if step is None or s == step]:
        item = root / str(candidate) / "config"
        if not (root / str(candidate) / "commit_success.txt").exists() or not item.exists():
            continue  # incomplete (a save on gs:// in progress or killed), or saved without a config
        checkpointer = ocp.Checkpointer(ocp.JsonCheckpointHandler())
        try:
            return candidate, dict(checkpointer.restore(item, args=ocp.args.JsonRestore()))
        except Exception:  # unreadable: an older one may do; the restore reports damage itself
            continue
        finally:
            checkpointer.close()
    return None
