"""Optimizers and learning-rate schedules from configuration, built only from optax parts.

Schedule semantics (all step counts are optimizer steps, starting at 0):

- ``constant``: ``lr`` (after the optional linear warmup 0 -> lr over ``warmup_steps``).
- ``cosine``: warmup, then cosine decay to ``lr * min_lr_ratio`` reached at step
  ``cycle_length`` (which counts the warmup), flat afterwards.
- ``linear``: warmup, then linear decay to ``lr * min_lr_ratio`` reached at ``total_steps``.
- ``exponential``: warmup, then ``lr * decay_rate ** ((step - warmup_steps) / decay_steps)``
  (``staircase`` floors the exponent).
- ``step``: ``lr * gamma ** (step // step_size)``, no lower cap.
- ``multistep``: ``lr * gamma ** (number of milestones <= step)``.

``cycle_length`` / ``total_steps`` default to the run's total number of steps.
For ``step``/``multistep`` with warmup, steps and milestones stay absolute.

A field that the chosen type does not use is an error when the user sets it to anything but
its default (``milestones`` with ``cosine``, ``momentum`` with ``adam``): a silently ignored
setting is a wrong experiment. :data:`OPTIMIZER_FIELD_USERS` and
:data:`SCHEDULER_FIELD_USERS` say which type uses which field; they drive the check and the
table appended to this docstring.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import jax.numpy as jnp
import optax
import pydantic

from workshop_dist.config import ConfigError, StrictConfig, ignored_fields

OptimizerType = Literal["adam", "adamw", "sgd", "rmsprop", "adagrad", "lamb"]
SchedulerType = Literal["constant", "cosine", "linear", "exponential", "step", "multistep"]

# Which types read each type-specific field (read off create_optimizer / create_schedule).
# Every other field (learning_rate, weight_decay, clipping, warmup_steps) applies to all.
OPTIMIZER_FIELD_USERS: dict[str, tuple[str, ...]] = {
    "beta1": ("adam", "adamw", "lamb"),
    "beta2": ("adam", "adamw", "lamb"),
    "eps": ("adam", "adamw", "lamb", "rmsprop", "adagrad"),
    "momentum": ("sgd", "rmsprop"),
    "nesterov": ("sgd", "rmsprop"),
    "decay": ("rmsprop",),
}
SCHEDULER_FIELD_USERS: dict[str, tuple[str, ...]] = {
    "cycle_length": ("cosine",),
    "min_lr_ratio": ("cosine", "linear"),
    "total_steps": ("linear",),
    "decay_rate": ("exponential",),
    "decay_steps": ("exponential",),
    "staircase": ("exponential",),
    "step_size": ("step",),
    "gamma": ("step", "multistep"),
    "milestones": ("multistep",),
}


def ignored_field_message(field: str, kind_field: str, kind: str, users: tuple[str, ...]) -> str:
    """The one-line error for a set field that ``kind`` would ignore."""
    return (
        f"{field} is used only by {kind_field} {', '.join(users)}; with {kind_field} '{kind}' it would be "
        f"ignored: remove it, or pick a {kind_field} that uses it"
    )


def _check_field_used(
    config_cls: type[pydantic.BaseModel], field: str, value: Any, kind: str | None, kind_field: str, table: Mapping
) -> None:
    """Raise if ``field`` (set to ``value``) is not its default and ``kind`` does not read it.

    A value equal to the default passes: resolved configs (``WORKDIR/config.yaml``,
    ``--print-config``) spell out every field and must load again.
    """
    users = table.get(field)
    if users is None or kind is None or kind in users:
        return
    if value == config_cls.model_fields[field].get_default(call_default_factory=True):
        return
    raise ValueError(ignored_field_message(field, kind_field, kind, users))


def _check_set_fields_used(config: pydantic.BaseModel, kind_field: str, table: Mapping) -> None:
    kind = getattr(config, kind_field)
    for field in sorted(config.model_fields_set & set(table)):
        _check_field_used(type(config), field, getattr(config, field), kind, kind_field, table)


def _field_users_table(title: str, kind_field: str, table: Mapping[str, tuple[str, ...]]) -> str:
    rows = "\n".join(f"- ``{field}``: {', '.join(users)}" for field, users in table.items())
    return f"\n{title} fields and the ``{kind_field}`` values that use them:\n\n{rows}\n"


__doc__ = (
    (__doc__ or "")
    + _field_users_table("Optimizer", "optimizer_type", OPTIMIZER_FIELD_USERS)
    + _field_users_table("Scheduler", "scheduler_type", SCHEDULER_FIELD_USERS)
)


def _field_used_validator(type_field: str, users: dict[str, Any]) -> Any:
    """A field validator rejecting a field set for a ``type_field`` value that ignores it.

    Field-level (so the error names the field); runs only for fields given as input.
    """

    def used_by_type(cls: type, value: Any, info: pydantic.ValidationInfo) -> Any:
        _check_field_used(cls, info.field_name, value, info.data.get(type_field), type_field, users)
        return value

    return pydantic.field_validator(*users)(classmethod(used_by_type))


class OptimizerConfiguration(StrictConfig):
    """Which optax optimizer, its hyperparameters and gradient clipping.

    ``gradient_clip_norm`` is the run's one clip-norm setting (per optimizer). ``name`` is accepted
    (the original design passes it) and ignored.
    """

    optimizer_type: OptimizerType = "adam"
    learning_rate: float = pydantic.Field(1e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = pydantic.Field(
        0.0, ge=0, description="Decoupled for adamw/lamb; an L2 term (coupled) for the others."
    )
    beta1: float = pydantic.Field(0.9, ge=0, lt=1)
    beta2: float = pydantic.Field(0.999, ge=0, lt=1)
    eps: float = pydantic.Field(1e-8, gt=0)
    momentum: float = pydantic.Field(0.0, ge=0, lt=1, description="SGD and RMSProp momentum.")
    nesterov: bool = False
    decay: float = pydantic.Field(0.9, gt=0, lt=1, description="RMSProp squared-gradient average decay.")
    gradient_clip_norm: float | None = pydantic.Field(
        None, gt=0, description="Clip gradients to this global L2 norm (wins over gradient_clip_value)."
    )
    gradient_clip_value: float | None = pydantic.Field(None, gt=0, description="Clip each gradient to [-v, v].")

    _used_by_type = _field_used_validator("optimizer_type", OPTIMIZER_FIELD_USERS)
    _ignore_name = ignored_fields("name")

    @pydantic.model_validator(mode="after")
    def _check(self) -> OptimizerConfiguration:
        _check_set_fields_used(self, "optimizer_type", OPTIMIZER_FIELD_USERS)  # e.g. type changed by assignment
        if self.nesterov and self.momentum == 0 and self.optimizer_type in ("sgd", "rmsprop"):
            raise ValueError("nesterov=true needs momentum > 0")
        return self


class SchedulerConfiguration(StrictConfig):
    """Learning-rate schedule; see the module docstring for each type's exact shape (``name`` is ignored)."""

    scheduler_type: SchedulerType = "constant"
    warmup_steps: int = pydantic.Field(0, ge=0)
    cycle_length: int | None = pydantic.Field(None, gt=0, description="cosine: step where the minimum is reached.")
    min_lr_ratio: float = pydantic.Field(0.0, ge=0, le=1)
    total_steps: int | None = pydantic.Field(None, gt=0, description="linear: step where the minimum is reached.")
    step_size: int | None = pydantic.Field(None, gt=0, description="step: decay every step_size steps.")
    gamma: float = pydantic.Field(0.1, gt=0, description="step/multistep: factor applied at each decay.")
    milestones: list[int] = pydantic.Field(default_factory=list, description="multistep: decay steps.")
    decay_rate: float | None = pydantic.Field(None, gt=0, description="exponential: factor per decay_steps.")
    decay_steps: int | None = pydantic.Field(None, gt=0)
    staircase: bool = False

    _used_by_type = _field_used_validator("scheduler_type", SCHEDULER_FIELD_USERS)
    _ignore_name = ignored_fields("name")

    @pydantic.model_validator(mode="after")
    def _check(self) -> SchedulerConfiguration:
        _check_set_fields_used(self, "scheduler_type", SCHEDULER_FIELD_USERS)
        kind = self.scheduler_type
        if kind == "cosine" and self.cycle_length is not None and self.cycle_length <= self.warmup_steps:
            raise ValueError(f"cycle_length ({self.cycle_length}) must exceed warmup_steps ({self.warmup_steps})")
        if kind == "linear" and self.total_steps is not None and self.total_steps <= self.warmup_steps:
            raise ValueError(f"total_steps ({self.total_steps}) must exceed warmup_steps ({self.warmup_steps})")
        if kind == "exponential" and (self.decay_rate is None or self.decay_steps is None):
            raise ValueError("scheduler_type 'exponential' needs decay_rate and decay_steps")
        if kind == "step" and self.step_size is None:
            raise ValueError("scheduler_type 'step' needs step_size")
        if kind == "multistep":
            if not self.milestones:
                raise ValueError("scheduler_type 'multistep' needs milestones, e.g. [1000, 2000]")
            if any(b <= a for a, b in zip(self.milestones, self.milestones[1:], strict=False)) or self.milestones[0] <= 0:
                raise ValueError(f"milestones must be positive and strictly increasing, got {self.milestones}")
        return self


