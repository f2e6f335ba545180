"""Run logs and metrics: a human log (console + file) and metric trackers (TensorBoard, JSONL, W&B).

Only the primary process (``jax.process_index() == 0``) writes files; the others log to the
console only, so a multi-host run produces one set of logs.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from workshop_dist import storage
from workshop_dist.config import WorkshopError
from workshop_dist.logging_config import LoggingConfiguration, WandbConfiguration

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
        self.log_dir = storage.as_path(log_dir, absolute=False) if log_dir is not None else None
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
            # On gs://, a local copy uploaded every storage.SYNC_SECONDS and at exit.
            handlers.append(storage.log_file_handler(self.log_dir / "train.log"))
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
    """Scalars, images and hyperparameters to the configured trackers (``logging.trackers``).

    ``tensorboard``: event files (:mod:`workshop_dist.event_writer`); ``jsonl``: ``metrics.jsonl``;
    ``wandb``: a Weights & Biases run (:class:`WandbTracker`); ``clu``: CLU's metric writers
    (:mod:`workshop_dist.clu_tracker`, needs TensorFlow). Every call writes through and flushes, so a
    killed run loses at most what was not yet logged. Call :meth:`close` at the end (it waits
    for the W&B run to finish).
    """

    def __init__(
        self,
        log_dir: str | Path,
        *,
        enabled: bool | None = None,
        config: LoggingConfiguration | None = None,
    ):
        self.log_dir = storage.as_path(log_dir, absolute=False)
        self.enabled = is_primary() if enabled is None else enabled
        self.config = config if config is not None else LoggingConfiguration()
        self._writer = None
        self._jsonl = None
        self._wandb: WandbTracker | None = None
        self._clu: Any = None
        # Cloud Storage cannot append: growing files are written locally and uploaded.
        self._synced: storage.SyncedDir | None = None
        local_dir = self.log_dir
        if self.enabled:
            trackers = set(self.config.trackers)
            if storage.is_remote(self.log_dir):
                self._synced = storage.SyncedDir(self.log_dir)
                local_dir = self._synced.path
            else:
                self.log_dir.mkdir(parents=True, exist_ok=True)
            if "tensorboard" in trackers:
                # Event files without TensorFlow (CLU's writers import it, and it pins protobuf).
                from workshop_dist.event_writer import EventWriter

                self._writer = EventWriter(local_dir)
            if "jsonl" in trackers:
                jsonl = self._synced.local(self.jsonl_path.name, resume=True) if self._synced else self.jsonl_path
                self._jsonl = jsonl.open("a")
            if "wandb" in trackers:
                if self._synced is not None:
                    raise WorkshopError(
                        "The wandb tracker keeps its run files in the log dir, which must be local: "
                        "use a local --workdir with wandb, or drop wandb from logging.trackers."
                    )
                self._wandb = WandbTracker(self.log_dir, self.config.wandb)
            if "clu" in trackers:
                if self._synced is not None:
                    raise WorkshopError(
                        "The clu tracker writes its event files straight into the log dir, which must be local: "
                        "use a local --workdir with clu, or drop clu from logging.trackers."
                    )
                from workshop_dist.clu_tracker import CluTracker

                self._clu = CluTracker(self.log_dir)

    @property
    def jsonl_path(self) -> storage.AnyPath:
        return self.log_dir / "metrics.jsonl"

    @property
    def wandb_run(self) -> Any:
        """The live ``wandb`` run (None without the wandb tracker), e.g. to log a custom chart."""
        return self._wandb.run if self._wandb is not None else None

    def log_metrics(self, step: int, metrics: Mapping[str, float], prefix: str = "train") -> None:
        """Write ``{prefix}/{name}`` scalars at ``step``."""
        if not self.enabled:
            return
        scalars = {f"{prefix}/{name}": float(value) for name, value in metrics.items()}
        if self._writer is not None:
            self._writer.write_scalars(step, scalars)
        if self._jsonl is not None:
            record = {"step": step, **{k: (v if math.isfinite(v) else str(v)) for k, v in scalars.items()}}
            self._jsonl.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log(step, scalars)
        if self._clu is not None:
            self._clu.log(step, scalars)
        self.flush()

    def log_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Write image batches ``[N, H, W, C]`` (floats in [0, 1]) as TensorBoard / W&B images."""
        if not self.enabled:
            return
        arrays = {key: np.asarray(value) for key, value in images.items()}
        if self._writer is not None:
            self._writer.write_images(step, arrays)
        if self._wandb is not None:
            self._wandb.log_images(step, arrays)
        if self._clu is not None:
            self._clu.log_images(step, arrays)
        self.flush()

    def log_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Write the resolved configuration once (flattened for TensorBoard, nested for W&B)."""
        if not self.enabled:
            return
        if self._writer is not None:
            self._writer.write_hparams(flatten(hparams))
        if self._wandb is not None:
            self._wandb.log_config(hparams)
        if self._clu is not None:
            self._clu.log_config(flatten(hparams))
        self.flush()

    def flush(self) -> None:
        if self.enabled:
            for sink in (self._writer, self._jsonl, self._clu):
                if sink is not None:
                    sink.flush()
            if self._synced is not None:
                self._synced.sync()

    def close(self) -> None:
        if not self.enabled:
            return
        for sink in (self._writer, self._jsonl, self._wandb, self._clu, self._synced):
            if sink is not None:
                sink.close()
        self._writer = self._jsonl = self._wandb = self._clu = self._synced = None
        self.enabled = False


class WandbTracker:
    """One Weights & Biases run per workdir, continued across restarts with no repeated steps.

    The run id lives in ``LOG_DIR/wandb_run_id`` and W&B's files in ``LOG_DIR/wandb``. A
    resumed job starts again after its last checkpoint, so it would re-log steps that the
    stopped process already logged; ``LOG_DIR/wandb_steps.json`` keeps, per metric, the last
    step of each cleanly finished process (preempted runs finish cleanly), and values at or
    before it are dropped, as are repeats within a process. After a hard kill nothing is
    recorded: W&B buffers its writes, so what the killed process logged may be gone, and the
    resumed process logs those steps again (W&B itself ignores any it already had).
    """

    def __init__(self, log_dir: Path, config: WandbConfiguration):
        try:
            import wandb
        except ImportError:
            raise WorkshopError(
                "logging.trackers includes 'wandb' but wandb is not installed: pip install 'workshop-dist[wandb]'"
            ) from None
        self._wandb = wandb
        self.id_path = log_dir / "wandb_run_id"
        self.steps_path = log_dir / "wandb_steps.json"
        run_id = self.id_path.read_text().strip() if self.id_path.exists() else uuid.uuid4().hex[:12]
        self.last_step: dict[str, int] = json.loads(self.steps_path.read_text()) if self.steps_path.exists() else {}
        self.run = wandb.init(
            project=config.project,
            entity=config.entity,
            name=config.name or log_dir.absolute().parent.name,
            group=config.group,
            tags=config.tags or None,
            notes=config.notes,
            mode=config.mode,
            id=run_id,
            resume="allow",
            dir=str(log_dir),
            settings=wandb.Settings(console="off"),  # our logger and progress bar own the console
        )
        self.id_path.write_text(run_id + "\n")

    def _new(self, step: int, keys: list[str]) -> list[str]:
        """Of ``keys``, those not yet logged at ``step`` or later."""
        fresh = [key for key in keys if step > self.last_step.get(key, -1)]
        self.last_step.update(dict.fromkeys(fresh, step))
        return fresh

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        fresh = self._new(step, list(scalars))
        if fresh:
            self.run.log({key: scalars[key] for key in fresh}, step=step)

    def log_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        fresh = self._new(step, list(images))
        if fresh:
            self.run.log({key: [self._image(image) for image in images[key]] for key in fresh}, step=step)

    def _image(self, image: np.ndarray) -> Any:
        pixels = np.clip(np.rint(np.asarray(image, np.float32) * 255), 0, 255).astype(np.uint8)
        return self._wandb.Image(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)

    def log_config(self, hparams: Mapping[str, Any]) -> None:
        self.run.config.update(dict(hparams), allow_val_change=True)  # a resumed run may change e.g. num_epochs

    def close(self) -> None:
        """Finish the run (W&B writes everything out), then record the steps it now holds."""
        self.run.finish()
        staging = self.steps_path.with_suffix(".json.tmp")
        staging.write_text(json.dumps(self.last_step, sort_keys=True))
        staging.replace(self.steps_path)


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
