"""The ``logging`` section: which metric trackers a run writes to, and how talkative the console is.

Lives apart from :mod:`workshop_dist.metrics` so the configuration loads without importing
JAX, CLU or wandb. ``MetricsLogger(log_dir, config=experiment.logging)`` applies it.
"""

from __future__ import annotations

import logging
from typing import Literal

import pydantic

from workshop_dist.config import StrictConfig

Tracker = Literal["tensorboard", "jsonl", "wandb", "clu"]
ConsoleVerbosity = Literal["normal", "quiet", "verbose"]
CONSOLE_LEVELS: dict[str, int] = {"quiet": logging.WARNING, "normal": logging.INFO, "verbose": logging.DEBUG}


class WandbConfiguration(StrictConfig):
    """Weights & Biases run settings (used when ``trackers`` includes ``wandb``).

    The run id is kept in ``WORKDIR/logs/wandb_run_id``, so a resumed job continues the
    same W&B run; W&B's own files go under ``WORKDIR/logs/wandb``.
    """

    project: str = pydantic.Field("workshop-dist", min_length=1)
    entity: str | None = pydantic.Field(None, description="Team or user; default: your W&B default entity.")
    name: str | None = pydantic.Field(None, description="Display name; default: the workdir's name.")
    group: str | None = None
    tags: list[str] = pydantic.Field(default_factory=list)
    notes: str | None = None
    mode: Literal["online", "offline", "disabled"] | None = pydantic.Field(
        None,
        description="None: W&B's default ($WANDB_MODE, else online). offline writes files to sync later "
        "with `wandb sync WORKDIR/logs/wandb/offline-run-*`.",
    )


class LoggingConfiguration(StrictConfig):
    """Where metrics, sample grids and the resolved config go, and the console's verbosity."""

    trackers: list[Tracker] = pydantic.Field(
        default_factory=lambda: ["tensorboard", "jsonl"],
        description="tensorboard: WORKDIR/logs/events.out.tfevents.*; jsonl: WORKDIR/logs/metrics.jsonl; "
        "wandb: Weights & Biases (pip install 'workshop-dist[wandb]'); clu: CLU's metric writers, "
        "event files in WORKDIR/logs/clu (they need TensorFlow: pip install 'workshop-dist[tensorflow]').",
    )
    console: ConsoleVerbosity = pydantic.Field(
        "normal", description="quiet: warnings and errors only; verbose: debug lines too. --quiet/--verbose win."
    )
    wandb: WandbConfiguration = pydantic.Field(default_factory=WandbConfiguration)

    @pydantic.field_validator("trackers")
    @classmethod
    def _no_duplicates(cls, trackers: list[str]) -> list[str]:
        duplicates = sorted({name for name in trackers if trackers.count(name) > 1})
        if duplicates:
            raise ValueError(f"trackers lists {', '.join(duplicates)} more than once")
        return trackers

    @pydantic.model_validator(mode="after")
    def _wandb_settings_need_the_tracker(self) -> LoggingConfiguration:
        # Like optimizer fields of another optimizer_type: a W&B setting without W&B is a mistake.
        if "wandb" not in self.trackers and self.wandb != WandbConfiguration():
            changed = sorted(
                name for name in self.wandb.model_fields_set if getattr(self.wandb, name) != getattr(WandbConfiguration(), name)
            )
            raise ValueError(
                f"wandb.{', wandb.'.join(changed) or '...'} set but trackers {self.trackers} has no 'wandb': "
                "add it (logging.trackers=[tensorboard,jsonl,wandb]) or remove the wandb settings"
            )
        return self

    def console_level(self, *, quiet: bool = False, verbose: bool = False) -> int:
        """The console's logging level; the command line's ``--quiet`` / ``--verbose`` win over ``console``."""
        if quiet:
            return logging.WARNING
        if verbose:
            return logging.DEBUG
        return CONSOLE_LEVELS[self.console]