def create_schedule(
    config: SchedulerConfiguration | None, base_lr: float, total_steps: int | None = None
) -> optax.Schedule:
    """The optax schedule for ``config`` (constant ``base_lr`` when ``config`` is None)."""
    if config is None:
        return optax.constant_schedule(base_lr)
    warmup = config.warmup_steps
    end_lr = base_lr * config.min_lr_ratio
    kind = config.scheduler_type

    def run_length(value: int | None, field: str) -> int:
        length = value if value is not None else total_steps
        if length is None:
            raise ConfigError(
                f"scheduler.{field} is not set and the run length is unknown: set scheduler.{field}, "
                "or training.length.steps_per_epoch / training.length.max_steps so it can default to the total steps."
            )
        if length <= warmup:
            if value is None:
                raise ConfigError(
                    f"The run has {length} steps, not more than scheduler.warmup_steps ({warmup}): lower "
                    f"training.scheduler.warmup_steps, train longer, or set scheduler.{field}."
                )
            raise ConfigError(f"scheduler.{field} ({length}) must exceed scheduler.warmup_steps ({warmup}).")
        return length

    if kind == "cosine":
        length = run_length(config.cycle_length, "cycle_length")
        return optax.warmup_cosine_decay_schedule(0.0, base_lr, warmup, length, end_lr)
    if kind == "constant":
        main = optax.constant_schedule(base_lr)
    elif kind == "linear":
        length = run_length(config.total_steps, "total_steps")
        main = optax.linear_schedule(base_lr, end_lr, length - warmup)
    elif kind == "exponential":
        main = optax.exponential_decay(base_lr, config.decay_steps, config.decay_rate, staircase=config.staircase)
    elif kind == "step":
        decay = optax.exponential_decay(base_lr, config.step_size, config.gamma, staircase=True)
        return _with_absolute_warmup(decay, base_lr, warmup)
    else:  # multistep
        boundaries = {milestone: config.gamma for milestone in config.milestones}
        return _with_absolute_warmup(optax.piecewise_constant_schedule(base_lr, boundaries), base_lr, warmup)
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, base_lr, warmup), main], [warmup])


