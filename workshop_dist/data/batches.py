"""Batch-level Grain datasets: one element is this process's part of one global batch.

Working per batch instead of per example keeps Grain's per-element overhead (tens of
microseconds) out of the inner loop: a batch is one permutation lookup, one read of its
examples (a single numpy gather for in-memory data), and vectorized normalization and flips.

Every process builds the same global stream (one permutation per epoch, flips drawn at
global positions) and reads only its rows of each global batch, so a global batch holds the
same examples in the same order for any number of processes.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from workshop_dist.data import latents
from workshop_dist.data.transforms import BadExampleError

Batch = dict[str, np.ndarray]
MAX_CONSECUTIVE_BAD = 100  # more bad examples in a row than this: the data is broken, not one file

log = logging.getLogger(__name__)


class ExampleReader:
    """Reads examples by index as one dict of stacked arrays.

    ``decode`` is a Grain ``Map`` transform (or a function) applied to each record. If it
    also has ``augment(record, offset)``, training batches pass each example's two uniform
    numbers (``offsets``) to it instead (random crops).

    ``skip_bad``: a record whose decoding raises :class:`BadExampleError` is replaced by the
    next readable one in index order (wrapping around), so a batch keeps its size and batch
    ``b`` stays a function of ``b`` alone (resuming and seeking still hold). Each skip is
    logged with a count per process; the substitute appears twice in that epoch.
    """

    def __init__(self, data: Any, decode: Callable[[Any], Mapping[str, Any]] | None = None, *, skip_bad: bool = False):
        self._data = data
        self._decode = getattr(decode, "map", decode)  # a Grain Map transform, or a function
        self._augment = getattr(decode, "augment", None)
        self._arrays: Mapping[str, np.ndarray] | None = getattr(data, "arrays", None)
        self._skip_bad = skip_bad
        self.skipped = 0  # bad examples replaced in this process

    def __len__(self) -> int:
        return len(self._data)

    @property
    def augments(self) -> bool:
        """Whether :meth:`read` uses per-example ``offsets`` (random crops)."""
        return self._augment is not None and self._arrays is None

    def read(self, indices: np.ndarray, offsets: np.ndarray | None = None) -> Batch:
        if self._arrays is not None:  # in memory: one gather per feature
            return {key: value[indices] for key, value in self._arrays.items()}
        if offsets is None or self._augment is None:
            examples = [self._example(int(i), None) for i in indices]
        else:
            examples = [self._example(int(i), offset) for i, offset in zip(indices, offsets, strict=True)]
        return {key: np.stack([np.asarray(e[key]) for e in examples]) for key in examples[0]}

    def _example(self, index: int, offset: np.ndarray | None) -> Mapping[str, Any]:
        for attempt in range(MAX_CONSECUTIVE_BAD + 1):
            record = self._data[(index + attempt) % len(self._data)]
            try:
                if self._decode is None:
                    return record
                return self._decode(record) if offset is None else self._augment(record, offset)
            except BadExampleError as err:
                if not self._skip_bad:
                    raise
                self.skipped += 1
                log.warning("Skipped a bad example (data.skip_bad_examples): %s; %d skipped so far in this process.", err, self.skipped)
        raise BadExampleError(
            f"{MAX_CONSECUTIVE_BAD + 1} consecutive examples from index {index} could not be read: the data set looks "
            "broken, not just one file (see the warnings above)."
        )

    def read_all(self) -> dict[str, np.ndarray]:
        """Every example, for ``data.cache``."""
        return self.read(np.arange(len(self)))


class GlobalBatches(grain.MapDataset):
    """Element ``b``: this process's ``rows`` of global batch ``b``, epoch after epoch (endless).

    Epoch ``e`` uses the first ``steps_per_epoch * global_batch_size`` positions of its own
    permutation (clean epoch boundaries); the examples left over change from epoch to epoch.
    """

    def __init__(
        self,
        reader: ExampleReader,
        *,
        global_batch_size: int,
        rows: Sequence[int],
        steps_per_epoch: int,
        transform: Callable[[Batch], Batch],
        shuffle_seed: int | None,
        flip_seed: int | None,
        crop_seed: int | None = None,
        latent_seed: int | None = None,
    ):
        """``latent_seed``: the posterior draws of latent data stored as moments (:mod:`workshop_dist.data.latents`)."""
        super().__init__()
        self._reader = reader
        self._latent_seed = latent_seed
        self._global = global_batch_size
        self._rows = np.asarray(rows, np.int64)
        self._steps_per_epoch = steps_per_epoch
        self._transform = transform
        self._shuffle_seed = shuffle_seed
        self._flip_seed = flip_seed
        self._crop_seed = crop_seed if reader.augments else None
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray | None, np.ndarray | None]] = {}

    def __len__(self) -> int:
        return sys.maxsize

    def __str__(self) -> str:
        return f"GlobalBatches(rows {len(self._rows)} of {self._global}, {self._steps_per_epoch} per epoch)"

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(order of the examples, flip and crop offsets of each position) for ``epoch``; the last two are kept."""
        cached = self._epochs.get(epoch)
        if cached is None:
            count = len(self._reader)
            order = (
                np.random.default_rng([self._shuffle_seed, epoch]).permutation(count)
                if self._shuffle_seed is not None
                else np.arange(count)
            )
            flips = np.random.default_rng([self._flip_seed, epoch]).random(count) < 0.5 if self._flip_seed is not None else None
            crops = (
                np.random.default_rng([self._crop_seed, epoch]).random((count, 2)) if self._crop_seed is not None else None
            )
            self._epochs = {e: v for e, v in self._epochs.items() if e == epoch - 1}
            cached = self._epochs[epoch] = (order, flips, crops)
        return cached

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, step = divmod(index, self._steps_per_epoch)
        order, flips, crops = self._epoch(epoch)
        positions = step * self._global + self._rows
        batch = self._transform(self._reader.read(order[positions], None if crops is None else crops[positions]))
        if latents.STD_KEY in batch:  # latents stored as moments: this step's posterior draw
            batch = latents.draw(batch, self._latent_seed, epoch, step, self._rows, self._global)
        if flips is not None:
            flip = flips[positions]
            batch["image"] = np.where(flip[:, None, None, None], batch["image"][:, :, ::-1], batch["image"])
        return batch

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_epochs": {}}  # workers recompute; don't ship the arrays

    def global_indices(self, step: int) -> np.ndarray:
        """Example indices of global batch ``step`` (all rows, every process's part)."""
        epoch, step = divmod(step, self._steps_per_epoch)
        order = self._epoch(epoch)[0]
        return order[step * self._global + np.arange(self._global)]

    def in_memory_examples(self) -> Batch | None:
        """Every example, standardized, for staging on the devices; None unless the data is in memory
        and batches are plain gathers (no random flips)."""
        if getattr(self._reader, "_arrays", None) is None or self._flip_seed is not None:
            return None
        examples = self._transform(self._reader.read_all())
        return None if latents.STD_KEY in examples else examples  # a new draw every step: not a plain gather


class EvalBatches(grain.MapDataset):
    """Element ``b``: this process's rows of global batch ``b`` of one pass, zero-padded past the
    end with ``mask`` 0 (1 for real examples)."""

    def __init__(
        self, reader: ExampleReader, *, global_batch_size: int, rows: Sequence[int], transform: Callable[[Batch], Batch]
    ):
        super().__init__()
        self._reader = reader
        self._global = global_batch_size
        self._rows = np.asarray(rows, np.int64)
        self._transform = transform
        self._length = -(-len(reader) // global_batch_size)

    def __len__(self) -> int:
        return self._length

    def __str__(self) -> str:
        return f"EvalBatches(rows {len(self._rows)} of {self._global}, {self._length} batches)"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        positions = index * self._global + self._rows
        real = positions < len(self._reader)
        batch = self._transform(self._reader.read(np.minimum(positions, len(self._reader) - 1)))
        batch.pop(latents.STD_KEY, None)  # latents stored as moments: evaluation takes the mean
        for value in batch.values():
            value[~real] = 0
        batch["mask"] = real.astype(np.float32)
        return batch
