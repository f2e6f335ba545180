"""The record format of ``array_record:GLOB`` sources: one msgpack map of numpy arrays per record.

Each ArrayRecord record is one example, encoded with msgpack as a map from feature name to
an encoded array::

    {"image": {"dtype": "|u1", "shape": [28, 28, 1], "data": <raw C-order bytes>},
     "label": {"dtype": "<i8", "shape": [], "data": <8 bytes>}}

``dtype`` is a numpy dtype string (``np.dtype(...).str``, so the byte order is explicit),
``shape`` a list of ints (``[]`` for scalars) and ``data`` the array's bytes in C order.
Images are stored raw (H, W, C), not PNG-encoded: reading needs only numpy and msgpack,
never TensorFlow, and decoding is a ``np.frombuffer``. Write such files with
:func:`write_array_record`; ``{split}`` in the source glob is replaced by the split name
(``array_record:/data/mnist-{split}-*.array_record``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import msgpack
import numpy as np

_ARRAY_KEYS = frozenset({"dtype", "shape", "data"})
# One record per chunk keeps random access cheap, as Grain recommends; the writer adds nothing
# that varies between runs, so the same records give the same file bytes.
WRITER_OPTIONS = "group_size:1"


class RecordFormatError(ValueError):
    """A record is not a msgpack map of encoded arrays (see the module docstring)."""


def encode_example(example: Mapping[str, np.ndarray | int | float]) -> bytes:
    """Serialize one example (feature name -> array or scalar) to the documented format."""
    encoded = {}
    for key, value in example.items():
        array = np.asarray(value)  # not ascontiguousarray: it turns scalars into shape (1,)
        if array.dtype == object:
            raise TypeError(f"feature '{key}' has dtype object; only numeric arrays can be stored")
        encoded[str(key)] = {
            "dtype": array.dtype.str,
            "shape": list(array.shape),
            "data": array.tobytes(order="C"),
        }
    return msgpack.packb(encoded, use_bin_type=True)


def decode_example(record: bytes) -> dict[str, np.ndarray]:
    """Inverse of :func:`encode_example`; raises :class:`RecordFormatError` on other formats."""
    try:
        encoded = msgpack.unpackb(record, raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as err:
        raise RecordFormatError(_format_hint(f"it is not msgpack ({err})")) from None
    if not isinstance(encoded, dict) or not all(
        isinstance(value, dict) and value.keys() == _ARRAY_KEYS for value in encoded.values()
    ):
        raise RecordFormatError(_format_hint("it is not a map of {dtype, shape, data} arrays"))
    return {
        key: np.frombuffer(value["data"], dtype=np.dtype(value["dtype"])).reshape(value["shape"])
        for key, value in encoded.items()
    }


def write_array_record(path: str | Path, examples: Iterable[Mapping[str, np.ndarray | int | float]]) -> int:
    """Write ``examples`` (an iterable of feature dicts) to one ArrayRecord file; return the count."""
    from array_record.python.array_record_module import ArrayRecordWriter

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    writer = ArrayRecordWriter(str(path), WRITER_OPTIONS)
    count = 0
    try:
        for example in examples:
            writer.write(encode_example(example))
            count += 1
    finally:
        writer.close()
    return count


def examples_from_arrays(arrays: Mapping[str, np.ndarray]) -> Iterable[dict[str, np.ndarray]]:
    """Split a dict of equally long arrays into per-example dicts (for :func:`write_array_record`)."""
    lengths = {key: len(value) for key, value in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"all features must have the same number of examples, got {lengths}")
    for index in range(next(iter(lengths.values()), 0)):
        yield {key: value[index] for key, value in arrays.items()}


def _format_hint(problem: str) -> str:
    return (
        f"Cannot decode an array_record example: {problem}. Records must be msgpack maps of "
        "{'dtype', 'shape', 'data'} arrays, as written by workshop_dist.data.records.write_array_record "
        "(TFDS datasets are read with source 'tfds:NAME' instead)."
    )