def _with_absolute_warmup(main: optax.Schedule, base_lr: float, warmup: int) -> optax.Schedule:
    """Linear warmup in front of a schedule whose own step numbers stay absolute."""
    if warmup == 0:
        return main
    ramp = optax.linear_schedule(0.0, base_lr, warmup)
    return lambda step: jnp.where(step < warmup, ramp(step), main(step))


def create_optimizer(config: OptimizerConfiguration, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Clipping, then the configured optimizer driven by ``schedule``."""
    parts: list[optax.GradientTransformation] = []
    if config.gradient_clip_norm is not None:
        parts.append(optax.clip_by_global_norm(config.gradient_clip_norm))
    elif config.gradient_clip_value is not None:
        parts.append(optax.clip(config.gradient_clip_value))
    kind = config.optimizer_type
    coupled_decay = config.weight_decay > 0 and kind not in ("adamw", "lamb")
    if coupled_decay:
        parts.append(optax.add_decayed_weights(config.weight_decay))
    momentum = config.momentum or None
    if kind == "adam":
        opt = optax.adam(schedule, b1=config.beta1, b2=config.beta2, eps=config.eps)
    elif kind == "adamw":
        opt = optax.adamw(schedule, b1=config.beta1, b2=config.beta2, eps=config.eps, weight_decay=config.weight_decay)
    elif kind == "lamb":
        opt = optax.lamb(schedule, b1=config.beta1, b2=config.beta2, eps=config.eps, weight_decay=config.weight_decay)
    elif kind == "sgd":
        opt = optax.sgd(schedule, momentum=momentum, nesterov=config.nesterov)
    elif kind == "rmsprop":
        opt = optax.rmsprop(schedule, decay=config.decay, eps=config.eps, momentum=momentum, nesterov=config.nesterov)
    else:  # adagrad
        opt = optax.adagrad(schedule, eps=config.eps)
    parts.append(opt)
    return optax.chain(*parts) if len(parts) > 1 else opt
