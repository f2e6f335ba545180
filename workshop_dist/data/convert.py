"""``workshop-data convert``: a data set into sharded ArrayRecord files in the project's record format.

Split ``s`` of ``n`` examples becomes ``DEST/s-KKKKK-of-NNNNN.array_record``; shard ``k`` holds
examples ``[k*n//N, (k+1)*n//N)`` in source order, one msgpack record each
(:mod:`workshop_dist.data.records`), so ``data.source: array_record:DEST/{split}-*.array_record``
reads them back in order. Worker processes decode chunks of examples; this process writes
them in order, so the bytes do not depend on ``--workers``: the same input gives the same
files.

Resuming: each shard is written to a hidden temporary name and renamed when complete, and
``DEST/conversion.json`` records the settings and each finished shard. Running the same
command again skips the finished shards; other settings for the same DEST are an error.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from workshop_dist.config import ConfigError
from workshop_dist.data import images
from workshop_dist.data.records import WRITER_OPTIONS, encode_example
from workshop_dist.data.splits import DataSet
from workshop_dist.data.transforms import BadExampleError

MANIFEST = "conversion.json"
CHUNK = 64  # examples per task handed to a worker process


@dataclasses.dataclass(frozen=True)
class Shard:
    split: str
    index: int
    count: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index, self.count)


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.array_record"


def plan_shards(dataset: DataSet, shards: int) -> list[Shard]:
    """Contiguous shards of every split (at most one per example, at least one)."""
    planned = []
    for split, source in dataset.splits.items():
        n = len(source)
        count = max(1, min(shards, n))
        planned += [Shard(split, k, count, k * n // count, (k + 1) * n // count) for k in range(count)]
    return planned


def convert(
    dataset: DataSet,
    dest: str | os.PathLike,
    *,
    shards: int = 1,
    workers: int = 0,
    settings: dict[str, Any] | None = None,
    skip_bad: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Write ``dataset`` into ``dest``; return the manifest (examples and skipped files per split).

    ``settings`` (what the command line asked for) are recorded so a resumed run can check
    it continues the same conversion. ``workers``: 0 decodes in this process.
    """
    if shards < 1:
        raise ConfigError(f"--shards must be at least 1, got {shards}.")
    dest = Path(dest)
    planned = plan_shards(dataset, shards)
    expected = {
        "source": dataset.source,
        "settings": settings or {},
        "splits": {split: {"examples": len(source), "shards": max(1, min(shards, len(source)))} for split, source in dataset.splits.items()},
    }
    manifest = start_manifest(dest, expected)
    todo = [shard for shard in planned if not (dest / shard.name).is_file()]
    for shard in planned:
        if shard not in todo and shard.name not in manifest["shards"]:  # renamed, then interrupted
            manifest["shards"][shard.name] = {"examples": num_records(dest / shard.name), "skipped": []}
    if dataset.classes:
        (dest / images.LABELS_FILE).write_text(json.dumps({"source": dataset.source, "classes": dataset.classes}, indent=2) + "\n")
    from tqdm import tqdm

    total = sum(shard.stop - shard.start for shard in todo)
    with tqdm(total=total, unit="ex", desc=f"convert {len(todo)}/{len(planned)} shards", disable=None if progress is None else not progress) as bar:
        writer = None
        for shard, records, skipped, first, last in _encoded_chunks(dataset, todo, workers, skip_bad, bar):
            if first:
                writer, written, bad = ShardWriter(dest, shard), 0, []
            writer.write(records)
            written, bad = written + len(records), bad + skipped
            if last:
                writer.finish()
                manifest["shards"][shard.name] = {"examples": written, "skipped": bad}
                write_json(dest / MANIFEST, manifest)
    manifest["complete"] = True
    manifest["written"] = {
        split: sum(entry["examples"] for name, entry in manifest["shards"].items() if name.rsplit("-", 3)[0] == split)
        for split in dataset.splits
    }
    write_json(dest / MANIFEST, manifest)
    return manifest


def start_manifest(dest: Path, expected: dict[str, Any], *, command: str = "workshop-data convert") -> dict[str, Any]:
    """The manifest to continue: a new one, or the one in ``dest`` if it is the same conversion
    (``workshop_dist.encode`` shares it: its latents resume the same way)."""
    path = dest / MANIFEST
    if path.is_file():
        previous = json.loads(path.read_text())
        if {key: previous.get(key) for key in expected} != expected:
            raise ConfigError(
                f"{dest} holds a conversion with other settings ({json.dumps({k: previous.get(k) for k in expected})}); "
                "use another DEST, delete this one, or repeat the first command to resume it."
            )
        return {**previous, "complete": False}
    if dest.is_dir() and any(dest.glob("*.array_record")):
        raise ConfigError(f"{dest} already holds ArrayRecord files not written by {command}: use another DEST.")
    dest.mkdir(parents=True, exist_ok=True)
    manifest = {"format": "workshop_dist.data.records", **expected, "shards": {}, "complete": False}
    write_json(path, manifest)
    return manifest


def _encoded_chunks(
    dataset: DataSet, todo: list[Shard], workers: int, skip_bad: bool, bar
) -> Iterator[tuple[Shard, list[bytes], list[str], bool, bool]]:
    """(shard, records, skipped files, first chunk?, last chunk?) in order, decoded here or in ``workers`` processes."""
    tasks = [
        (shard, start, min(start + CHUNK, shard.stop), skip_bad)
        for shard in todo
        for start in (range(shard.start, shard.stop, CHUNK) if shard.stop > shard.start else [shard.start])
    ]
    if workers:
        context = multiprocessing.get_context("spawn")  # no fork of a process with JAX threads
        pool = context.Pool(workers, initializer=_init_worker, initargs=(dataset,))
        results = pool.imap(_encode_chunk, tasks)
    else:
        pool = None
        _init_worker(dataset)
        results = map(_encode_chunk, tasks)
    try:
        for (shard, start, stop, _), (records, skipped) in zip(tasks, results, strict=True):
            bar.update(stop - start)
            yield shard, records, skipped, start == shard.start, stop == shard.stop
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


_DATASET: DataSet | None = None


def _init_worker(dataset: DataSet) -> None:
    global _DATASET
    _DATASET = dataset


def _encode_chunk(task: tuple[Shard, int, int, bool]) -> tuple[list[bytes], list[str]]:
    shard, start, stop, skip_bad = task
    source = _DATASET.splits[shard.split]
    records, skipped = [], []
    for index in range(start, stop):
        try:
            records.append(encode_example(source[index]))
        except BadExampleError as err:
            if not skip_bad:
                raise
            skipped.append(str(err))
    return records, skipped


class ShardWriter:
    """Writes a shard under a hidden temporary name and renames it when complete: a shard
    file is never half written, so a rerun can skip every shard file it finds."""

    def __init__(self, dest: Path, shard: Shard):
        from array_record.python.array_record_module import ArrayRecordWriter

        self._temporary, self._final = dest / f".{shard.name}.tmp", dest / shard.name
        self._writer = ArrayRecordWriter(str(self._temporary), WRITER_OPTIONS)

    def write(self, records: list[bytes]) -> None:
        for record in records:
            self._writer.write(record)

    def finish(self) -> None:
        self._writer.close()
        os.replace(self._temporary, self._final)


def num_records(path: Path) -> int:
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(path))
    try:
        return reader.num_records()
    finally:
        reader.close()


def write_json(path: Path, value: Any) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)
