"""Adapters from what users pass as data to what the training loop consumes.

Training data may be a pipeline from :mod:`workshop_dist.data` (resumable), a seed-style
callable ``loader(batch_size) -> iterator of batches``, or in-memory arrays. Evaluation data
may be an eval pipeline, such a callable, or arrays; it is always padded and masked.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from workshop_dist.config import WorkshopError
from workshop_dist.data import arrays


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def as_batch(batch: Any) -> dict[str, np.ndarray]:
    """TFDS-style dict of arrays; a bare array (or a tuple whose first item is one) is the image."""
    if isinstance(batch, Mapping):
        return dict(batch)
    if isinstance(batch, tuple | list):
        batch = batch[0]
    return {"image": batch}


class PipelineInput:
    """A resumable pipeline (one iterator across epochs; its position is checkpointed)."""

    def __init__(self, pipeline: Any):
        self.pipeline = pipeline
        self.steps_per_epoch: int | None = pipeline.steps_per_epoch

    @property
    def checkpointable_iterator(self) -> Any:
        return self.pipeline.iterator

    def epoch(self, remaining: int | None, skip: int = 0) -> Iterator[dict[str, np.ndarray]]:
        del skip  # a restored pipeline is already positioned mid-epoch
        return itertools.islice(self.pipeline, remaining)

    def seek(self, step: int) -> None:
        """Position the pipeline after ``step`` batches (when no saved position fits this run)."""
        self.pipeline.seek(step)

    def device_plan(self) -> tuple[dict[str, np.ndarray], Callable[[int], np.ndarray]] | None:
        """(every example, global batch indices of a step), when the data can live on the devices."""
        plan = getattr(self.pipeline, "device_plan", None)
        return plan() if plan is not None else None

    def batch_spec(self) -> dict[str, Any]:
        """Shapes and dtypes of one of this process's batches (``jax.ShapeDtypeStruct``)."""
        return dict(self.pipeline.element_spec)


class LoaderInput:
    """A seed-style ``loader(batch_size)`` called once per epoch.

    Its epoch length is ``training.steps_per_epoch`` if set, else ``len()`` of what it
    returns, else until its iterator ends. It has no checkpointable position: after a
    mid-epoch restore the first ``step % steps_per_epoch`` batches of the epoch are skipped,
    which reproduces the order only if the loader is deterministic.
    """

    checkpointable_iterator = None

    def device_plan(self) -> None:
        return None  # a loader's batches are only known by iterating it

    def __init__(self, loader: Callable[[int], Any], batch_size: int, steps_per_epoch: int | None):
        self.loader = loader
        self.batch_size = batch_size
        batches = loader(batch_size)
        self.steps_per_epoch = steps_per_epoch or _length(batches)
        first = next(iter(batches), None)
        if first is None:
            raise WorkshopError(f"The training loader returned no batches for batch size {batch_size}.")
        self._spec = {key: _spec_of(value) for key, value in as_batch(first).items()}

    def batch_spec(self) -> dict[str, Any]:
        """Shapes and dtypes of the loader's first batch (every batch of an epoch must match them)."""
        return dict(self._spec)

    def epoch(self, remaining: int | None, skip: int = 0) -> Iterator[dict[str, np.ndarray]]:
        batches = (as_batch(batch) for batch in iter(self.loader(self.batch_size)))
        return itertools.islice(batches, skip, None if remaining is None else skip + remaining)

    def seek(self, step: int) -> None:
        del step  # the epoch's first batches are skipped when it starts (see the class docstring)


def _length(iterable: Any) -> int | None:
    try:
        return len(iterable)
    except TypeError:
        return None


def _spec_of(value: Any) -> Any:
    import jax

    value = np.asarray(value)
    return jax.ShapeDtypeStruct(value.shape, value.dtype)


def as_train_input(
    data: Any, *, global_batch_size: int, per_process_batch_size: int, steps_per_epoch: int | None, seed: int
) -> PipelineInput | LoaderInput | None:
    """Wrap whatever the user passed as training data."""
    if data is None:
        return None
    if hasattr(data, "steps_per_epoch") and hasattr(data, "iterator"):
        return PipelineInput(data)
    if callable(data):
        return LoaderInput(data, per_process_batch_size, steps_per_epoch)
    if isinstance(data, np.ndarray | Mapping) or hasattr(data, "__array__"):
        from workshop_dist.data import array_train_input

        return PipelineInput(array_train_input(arrays.as_example_dict(data), global_batch_size=global_batch_size, seed=seed))
    raise WorkshopError(
        f"Cannot train on {type(data).__name__}: pass a workshop_dist.data pipeline, a callable "
        "loader(batch_size) returning an iterator of batches, or numpy arrays."
    )


def eval_batches(data: Any, per_process_batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Padded, masked batches of exactly ``per_process_batch_size`` covering ``data`` once."""
    if hasattr(data, "num_batches") and hasattr(data, "__iter__"):
        yield from data  # an eval pipeline: already padded and masked
        return
    if callable(data):
        for batch in data(per_process_batch_size):
            yield from _pad_batch(as_batch(batch), per_process_batch_size)
        return
    from workshop_dist.data import array_eval_input

    global_batch = per_process_batch_size * _process_count()
    yield from array_eval_input(arrays.as_example_dict(data), global_batch_size=global_batch)


def _pad_batch(batch: dict[str, np.ndarray], size: int) -> Iterator[dict[str, np.ndarray]]:
    """Split/pad a loader's batch into batches of exactly ``size``; padding gets mask 0."""
    count = len(next(iter(batch.values())))
    mask = np.asarray(batch.pop("mask", np.ones(count)), np.float32)
    for start in range(0, count, size):
        chunk = {key: arrays.pad_to(np.asarray(value[start : start + size]), size) for key, value in batch.items()}
        chunk["mask"] = arrays.pad_to(mask[start : start + size], size)
        yield chunk


def _process_count() -> int:
    import jax

    return jax.process_count()
