"""What the loop runs each call: the next ``k <= n`` steps of an epoch, as one function of the state.

:class:`HostFeed` stacks the next host batches and assembles them into global arrays on the
mesh; :class:`DeviceFeed` gathers them from a data set staged on the mesh once
(``training.performance.data_on_device``), in the same order as the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from workshop_dist import parallel
from workshop_dist.config import WorkshopError
from workshop_dist.training.engine import Engine
from workshop_dist.training.inputs import LoaderInput, PipelineInput
from workshop_dist.training.state import TrainingState

Run = Callable[[TrainingState], tuple[TrainingState, jax.Array]]
DeviceData = tuple[dict[str, jax.Array], Callable[[int], np.ndarray]]


class HostFeed:
    """One epoch of this process's host batches (``remaining`` of them, or until the input ends)."""

    def __init__(self, engine: Engine, batches: Iterator[dict[str, np.ndarray]], remaining: int | None):
        self.engine, self._batches, self.remaining = engine, batches, remaining

    def take(self, step: int, n: int) -> tuple[Run, int] | None:
        """A function ``state -> (state, metrics)`` running the next ``k <= n`` steps, and ``k``; None at the end."""
        del step  # the host input is already positioned
        n = n if self.remaining is None else min(n, self.remaining)
        batches = []
        for _ in range(n):
            batch = next(self._batches, None)
            if batch is None:
                break
            batches.append(batch)
        if not batches:
            return None
        stacked = {key: np.stack([b[key] for b in batches]) for key in batches[0]}
        global_batches = parallel.host_batch_to_global(stacked, self.engine.mesh, self.engine.stacked_sharding)
        if self.remaining is not None:
            self.remaining -= len(batches)
        return (lambda state: self.engine.train_steps(state, global_batches)), len(batches)


class DeviceFeed:
    """One epoch of batches gathered on the mesh from data staged there: each call sends only indices."""

    def __init__(self, engine: Engine, data: DeviceData, remaining: int | None):
        self.engine, (self._data, self._indices_of), self.remaining = engine, data, remaining

    def take(self, step: int, n: int) -> tuple[Run, int] | None:
        n = n if self.remaining is None else min(n, self.remaining)
        if n <= 0:
            return None
        indices = np.stack([self._indices_of(s) for s in range(step, step + n)]).astype(np.int32)
        indices = parallel.place(indices, parallel.replicated(self.engine.mesh))
        if self.remaining is not None:
            self.remaining -= n
        return (lambda state: self.engine.train_steps_on_device(state, self._data, indices)), n


def stage(train_input: PipelineInput | LoaderInput | None, mesh: jax.sharding.Mesh) -> DeviceData:
    """Copy an in-memory training set onto the mesh once (replicated) for :class:`DeviceFeed`."""
    plan = train_input.device_plan() if train_input is not None else None
    if plan is None:
        raise WorkshopError(
            "training.performance.data_on_device needs in-memory training data without random flips: pass "
            "numpy arrays, or a pipeline with data.cache=true and data.random_flip=false."
        )
    examples, indices_of = plan
    # Replicated: a gather from an example-sharded array would cost a collective every step.
    return parallel.place(examples, parallel.replicated(mesh)), indices_of


def batch_spec(train_input: Any, device_data: DeviceData | None, global_batch_size: int) -> dict[str, Any] | None:
    """One global training batch's shapes, from the input (None without training data): what the engine is built for."""
    if device_data is not None:
        data, _ = device_data
        return {k: jax.ShapeDtypeStruct((global_batch_size, *v.shape[1:]), v.dtype) for k, v in data.items()}
    if train_input is None:
        return None
    local = train_input.batch_spec()  # this process's rows of each global batch
    return {k: jax.ShapeDtypeStruct((s.shape[0] * jax.process_count(), *s.shape[1:]), s.dtype) for k, s in local.items()}


def epoch_feed(
    engine: Engine, train_input: Any, device_data: DeviceData | None, remaining: int | None, skip: int
) -> HostFeed | DeviceFeed:
    """The feed for the rest of an epoch: ``remaining`` steps (None: until the input ends), ``skip`` done."""
    if device_data is not None:
        return DeviceFeed(engine, device_data, remaining)
    return HostFeed(engine, train_input.epoch(remaining, skip=skip), remaining)
