"""Run logs and metrics: a human log (console + file) and metric writers (CLU + JSONL).

Only the primary process (``jax.process_index() == 0``) writes files; the others log to the
console only, so a multi-host run produces one set of logs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

LOGGER_NAME = "workshop_dist"


def is_primary() -> bool:
    return jax.process_index() == 0


class _NotFileOnly(logging.Filter):
    """Keeps records logged with ``extra={"file_only": True}`` off the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False)


class Logger:
    """Human-readable run log to stderr and ``log_dir/train.log`` (primary process only)."""

    def __init__(self, log_dir: str | Path | None = None, *, level: int = logging.INFO, name: str = LOGGER_NAME):
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self._logger = logging.getLogger(name)
        # Other processes repeat what process 0 says: they only report problems.
        self._logger.setLevel(level if is_primary() else max(level, logging.WARNING))
        self._logger.propagate = False
        for handler in list(self._logger.handlers):
            if getattr(handler, "_workshop_dist", False):
                self._logger.removeHandler(handler)
                handler.close()
        prefix = "" if jax.process_count() == 1 else f"[p{jax.process_index()}] "
        formatter = logging.Formatter(f"%(asctime)s %(levelname).1s {prefix}%(message)s", "%H:%M:%S")
        console = logging.StreamHandler(sys.stderr)
        console.addFilter(_NotFileOnly())
        handlers: list[logging.Handler] = [console]
        if self.log_dir is not None and is_primary():
            self.log_dir.mkdir(parents=True, exist_ok=True)
            handlers.append(logging.FileHandler(self.log_dir / "train.log"))
        for handler in handlers:
            handler.setFormatter(formatter)
            handler._workshop_dist = True  # type: ignore[attr-defined]
            self._logger.addHandler(handler)

    def debug(self, msg: str, *args: Any) -> None:
        self._logger.debug(msg, *args)

    def info(self, msg: str, *args: Any, console: bool = True) -> None:
        """Log ``msg``; ``console=False`` writes it to train.log only (a progress bar shows it)."""
        self._logger.info(msg, *args, extra={"file_only": not console})

    def warning(self, msg: str, *args: Any) -> None:
        self._logger.warning(msg, *args)

    def error(self, msg: str, *args: Any) -> None:
        self._logger.error(msg, *args)


class MetricsLogger:
    """Scalars, images and hyperparameters to TensorBoard event files (CLU) and ``metrics.jsonl``.

    Every call writes through and flushes, so a killed run loses at most what was not yet
    logged. Call :meth:`close` at the end (it waits for CLU's background writer).
    """

    def __init__(self, log_dir: str | Path, *, enabled: bool | None = None, asynchronous: bool = True):
        self.log_dir = Path(log_dir)
        self.enabled = is_primary() if enabled is None else enabled
        self._writer = None
        self._jsonl = None
        if self.enabled:
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # CLU imports TensorFlow: keep it quiet
            from clu import metric_writers

            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = metric_writers.create_default_writer(str(self.log_dir), asynchronous=asynchronous)
            self._jsonl = (self.log_dir / "metrics.jsonl").open("a")

    @property
    def jsonl_path(self) -> Path:
        return self.log_dir / "metrics.jsonl"

    def log_metrics(self, step: int, metrics: Mapping[str, float], prefix: str = "train") -> None:
        """Write ``{prefix}/{name}`` scalars at ``step``."""
        if not self.enabled:
            return
        scalars = {f"{prefix}/{name}": float(value) for name, value in metrics.items()}
        self._writer.write_scalars(step, scalars)
        record = {"step": step, **{k: (v if math.isfinite(v) else str(v)) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self.flush()

    def log_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Write image batches ``[N, H, W, C]`` (floats in [0, 1]) as TensorBoard images."""
        if self.enabled:
            self._writer.write_images(step, {key: np.asarray(value) for key, value in images.items()})
            self.flush()

    def log_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Write the (flattened) resolved configuration once."""
        if self.enabled:
            self._writer.write_hparams(flatten(hparams))
            self.flush()

    def flush(self) -> None:
        if self.enabled:
            self._writer.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if self.enabled and self._jsonl is not None:
            self._writer.close()
            self._jsonl.close()
            self._jsonl = None
            self.enabled = False


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``; lists and None become strings (hparams are scalars)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


class ProgressBar:
    """A terminal progress bar: epoch, step/total, loss, examples/s and ETA.

    Updated when metrics are read (every ``log_frequency`` steps), never per step, so it
    costs the training loop nothing. Log lines are printed above it while it is open.
    """

    def __init__(self, total: int | None, initial: int = 0):
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)
        self._redirect = logging_redirect_tqdm(loggers=[logging.getLogger(LOGGER_NAME)])
        self._redirect.__enter__()

    def update(self, step: int, epoch: int, metrics: Mapping[str, float]) -> None:
        self._bar.n = step
        shown = {"epoch": epoch, "loss": f"{metrics.get('loss', float('nan')):.4g}"}
        if "examples_per_second" in metrics:
            shown["ex/s"] = f"{metrics['examples_per_second']:.4g}"
        self._bar.set_postfix(shown, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        self._redirect.__exit__(None, None, None)
        self._bar.close()
