"""Configuration of the training run (the ``training`` section), as in the original design.

The original design's names stay at the top (``name``, ``batch_size``, ``num_epochs``,
``optimizer``, ``scheduler``) with the seed, the per-group ``optimizers`` and the NaN policy;
everything else sits in a section that says what it is::

    length       how long: max_steps, steps_per_epoch
    cadence      when the periodic actions run: log_every, eval_every, save_every, num_samples, profile_steps
    ema          the params' moving average: decay, start_step, for_eval
    performance  same result, other speed or memory: precision, grad_accum_steps, steps_per_call,
                 data_on_device, max_steps_in_flight
    checkpoint   where and how checkpoints are written, and where a run starts from

The older flat names (``log_frequency``, ``ema_decay``, ``grad_accum_steps``, ...) still work for
one release, with a DeprecationWarning naming the new place (:data:`MOVED`). The one clip-norm
setting is ``optimizer.gradient_clip_norm`` (each group's own with ``optimizers``);
``training.gradient_clip_norm`` is folded into it, with a warning.
"""

from __future__ import annotations

import inspect
import os
import warnings
from typing import Any, Literal

import pydantic

from workshop_dist.checkpoint import DEPRECATED_ALIASES, CheckpointConfiguration
from workshop_dist.config import StrictConfig, ignored_fields
from workshop_dist.optim import OptimizerConfiguration, SchedulerConfiguration


class GroupOptimizerConfiguration(OptimizerConfiguration):
    """One parameter group's optimizer (``training.optimizers.<group>``) and optional own schedule, or
    ``frozen: true`` (also spelled ``<group>: frozen``): the group is held fixed (:mod:`workshop_dist.training.frozen`)."""

    scheduler: SchedulerConfiguration | None = pydantic.Field(
        None, description="This group's schedule (default: training.scheduler)."
    )
    frozen: bool = pydantic.Field(
        False, description="Hold this group fixed: no gradients, no optimizer state, not in the EMA (still checkpointed)."
    )

    @pydantic.model_validator(mode="before")
    @classmethod
    def _frozen_shorthand(cls, data: Any) -> Any:
        if isinstance(data, str) and data.lower() in ("frozen", "none"):
            return {"frozen": True}
        return data

    @pydantic.model_validator(mode="after")
    def _frozen_alone(self) -> GroupOptimizerConfiguration:
        fields = type(self).model_fields  # a resolved config spells out defaults: only other values count
        extra = sorted(k for k in self.model_fields_set - {"frozen"} if getattr(self, k) != fields[k].get_default(call_default_factory=True))
        if self.frozen and extra:
            raise ValueError(f"a frozen group has no optimizer: remove {extra} (or frozen: true)")
        return self


class InitFromConfiguration(StrictConfig):
    """``training.init_from``: start the params (all or some) from another run's checkpoint, with a fresh
    optimizer and step 0 (:mod:`workshop_dist.training.init_from`). A run with its own checkpoint resumes
    from it and ignores this."""

    checkpoint: str = pydantic.Field(
        description="A run's workdir, its checkpoints directory, or one step directory (local or gs://); "
        "a directory of steps gives its latest."
    )
    include: list[str] = pydantic.Field(
        default_factory=lambda: ["*"], description="Patterns over '/'-joined param paths (this model's names) to take."
    )
    exclude: list[str] = pydantic.Field(default_factory=list, description="Patterns of params to leave as initialised.")
    rename: dict[str, str] | list[tuple[str, str]] = pydantic.Field(
        default_factory=dict,
        description="Checkpoint name -> this model's name: {from_prefix: to_prefix}, or [[regex, replacement], ...].",
    )


class LengthConfiguration(StrictConfig):
    """How long the run is: ``num_epochs`` x ``steps_per_epoch``, capped by ``max_steps``."""

    max_steps: int | None = pydantic.Field(None, gt=0, description="Stop after this many steps in total.")
    steps_per_epoch: int | None = pydantic.Field(
        None, gt=0, description="Steps per epoch (default: derived from the data set size)."
    )


