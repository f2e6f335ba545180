"""Configuration of the training run (the ``training`` section), as in the original design."""

from __future__ import annotations

from typing import Literal

import pydantic

from workshop_dist.config import StrictConfig
from workshop_dist.optim import OptimizerConfiguration, SchedulerConfiguration


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
    checkpoint_dir: str | None = pydantic.Field(None, description="Default: WORKDIR/checkpoints.")
    max_checkpoints: int = pydantic.Field(5, gt=0, description="Latest checkpoints kept (the best is kept apart).")
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
    async_checkpointing: bool = pydantic.Field(True, description="Write checkpoints in the background.")
    replica_parallel_checkpoints: bool = pydantic.Field(
        False,
        description="Split the writing of replicated arrays between their replicas (helps multi-host "
        "data parallelism finish saves sooner, costs the loop more time per save).",
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
