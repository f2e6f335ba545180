"""Configuration of the training run (the ``training`` section), as in the original design."""

from __future__ import annotations

import warnings
from typing import Any, Literal

import pydantic

from workshop_dist.checkpoint import DEPRECATED_ALIASES, CheckpointConfiguration
from workshop_dist.config import StrictConfig
from workshop_dist.optim import OptimizerConfiguration, SchedulerConfiguration


class GroupOptimizerConfiguration(OptimizerConfiguration):
    """One parameter group's optimizer (``training.optimizers.<group>``) and optional own schedule."""

    scheduler: SchedulerConfiguration | None = pydantic.Field(
        None, description="This group's schedule (default: training.scheduler)."
    )


class TrainingConfiguration(StrictConfig):
    """Batch size, run length, optimizer/schedule, and when to log, evaluate and checkpoint."""

    name: str = "training"
    batch_size: int = pydantic.Field(128, gt=0, description="Global batch size (all devices, all hosts).")
    num_epochs: int = pydantic.Field(10, gt=0)
    optimizer: OptimizerConfiguration = pydantic.Field(default_factory=OptimizerConfiguration)
    scheduler: SchedulerConfiguration | None = None
    gradient_clip_norm: float | None = pydantic.Field(
        None, gt=0, description="Global-norm clipping; same as optimizer.gradient_clip_norm."
    )
    save_frequency: int = pydantic.Field(1000, gt=0, description="Save a checkpoint every this many steps.")
    log_frequency: int = pydantic.Field(100, gt=0, description="Read and write metrics every this many steps.")
    eval_frequency: int | None = pydantic.Field(
        None, gt=0, description="Evaluate every this many steps (default: at the end of each epoch)."
    )
    max_steps: int | None = pydantic.Field(None, gt=0, description="Stop after this many steps in total.")
    steps_per_epoch: int | None = pydantic.Field(
        None, gt=0, description="Steps per epoch (default: derived from the data set size)."
    )
    seed: int = pydantic.Field(0, description="Seeds parameter init, data order and the per-step rng.")
    nan_policy: Literal["stop", "skip"] = pydantic.Field(
        "stop",
        description="On a non-finite loss/gradient: stop the run (no checkpoint of the broken state is "
        "written), or skip that update and go on.",
    )
    num_samples: int = pydantic.Field(64, ge=0, description="Images in each sample grid (0: none).")
    resume: bool = pydantic.Field(
        True, description="Continue from the workdir's latest checkpoint; false refuses to touch existing ones."
    )
    restore_from: str | None = pydantic.Field(
        None, description="Start from this checkpoint directory when the workdir has none yet."
    )
    checkpoint: CheckpointConfiguration = pydantic.Field(default_factory=CheckpointConfiguration)
    optimizers: dict[str, GroupOptimizerConfiguration] | None = pydantic.Field(
        None,
        description="One optimizer per parameter group the model declares (e.g. generator, "
        "discriminator); replaces `optimizer` for such models.",
    )
    ema_decay: float | None = pydantic.Field(
        None, gt=0, lt=1, description="Keep an exponential moving average of the params (null: off)."
    )
    ema_start_step: int = pydantic.Field(0, ge=0, description="The EMA copies the params until this step.")
    eval_with_ema: bool | None = pydantic.Field(
        None, description="Evaluate and sample with the EMA params (default: true when EMA is on)."
    )
    grad_accum_steps: int = pydantic.Field(
        1, ge=1, description="Split each global batch into this many micro-batches (same update, less memory)."
    )
    precision: Literal["float32", "bfloat16"] = pydantic.Field(
        "float32",
        description="Compute dtype of the model (activations, matmuls); params, optimizer state and "
        "the loss stay float32.",
    )
    steps_per_call: int = pydantic.Field(
        1, ge=1, description="Training steps per jitted call (lax.scan): less dispatch for small models."
    )
    data_on_device: bool = pydantic.Field(
        False,
        description="Stage an in-memory training set on the mesh once and gather batches there "
        "(same order as the pipeline); for data that fits in device memory.",
    )
    profile_steps: tuple[int, int] | None = pydantic.Field(
        None, description="(first step, number of steps) to trace with jax.profiler into WORKDIR/profile."
    )
    compilation_cache_dir: str | None = pydantic.Field(
        "~/.cache/workshop_dist/jax_compilation_cache",
        description="JAX's persistent compilation cache (a restarted job skips recompiling); null: off.",
    )
    max_steps_in_flight: int = pydantic.Field(
        2,
        ge=1,
        description="How many steps the host may run ahead of the device (bounded async dispatch: "
        "the device always has queued work, and XLA:CPU collectives cannot deadlock on a long queue).",
    )

    @pydantic.model_validator(mode="before")
    @classmethod
    def _deprecated_checkpoint_fields(cls, data: Any) -> Any:
        """``checkpoint_dir`` and friends moved to ``training.checkpoint``; accept them for one release."""
        if not isinstance(data, dict) or not any(key in data for key in DEPRECATED_ALIASES):
            return data
        data = dict(data)
        section = dict(data.get("checkpoint") or {})
        for old, new in DEPRECATED_ALIASES.items():
            if old in data:
                section[new] = data.pop(old)
                warnings.warn(
                    f"training.{old} is deprecated and will be removed in the next release; "
                    f"use training.checkpoint.{new}",
                    DeprecationWarning,
                    stacklevel=2,
                )
        data["checkpoint"] = section
        return data

    @pydantic.field_validator("profile_steps")
    @classmethod
    def _profile_window(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and (value[0] < 1 or value[1] < 1):
            raise ValueError(f"profile_steps is (first step >= 1, count >= 1), got {list(value)}")
        return value

    @pydantic.model_validator(mode="after")
    def _one_clip_norm(self) -> TrainingConfiguration:
        mine, theirs = self.gradient_clip_norm, self.optimizer.gradient_clip_norm
        if mine is not None and theirs is not None and mine != theirs:
            raise ValueError(
                f"gradient_clip_norm is {mine} here but optimizer.gradient_clip_norm is {theirs}; set only one"
            )
        return self

    @pydantic.model_validator(mode="after")
    def _accumulation_divides_batch(self) -> TrainingConfiguration:
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(
                f"batch_size={self.batch_size} is not divisible by grad_accum_steps={self.grad_accum_steps}"
            )
        return self

    @property
    def checkpoint_dir(self) -> str | None:
        return self.checkpoint.directory

    @property
    def max_checkpoints(self) -> int:
        return self.checkpoint.max_to_keep

    @property
    def ema_for_eval(self) -> bool:
        """Whether evaluation and sampling use the EMA params."""
        return self.ema_decay is not None and self.eval_with_ema is not False

    def total_steps(self, steps_per_epoch: int | None) -> int | None:
        """The run's length in steps: epochs x steps per epoch, capped by max_steps."""
        steps_per_epoch = self.steps_per_epoch or steps_per_epoch
        if steps_per_epoch is None:
            return self.max_steps
        total = self.num_epochs * steps_per_epoch
        return min(total, self.max_steps) if self.max_steps else total

    def effective_optimizer(self) -> OptimizerConfiguration:
        """The optimizer config with ``training.gradient_clip_norm`` folded in."""
        if self.gradient_clip_norm is None or self.optimizer.gradient_clip_norm is not None:
            return self.optimizer
        return self.optimizer.model_copy(update={"gradient_clip_norm": self.gradient_clip_norm})
