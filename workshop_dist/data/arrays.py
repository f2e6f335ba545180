"""In-memory data: numpy arrays or dicts of arrays, batched with padding and a mask.

Used by ``Trainer.evaluate(data, batch_size)`` for data the user holds in memory, and by
:func:`workshop_dist.data.array_eval_input`. With several processes each takes its rows of
every global batch (:func:`process_padded_batches`), so all yield the same number of
batches and a global batch is the same for any number of processes.
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


def eval_num_batches(num_examples: int, global_batch_size: int) -> int:
    """Global batches in a full eval pass; every process yields this many."""
    return math.ceil(num_examples / global_batch_size)


def process_padded_batches(
    examples: Batch, *, global_batch_size: int, process_index: int = 0, process_count: int = 1
) -> Iterator[Batch]:
    """This process's rows of each global batch of ``examples`` (the last one zero-padded).

    The examples are cut into global batches in order, and each process takes its
    contiguous ``global_batch_size // process_count`` rows of every one, so all processes
    yield :func:`eval_num_batches` batches (collectives stay in step), masks count every
    example exactly once, and a global batch does not depend on the number of processes.
    """
    if global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by {process_count} processes"
        )
    local = global_batch_size // process_count
    num = len(next(iter(examples.values())))
    rows = np.arange(process_index * local, (process_index + 1) * local)
    for batch_index in range(eval_num_batches(num, global_batch_size)):
        index = batch_index * global_batch_size + rows
        real = index < num
        batch = {key: value[np.minimum(index, num - 1)] for key, value in examples.items()}
        for value in batch.values():
            value[~real] = 0
        batch["mask"] = real.astype(np.float32)
        yield batch


def pad_to(array: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad the leading axis of ``array`` up to ``size``."""
    missing = size - len(array)
    if missing <= 0:
        return array
    return np.concatenate([array, np.zeros((missing, *array.shape[1:]), array.dtype)])
