"""The Grain input pipeline: host-local numpy batches for training and evaluation.

Training, per process: a Grain ``MapDataset`` whose element ``b`` is this process's rows
of global batch ``b`` (:class:`~workshop_dist.data.batches.GlobalBatches`)::

    epoch e = b // steps_per_epoch: one global permutation (the same on every process)
    -> positions of global batch b -> this process's rows -> read (decode; random crops of
    image folders drawn per global position) -> standardize -> random flip (drawn per global
    position) -> prefetch (a thread, or worker processes)

Each epoch is exactly ``steps_per_epoch = num_examples // global_batch_size`` global
batches built from that epoch's permutation only (clean boundaries); the examples left over
differ from epoch to epoch. A global batch holds the same examples in the same order for
any number of processes, so a run gives the same result on 1 host x 8 devices as on
2 hosts x 4, and the pipeline's position is a function of the step alone
(:meth:`TrainInput.seek`). Worker processes each build every ``worker_count``-th batch and
Grain interleaves them back in order, so the batches do not depend on ``worker_count``.

Evaluation: the split in global batches (the last padded with masked zero examples), each
process reading its rows of every one, as in training; ``mask`` marks real examples.

The host -> device step is not here: the trainer calls ``parallel.host_batch_to_global``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import grain
import jax
import numpy as np

from workshop_dist.config import ConfigError
from workshop_dist.data.arrays import as_example_dict, eval_num_batches, process_padded_batches
from workshop_dist.data.batches import Batch, EvalBatches, ExampleReader, GlobalBatches
from workshop_dist.data.config import DataConfiguration
from workshop_dist.data.inputs import EvalInput, TrainInput
from workshop_dist.data.latents import LatentStandardize, check_normalize
from workshop_dist.data.sources import ArraySource, Source, open_source
from workshop_dist.data.transforms import Standardize

# ----------------------------------------------------------------------------- public factories


def make_train_input(
    config: DataConfiguration,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> TrainInput:
    """Training batches of ``config.train_split`` for this process (see the module docstring).

    ``process_index`` / ``process_count`` default to JAX's; tests pass them to simulate hosts.
    """
    reader, standardize = _open(config, config.train_split, augment=True)
    return _train_input(
        reader,
        standardize,
        global_batch_size=global_batch_size,
        seed=seed,
        shuffle=config.shuffle,
        random_flip=config.random_flip,
        worker_count=config.worker_count,
        prefetch=config.prefetch,
        process=_process(process_index, process_count),
    )


def make_eval_input(
    config: DataConfiguration,
    *,
    global_batch_size: int,
    split: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> EvalInput:
    """Padded, masked full passes over ``split`` (default ``config.eval_split``)."""
    reader, standardize = _open(config, split or config.eval_split)
    if len(reader) == 0:
        raise ConfigError("The evaluation split is empty.")
    index, count = _process(process_index, process_count)
    batches = EvalBatches(
        reader, global_batch_size=global_batch_size, rows=process_rows(global_batch_size, index, count), transform=standardize
    )
    read_options = _read_options(config.prefetch)
    return EvalInput(
        lambda: iter(batches.to_iter_dataset(read_options)),
        num_examples=len(reader),
        num_batches=len(batches),
        global_batch_size=global_batch_size,
        local_batch_size=local_batch_size(global_batch_size, count),
        first_batch=lambda: batches[0],
    )


def array_train_input(
    examples: np.ndarray | Mapping[str, np.ndarray],
    *,
    global_batch_size: int,
    seed: int,
    shuffle: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    prefetch: int = 2,
) -> TrainInput:
    """Training batches over in-memory arrays (a bare array is the ``image`` feature).

    Same epochs, sharding, shuffling and state as :func:`make_train_input`. The arrays
    are used as given (no normalization), except float64 becomes float32.
    """
    reader = ExampleReader(ArraySource(_in_memory(examples)))
    process = _process(process_index, process_count)
    return _train_input(reader, _identity, global_batch_size=global_batch_size, seed=seed, shuffle=shuffle,
                        random_flip=False, worker_count=worker_count, prefetch=prefetch, process=process)


def array_eval_input(
    examples: np.ndarray | Mapping[str, np.ndarray],
    *,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> EvalInput:
    """Padded, masked passes over in-memory arrays; each process takes its part of them."""
    arrays = _in_memory(examples)
    index, count = _process(process_index, process_count)
    local = local_batch_size(global_batch_size, count)
    num = len(next(iter(arrays.values())))
    if num == 0:
        raise ConfigError("Cannot evaluate on an empty set of examples.")

    def batches() -> Iterator[Batch]:
        return process_padded_batches(
            arrays, global_batch_size=global_batch_size, process_index=index, process_count=count
        )

    return EvalInput(
        batches,
        num_examples=num,
        num_batches=eval_num_batches(num, global_batch_size),
        global_batch_size=global_batch_size,
        local_batch_size=local,
        first_batch=lambda: next(batches()),
    )


# ----------------------------------------------------------------------------- pipeline builders


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    """This process's share of the global batch; a ConfigError unless it divides evenly."""
    if global_batch_size <= 0:
        raise ConfigError(f"The global batch size must be positive, got {global_batch_size}.")
    if global_batch_size % process_count:
        raise ConfigError(
            f"The global batch size {global_batch_size} is not divisible by the {process_count} processes; "
            f"use a multiple of {process_count}."
        )
    return global_batch_size // process_count


