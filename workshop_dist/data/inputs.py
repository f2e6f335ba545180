"""What the trainer iterates: :class:`TrainInput` (infinite, stateful) and :class:`EvalInput`.

Both yield host-local batches, dicts of numpy arrays; the factories in
:mod:`workshop_dist.data.pipeline` build them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grain
import jax
import numpy as np

from workshop_dist.config import ConfigError

Batch = dict[str, np.ndarray]


class TrainInput:
    """Infinite iterator of this process's training batches, epoch after epoch.

    The trainer takes ``steps_per_epoch`` batches per epoch. ``iterator`` is the Grain
    ``DatasetIterator`` that holds all the state: save it in an Orbax checkpoint with
    ``grain.checkpoint.CheckpointSave(train_input.iterator)`` and restore it with
    ``grain.checkpoint.CheckpointRestore(train_input.iterator)``, or use :meth:`get_state`
    / :meth:`set_state` (JSON-able dicts). Call :meth:`close` to stop worker processes.
    """

    def __init__(
        self,
        dataset: grain.IterDataset,
        batches: grain.MapDataset,
        *,
        steps_per_epoch: int,
        num_examples: int,
        global_batch_size: int,
        local_batch_size: int,
        worker_count: int,
    ):
        self._dataset, self._batches, self._worker_count = dataset, batches, worker_count
        self.steps_per_epoch, self.num_examples = steps_per_epoch, num_examples
        self.global_batch_size, self.local_batch_size = global_batch_size, local_batch_size
        self._iterator: grain.DatasetIterator | None = None
        self._state_at_close: dict[str, Any] | None = None

    @property
    def iterator(self) -> grain.DatasetIterator:
        """The underlying Grain iterator (created on first use; workers start on first batch)."""
        if self._iterator is None:
            if self._worker_count:
                _mark_flags_parsed()
            self._iterator = iter(self._dataset)
            if self._state_at_close is not None:
                self._iterator.set_state(self._state_at_close)
        return self._iterator

    def device_plan(self) -> tuple[Batch, Any] | None:
        """(every example, ``global_indices(step)``) when the data can be staged on the devices."""
        examples = self._batches.in_memory_examples()
        return None if examples is None else (examples, self._batches.global_indices)

    @functools.cached_property
    def element_spec(self) -> dict[str, Any]:
        """``jax.ShapeDtypeStruct`` of each array of one host batch."""
        return _spec(self._batches[0])

    def __iter__(self) -> TrainInput:
        return self

    def __next__(self) -> Batch:
        batch = next(self.iterator)
        if self._worker_count:
            # Workers hand over shared-memory arrays that are freed only when garbage
            # collected (warnings at exit if still alive); a plain copy frees them now.
            batch = {key: np.array(value) for key, value in batch.items()}
        return batch

    def get_state(self) -> dict[str, Any]:
        return self.iterator.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`get_state` of an input built the same way).

        Grain's state records per-worker positions, so ``data.worker_count`` must not change
        between saving and restoring.
        """
        saved = _state_worker_count(state)
        if saved is not None and saved != self._worker_count:
            raise ConfigError(
                f"The input pipeline state was saved with data.worker_count={saved}, but this run uses "
                f"{self._worker_count}; Grain cannot resume across a change of worker count. Restore "
                f"with data.worker_count={saved}."
            )
        self.iterator.set_state(state)

    def seek(self, batches: int) -> None:
        """Continue after ``batches`` batches, as if they had been consumed.

        The stream depends only on the seed and the global batch size, not on the number of
        processes, so this also positions a run resumed on another process topology (where
        no saved iterator state fits).
        """
        workers = self._worker_count
        if not workers:
            state: dict[str, Any] = {"next_index": batches}
        else:  # Grain interleaves workers round-robin: worker w produced batches w, w + W, ...
            state = {
                "next_index_in_cycle": batches % workers,
                "next_index_in_datasets": workers,
                "iterators_in_use_indices": list(range(workers)),
                "iterators_in_use_states": [{"next_index": len(range(w, batches, workers))} for w in range(workers)],
                "exhausted": [0] * workers,
                "future_states": {},
            }
        self.iterator.set_state(state)

    def close(self) -> None:
        """Stop worker processes and threads; a later batch resumes where this one stopped."""
        if self._iterator is not None:
            self._state_at_close = self._iterator.get_state()
            self._iterator.close()
            self._iterator = None


class EvalInput:
    """A full pass over an eval split on every ``iter()``; every batch carries ``mask``.

    All processes yield ``num_batches`` batches of ``local_batch_size``; over all of
    them the masks sum to ``num_examples``.
    """

    def __init__(
        self,
        make_iterator: Callable[[], Iterator[Batch]],
        *,
        num_examples: int,
        num_batches: int,
        global_batch_size: int,
        local_batch_size: int,
        first_batch: Callable[[], Batch],
    ):
        self._make_iterator, self._first_batch = make_iterator, first_batch
        self.num_examples, self.num_batches = num_examples, num_batches
        self.global_batch_size, self.local_batch_size = global_batch_size, local_batch_size

    @functools.cached_property
    def element_spec(self) -> dict[str, Any]:
        return _spec(self._first_batch())

    def __iter__(self) -> Iterator[Batch]:
        return self._make_iterator()

    def __len__(self) -> int:
        return self.num_batches


def _spec(batch: Mapping[str, np.ndarray]) -> dict[str, Any]:
    return {
        key: jax.ShapeDtypeStruct(np.shape(value), np.asarray(value).dtype) for key, value in batch.items()
    }


def _state_worker_count(state: Any) -> int | None:
    """Worker count a Grain iterator state was saved with (None if the format is unknown)."""
    if isinstance(state, dict) and "next_index" in state:
        return 0
    if isinstance(state, dict) and isinstance(state.get("exhausted"), list):
        return len(state["exhausted"])
    return None


def _mark_flags_parsed() -> None:
    """Grain workers read absl flags; outside ``absl.app.run`` they are unparsed and would fail."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
