"""TensorBoard event files without TensorFlow.

CLU's ``metric_writers`` package imports TensorFlow on import, and TensorFlow pins protobuf
>= 6.31, which conflicts with libraries that need protobuf < 6 (``avitai-artifex``). This
writer uses only the ``tensorboard`` package's record format and summary protos (never
``tensorboard.compat.tf``, which would import an installed TensorFlow, broken or not) and writes what TF2's ``tf.summary`` writes:
scalars as rank-0 float32 tensors, images as ``[width, height, png...]`` string tensors,
hyperparameters as the hparams plugin's ``session_start_info``. It has CLU's ``MetricWriter``
methods, so it is a drop-in replacement for ``clu.metric_writers.create_default_writer``.
"""

from __future__ import annotations

import io
import itertools
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.summary.writer.record_writer import RecordWriter
from tensorboard.util import tensor_util


class EventWriter:
    """Writes scalars, images and hparams to a new ``logdir/events.out.tfevents.*`` file.

    Writes are synchronous (a few microseconds for scalars; the trainer writes every
    ``log_frequency`` steps, never per step); :meth:`flush` pushes them to the OS.
    """

    _unique = itertools.count()

    def __init__(self, logdir: str | Path):
        logdir = Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        # TensorFlow's naming: TensorBoard finds event files by the "tfevents" part.
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.{next(self._unique)}"
        self.path = logdir / name
        self._records = RecordWriter(open(self.path, "wb"))  # noqa: SIM115 -- closed by close()
        self._add(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _add(self, event: event_pb2.Event) -> None:
        self._records.write(event.SerializeToString())

    def _write(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
        summary = summary_pb2.Summary(value=values)
        self._add(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """One rank-0 float32 tensor per name, tagged for the scalars plugin (like ``tf.summary.scalar``)."""
        self._write(
            step,
            [
                summary_pb2.Summary.Value(
                    tag=name,
                    tensor=tensor_util.make_tensor_proto(np.float32(value)),
                    metadata=scalar_metadata.create_summary_metadata(display_name=name, description=""),
                )
                for name, value in scalars.items()
            ],
        )

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """Image batches ``[N, H, W, C]`` (floats in [0, 1] or uint8; C in 1, 3, 4) as PNGs."""
        values = []
        for name, batch in images.items():
            batch = np.asarray(batch)
            if batch.ndim == 3:
                batch = batch[None]
            height, width = batch.shape[1:3]
            encoded = [str(width).encode(), str(height).encode(), *(_png(image) for image in batch)]
            values.append(
                summary_pb2.Summary.Value(
                    tag=name,
                    tensor=tensor_util.make_tensor_proto(np.array(encoded, dtype=object)),
                    metadata=image_metadata.create_summary_metadata(display_name=name, description=""),
                )
            )
        self._write(step, values)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """The run's hyperparameters (bool, int, float or str values) for TensorBoard's HParams tab."""
        summary = hparams_summary.hparams_pb(dict(hparams))
        self._add(event_pb2.Event(wall_time=time.time(), step=0, summary=summary))

    def flush(self) -> None:
        if not self._records.closed:
            self._records.flush()

    def close(self) -> None:
        if not self._records.closed:
            self._records.close()


def _png(image: np.ndarray) -> bytes:
    """One ``[H, W, C]`` image as PNG bytes; floats are clipped to [0, 1] and scaled to 0..255."""
    if image.dtype != np.uint8:
        image = (np.clip(np.asarray(image, np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if image.shape[-1] == 1:
        image = image[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
