"""CLU's metric writers as a tracker (``logging.trackers: [clu]``), for runs that have TensorFlow.

``clu.metric_writers`` (like ``clu.periodic_actions``) imports TensorFlow: its
``SummaryWriter`` writes TensorBoard event files through ``tf.summary``. TensorFlow is not a
dependency of workshop_dist (the ``tensorboard`` tracker writes event files without it), so
this tracker needs the ``tensorflow`` extra: ``pip install "workshop-dist[tensorflow]"``.
Its event files go to ``LOG_DIR/clu``, a run of its own in TensorBoard beside the built-in
tracker's files in ``LOG_DIR``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from workshop_dist._deps import require

PURPOSE = "write metrics through CLU's metric writers (logging.trackers: [clu]), which import TensorFlow"


def metric_writers() -> Any:
    """``clu.metric_writers``, or one DependencyError saying to install the tensorflow extra."""
    require("tensorflow", PURPOSE, extra="tensorflow", attributes=("summary",))
    return require("clu.metric_writers", PURPOSE, extra="tensorflow", attributes=("SummaryWriter",))


class CluTracker:
    """Scalars, images and hyperparameters through ``clu.metric_writers.SummaryWriter``."""

    def __init__(self, log_dir: Path):
        self.directory = Path(log_dir) / "clu"
        self.writer = metric_writers().SummaryWriter(str(self.directory))

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        self.writer.write_scalars(step, dict(scalars))

    def log_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        self.writer.write_images(step, {key: np.clip(value, 0.0, 1.0) for key, value in images.items()})

    def log_config(self, hparams: Mapping[str, Any]) -> None:
        self.writer.write_hparams(dict(hparams))

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
