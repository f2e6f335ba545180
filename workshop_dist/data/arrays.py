"""In-memory data: numpy arrays or dicts of arrays, batched with padding and a mask.

Used by ``Trainer.evaluate(data, batch_size)`` for data the user holds in memory, and by
:func:`workshop_dist.data.array_eval_input`. With several processes each takes its
contiguous part of the arrays (:func:`shard_bounds`) and all yield the same number of
batches (:func:`eval_num_batches`), padding with fully masked batches where needed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import numpy as np

Batch = dict[str, np.ndarray]


def as_example_dict(data: np.ndarray | Mapping[str, np.ndarray]) -> Batch:
    """A bare array is taken as ``{"image": array}``; all features must share their length."""
    examples = (
        {"image": np.asarray(data)}
        if not isinstance(data, Mapping)
        else {k: np.asarray(v) for k, v in data.items()}
    )
    lengths = {key: len(value) for key, value in examples.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"all features must have the same number of examples, got {lengths}")
    return examples


def shard_bounds(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
    """``[start, stop)`` of process ``process_index``'s contiguous, disjoint part of the examples.

    Parts differ in size by at most one (the first ``num_examples % process_count`` get the
    extra example) and together cover everything, like Grain's ``ShardByJaxProcess`` with
    ``drop_remainder=False``.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    base, extra = divmod(num_examples, process_count)
    start = process_index * base + min(process_index, extra)
    return start, start + base + (process_index < extra)


def eval_num_batches(num_examples: int, local_batch_size: int, process_count: int) -> int:
    """Batches every process yields in a full eval pass: enough for the largest part."""
    return math.ceil(math.ceil(num_examples / process_count) / local_batch_size)


def process_padded_batches(
    examples: Batch, *, global_batch_size: int, process_index: int = 0, process_count: int = 1
) -> Iterator[Batch]:
    """This process's part of ``examples`` in ``global_batch_size // process_count`` batches.

    Every process yields :func:`eval_num_batches` batches, so collectives over the
    global batch stay in step; masks count each example exactly once over all processes.
    """
    if global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by {process_count} processes"
        )
    local = global_batch_size // process_count
    num = len(next(iter(examples.values())))
    start, stop = shard_bounds(num, process_index, process_count)
    part = {key: value[start:stop] for key, value in examples.items()}
    yield from padded_batches(part, local, num_batches=eval_num_batches(num, local, process_count))


def padded_batches(examples: Batch, batch_size: int, *, num_batches: int | None = None) -> Iterator[Batch]:
    """Yield batches of exactly ``batch_size``; the last one is zero-padded.

    Each batch carries ``mask`` (float32, 1 for real examples, 0 for padding) so a
    full pass counts every example exactly once. With ``num_batches``, fully masked
    zero batches follow until there are that many.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    num = len(next(iter(examples.values())))
    count = 0
    for start in range(0, num, batch_size):
        stop = min(start + batch_size, num)
        batch = {key: pad_to(value[start:stop], batch_size) for key, value in examples.items()}
        mask = np.zeros(batch_size, np.float32)
        mask[: stop - start] = 1.0
        batch["mask"] = mask
        count += 1
        yield batch
    while num_batches is not None and count < num_batches:
        batch = {
            key: np.zeros((batch_size, *value.shape[1:]), value.dtype) for key, value in examples.items()
        }
        batch["mask"] = np.zeros(batch_size, np.float32)
        count += 1
        yield batch


def pad_to(array: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad the leading axis of ``array`` up to ``size``."""
    missing = size - len(array)
    if missing <= 0:
        return array
    return np.concatenate([array, np.zeros((missing, *array.shape[1:]), array.dtype)])