class CadenceConfiguration(StrictConfig):
    """When the loop's periodic actions run (in optimizer steps)."""

    log_every: int = pydantic.Field(100, gt=0, description="Read and write metrics every this many steps.")
    eval_every: int | None = pydantic.Field(
        None, gt=0, description="Evaluate every this many steps (default: at the end of each epoch)."
    )
    save_every: int = pydantic.Field(1000, gt=0, description="Save a checkpoint every this many steps.")
    num_samples: int = pydantic.Field(64, ge=0, description="Images in the sample grid written at each evaluation (0: none).")
    profile_steps: tuple[int, int] | None = pydantic.Field(
        None, description="(first step, number of steps) to trace with jax.profiler into WORKDIR/profile."
    )

    @pydantic.field_validator("profile_steps")
    @classmethod
    def _profile_window(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and (value[0] < 1 or value[1] < 1):
            raise ValueError(f"profile_steps is (first step >= 1, count >= 1), got {list(value)}")
        return value


class PosthocEMAConfiguration(StrictConfig):
    """EDM2's post-hoc EMA: power-function EMAs tracked in the state, snapshots of them written to
    ``WORKDIR/posthoc_ema/<step>``; ``workshop-train --posthoc-ema WORKDIR --sigma-rel ...`` then
    reconstructs the EMA of any width (:mod:`workshop_dist.training.posthoc_ema`)."""

    sigma_rels: list[float] = pydantic.Field(
        [0.05, 0.10], min_length=1, description="Relative widths of the tracked profiles (EDM2: 0.05 and 0.10)."
    )
    snapshot_every: int = pydantic.Field(1000, ge=1, description="Write a snapshot of every profile this often.")

    @pydantic.field_validator("sigma_rels")
    @classmethod
    def _widths(cls, value: list[float]) -> list[float]:
        from workshop_dist.training.posthoc_ema import SIGMA_REL_MAX

        bad = [w for w in value if not 0 < w <= SIGMA_REL_MAX]
        if bad or len(set(value)) != len(value):
            raise ValueError(f"sigma_rels must be distinct widths in (0, {SIGMA_REL_MAX:.4f}], got {value}")
        return value


class EMAConfiguration(StrictConfig):
    """Moving averages of the params, kept in the state (sharded like them) and checkpointed."""

    decay: float | list[float] | None = pydantic.Field(
        None, description="An EMA decay in (0, 1), or several ([0.999, 0.9999]) tracked at once; null: no EMA."
    )
    eval_decay: float | None = pydantic.Field(
        None, description="Which of the decays evaluation and sampling use (default: the first)."
    )
    start_step: int = pydantic.Field(0, ge=0, description="The EMAs copy the params until this step.")
    for_eval: bool | None = pydantic.Field(
        None, description="Evaluate and sample with the EMA params (default: true when the EMA is on)."
    )
    posthoc: PosthocEMAConfiguration | None = pydantic.Field(
        None, description="EDM2's post-hoc EMA (power-function profiles and their snapshots); null: off."
    )

    @pydantic.model_validator(mode="after")
    def _decays(self) -> EMAConfiguration:
        decays = self.decays
        if any(not 0 < d < 1 for d in decays) or len(set(decays)) != len(decays):
            raise ValueError(f"decay: distinct values in (0, 1) needed, got {self.decay}")
        if self.eval_decay is not None and self.eval_decay not in decays:
            raise ValueError(f"eval_decay {self.eval_decay} is not one of the decays {decays}")
        return self

    @property
    def decays(self) -> list[float]:
        """Every classic EMA decay, in the order given."""
        if self.decay is None:
            return []
        return [float(d) for d in self.decay] if isinstance(self.decay, list) else [float(self.decay)]

    @property
    def primary(self) -> float | None:
        """The decay of ``ema_params``, the EMA evaluation and sampling use."""
        decays = self.decays
        return None if not decays else (self.eval_decay if self.eval_decay is not None else decays[0])

    @property
    def used_for_eval(self) -> bool:
        return self.decay is not None and self.for_eval is not False

    def profiles(self) -> tuple[tuple[str, str, float], ...]:
        """The averages kept beside ``ema_params`` (``TrainingState.ema_profiles``): ``(name, kind, value)``
        with kind ``decay`` (a classic EMA) or ``power`` (value: the exponent gamma of a post-hoc profile)."""
        from workshop_dist.training.posthoc_ema import sigma_rel_to_gamma

        extra = [(profile_name("decay", d), "decay", d) for d in self.decays if d != self.primary]
        for width in self.posthoc.sigma_rels if self.posthoc else []:
            extra.append((profile_name("sigma_rel", width), "power", float(sigma_rel_to_gamma(width))))
        return tuple(extra)


def profile_name(kind: str, value: float) -> str:
    """``decay_0p9999``, ``sigma_rel_0p05``: a state key without dots (Orbax joins key paths with them)."""
    return f"{kind}_{value:g}".replace(".", "p").replace("-", "m")


class PerformanceConfiguration(StrictConfig):
    """Speed and memory: each option gives the same training result (bf16 up to its rounding)."""

    precision: Literal["float32", "bfloat16"] | None = pydantic.Field(
        None,
        description="Deprecated: the compute dtype is model.dtype (set when the model is built); a value "
        "here is copied there once, with a warning.",
    )
    grad_accum_steps: int = pydantic.Field(
        1, ge=1, description="Split each global batch into this many micro-batches (same update, less memory)."
    )
    steps_per_call: int = pydantic.Field(
        1, ge=1, description="Training steps per jitted call (lax.scan): less dispatch for small models."
    )
    max_steps_in_flight: int = pydantic.Field(
        2,
        ge=1,
        description="How many steps the host may run ahead of the device (bounded async dispatch: "
        "the device always has queued work, and XLA:CPU collectives cannot deadlock on a long queue).",
    )
    data_on_device: bool = pydantic.Field(
        False,
        description="Stage an in-memory training set on the mesh once and gather batches there "
        "(same order as the pipeline); for data that fits in device memory.",
    )


class TrainingCheckpointConfiguration(CheckpointConfiguration):
    """Checkpoint storage (see :class:`~workshop_dist.checkpoint.CheckpointConfiguration`) and where a run starts."""

    resume: bool = pydantic.Field(
        True, description="Continue from the workdir's latest checkpoint; false refuses to touch existing ones."
    )
    restore_from: str | None = pydantic.Field(
        None, description="Start from this checkpoint directory when the workdir has none yet."
    )


_PACKAGE = os.path.dirname(os.path.dirname(__file__))
_CONFIG_MODULES = tuple(os.path.join(_PACKAGE, *name) for name in (("config.py",), ("experiment.py",), ("cli.py",), ("training", "config.py")))

# Flat names of earlier releases -> (section, field). Accepted for one release, with a warning.
MOVED: dict[str, tuple[str, str]] = {
    "max_steps": ("length", "max_steps"),
    "steps_per_epoch": ("length", "steps_per_epoch"),
    "log_frequency": ("cadence", "log_every"),
    "eval_frequency": ("cadence", "eval_every"),
    "save_frequency": ("cadence", "save_every"),
    "num_samples": ("cadence", "num_samples"),
    "profile_steps": ("cadence", "profile_steps"),
    "ema_decay": ("ema", "decay"),
    "ema_start_step": ("ema", "start_step"),
    "eval_with_ema": ("ema", "for_eval"),
    "precision": ("performance", "precision"),
    "grad_accum_steps": ("performance", "grad_accum_steps"),
    "steps_per_call": ("performance", "steps_per_call"),
    "data_on_device": ("performance", "data_on_device"),
    "max_steps_in_flight": ("performance", "max_steps_in_flight"),
    "resume": ("checkpoint", "resume"),
    "restore_from": ("checkpoint", "restore_from"),
    **{old: ("checkpoint", new) for old, new in DEPRECATED_ALIASES.items()},
}


def deprecated(old: str, new: str) -> None:
    """A DeprecationWarning attributed to the code that wrote ``old`` (a script, a test, the CLI's caller),
    not to pydantic or the config machinery, so Python's default filters show it there."""
    internal = (os.path.dirname(pydantic.__file__), *_CONFIG_MODULES)
    frame, level = inspect.currentframe(), 1
    while frame is not None and frame.f_code.co_filename.startswith(internal):
        frame, level = frame.f_back, level + 1
    message = f"{old} is deprecated and will be removed in the next release; use {new}"
    warnings.warn(message, DeprecationWarning, stacklevel=level)


class TrainingConfiguration(StrictConfig):
    """Batch size, run length, optimizer/schedule, and when to log, evaluate and checkpoint."""

    batch_size: int = pydantic.Field(128, gt=0, description="Global batch size (all devices, all hosts).")
    num_epochs: int = pydantic.Field(10, gt=0)
    seed: int = pydantic.Field(0, description="Seeds parameter init, data order and the per-step rng.")
    optimizer: OptimizerConfiguration = pydantic.Field(default_factory=OptimizerConfiguration)
    scheduler: SchedulerConfiguration | None = None
    optimizers: dict[str, GroupOptimizerConfiguration] | None = pydantic.Field(
        None,
        description="One optimizer per parameter group the model declares (e.g. generator, "
        "discriminator); replaces `optimizer` for such models.",
    )
    nan_policy: Literal["stop", "skip"] = pydantic.Field(
        "stop",
        description="On a non-finite loss/gradient: stop the run (no checkpoint of the broken state is "
        "written), or skip that update and go on.",
    )
    on_config_change: Literal["warn", "refuse"] = pydantic.Field(
        "warn",
        description="At a resume, the config differs from the checkpoint's: log the changes and go on, or "
        "refuse (exit 2 with the list).",
    )
    length: LengthConfiguration = pydantic.Field(default_factory=LengthConfiguration)
    cadence: CadenceConfiguration = pydantic.Field(default_factory=CadenceConfiguration)
    ema: EMAConfiguration = pydantic.Field(default_factory=EMAConfiguration)
    performance: PerformanceConfiguration = pydantic.Field(default_factory=PerformanceConfiguration)
    checkpoint: TrainingCheckpointConfiguration = pydantic.Field(default_factory=TrainingCheckpointConfiguration)
    frozen: list[str] = pydantic.Field(
        default_factory=list,
        description="Params held fixed, for any model: '/'-joined paths or globs ('encoder', 'backbone/blocks/0'); "
        "no gradients, no optimizer state, not in the EMA, checkpointed with the run.",
    )
    init_from: InitFromConfiguration | None = pydantic.Field(
        None, description="Initialise params from another run's checkpoint (fresh optimizer, step 0); null: no. "
        "The run's own checkpoints (a resume) and checkpoint.restore_from (a whole state) win over it."
    )

    _ignore_name = ignored_fields("name")  # the original design passes name=; nothing reads it

    @pydantic.model_validator(mode="before")
    @classmethod
    def _moved_fields(cls, data: Any) -> Any:
        """Flat names of earlier releases into their sections, each with a DeprecationWarning."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for old in [key for key in data if key in MOVED]:
            section, new = MOVED[old]
            value = data.pop(old)
            deprecated(f"training.{old}", f"training.{section}.{new}")
            target = data.get(section)
            target = target.model_dump(exclude_unset=True) if isinstance(target, pydantic.BaseModel) else dict(target or {})
            if new in target and target[new] != value:
                raise ValueError(f"{old}={value!r} and {section}.{new}={target[new]!r} disagree: set only {section}.{new}")
            data[section] = {**target, new: value}
        if "compilation_cache_dir" in data:  # moved out of the training section altogether
            data.pop("compilation_cache_dir")
            deprecated("training.compilation_cache_dir", "the top-level compilation.cache_dir (ignored here)")
        if "gradient_clip_norm" in data:
            clip = data.pop("gradient_clip_norm")
            deprecated("training.gradient_clip_norm", "training.optimizer.gradient_clip_norm")
            if clip is not None:
                data.update(_with_clip_norm(data, clip))
        return data

    @pydantic.model_validator(mode="after")
    def _accumulation_divides_batch(self) -> TrainingConfiguration:
        accum = self.performance.grad_accum_steps
        if self.batch_size % accum:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by performance.grad_accum_steps={accum}")
        return self

    def total_steps(self, steps_per_epoch: int | None) -> int | None:
        """The run's length in steps: epochs x steps per epoch, capped by ``length.max_steps``."""
        steps_per_epoch = self.length.steps_per_epoch or steps_per_epoch
        max_steps = self.length.max_steps
        if steps_per_epoch is None:
            return max_steps
        total = self.num_epochs * steps_per_epoch
        return min(total, max_steps) if max_steps else total


def _with_clip_norm(data: dict[str, Any], clip: float) -> dict[str, Any]:
    """``optimizer`` (and each of ``optimizers``) with ``gradient_clip_norm`` set to ``clip``, unless set otherwise."""

    def fold(optimizer: Any, where: str) -> Any:
        given = optimizer.model_dump(exclude_unset=True) if isinstance(optimizer, pydantic.BaseModel) else dict(optimizer or {})
        if given.get("gradient_clip_norm") not in (None, clip):
            raise ValueError(
                f"gradient_clip_norm is {clip} but {where}.gradient_clip_norm is {given['gradient_clip_norm']}; "
                f"set only {where}.gradient_clip_norm"
            )
        return {**given, "gradient_clip_norm": clip}

    updated = {"optimizer": fold(data.get("optimizer"), "optimizer")}
    if data.get("optimizers"):
        updated["optimizers"] = {group: fold(opt, f"optimizers.{group}") for group, opt in data["optimizers"].items()}
    return updated