def derive_seed(seed: int, *path: int) -> int:
    """A 32-bit seed for one random stream of the pipeline: a hash of ``(seed, *path)``.

    Shuffles and flips, and the streams of seeds ``s`` and ``s + 1``, are then unrelated.
    """
    if seed < 0:
        raise ConfigError(f"The data seed must be non-negative, got {seed}.")
    return int(np.random.SeedSequence([seed, *path]).generate_state(1)[0])


_SHUFFLE, _FLIP, _CROP, _LATENT = 0, 1, 2, 3


def process_rows(global_batch_size: int, process_index: int, process_count: int) -> np.ndarray:
    """The rows of each global batch a process provides: its contiguous share, in order.

    This matches how ``jax.make_array_from_process_local_data`` assembles a batch sharded
    over a mesh whose devices are ordered by process (``jax.make_mesh``).
    """
    local = local_batch_size(global_batch_size, process_count)
    return np.arange(process_index * local, (process_index + 1) * local)


def _train_input(
    reader: ExampleReader,
    standardize: Any,
    *,
    global_batch_size: int,
    seed: int,
    shuffle: bool,
    random_flip: bool,
    worker_count: int,
    prefetch: int,
    process: tuple[int, int],
) -> TrainInput:
    index, count = process
    num_examples = len(reader)
    local = local_batch_size(global_batch_size, count)
    steps_per_epoch = num_examples // global_batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"The training split has {num_examples} examples, fewer than one global batch of "
            f"{global_batch_size}; use a smaller batch size or more data."
        )
    batches = GlobalBatches(
        reader,
        global_batch_size=global_batch_size,
        rows=process_rows(global_batch_size, index, count),
        steps_per_epoch=steps_per_epoch,
        transform=standardize,
        shuffle_seed=derive_seed(seed, _SHUFFLE) if shuffle else None,
        flip_seed=derive_seed(seed, _FLIP) if random_flip else None,
        crop_seed=derive_seed(seed, _CROP) if reader.augments else None,
        latent_seed=derive_seed(seed, _LATENT),
    )
    iter_ds = batches.to_iter_dataset(_read_options(prefetch))
    if worker_count:
        iter_ds = iter_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=max(1, prefetch))
        )
    return TrainInput(
        iter_ds,
        batches,
        steps_per_epoch=steps_per_epoch,
        num_examples=num_examples,
        global_batch_size=global_batch_size,
        local_batch_size=local,
        worker_count=worker_count,
    )


# ----------------------------------------------------------------------------- helpers


def _open(config: DataConfiguration, split: str, *, augment: bool = False) -> tuple[ExampleReader, Standardize | LatentStandardize]:
    """The split's reader (in memory with ``data.cache``) and its batch standardization.

    ``augment``: training (random crops of image folders, unless cached: decoded once, centered).
    """
    source = open_source(config, split, augment=augment and not config.cache)
    check_normalize(config.normalize, source.latents, source.name)
    reader = ExampleReader(source.data, source.decode, skip_bad=source.skip_bad)
    if len(reader) and config.cache:
        reader = ExampleReader(ArraySource(reader.read_all()))
    return reader, _standardize(config, source, reader)


def _standardize(config: DataConfiguration, source: Source, reader: ExampleReader) -> Standardize | LatentStandardize:
    if source.latents is not None:
        if config.binarize or config.max_level is not None:
            raise ConfigError(f"data.binarize and data.max_level are about pixels; {source.name} holds latents: remove them")
        return LatentStandardize(float(source.latents["scale_factor"]), source.latents["store"])
    max_level = source.max_level
    if max_level is None:
        if len(reader) == 0:
            raise ConfigError(f"The data source {source.name} has no examples.")
        max_level = _dtype_max_level(reader.read(np.arange(1)), config.image_key)
    return Standardize(
        image_key=config.image_key,
        normalize=config.normalize,
        binarize=config.binarize,
        max_level=max_level,
        batched=True,
    )


def _dtype_max_level(example: Mapping[str, Any], image_key: str) -> float:
    """Integer images: the dtype's largest value (255 for uint8); float images are already unit."""
    if image_key not in example:
        raise ConfigError(
            f"Examples have no feature '{image_key}' (features: {sorted(example)}); set data.image_key."
        )
    dtype = np.asarray(example[image_key]).dtype
    if dtype == np.bool_:
        return 1.0
    if np.issubdtype(dtype, np.integer):
        return float(np.iinfo(dtype).max)
    return 1.0


def _identity(batch: Batch) -> Batch:
    return batch


def _in_memory(examples: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    arrays = as_example_dict(examples)
    return {
        key: value.astype(np.float32) if value.dtype == np.float64 else value for key, value in arrays.items()
    }


def _read_options(prefetch: int) -> grain.ReadOptions:
    """One background thread prepares up to ``prefetch`` batches (0: all in the caller's thread).

    More threads do not help: decoding holds the GIL, and batches are the elements here.
    """
    return grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch)


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """Explicit values (tests simulate hosts), else JAX's."""
    if process_index is None or process_count is None:
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    return process_index, process_count
