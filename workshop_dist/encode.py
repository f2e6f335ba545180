"""``workshop-data encode``: a data set's latents under a frozen autoencoder, once, as ArrayRecord shards.

Why pre-extract: a latent diffusion model trains for many epochs on the same images; encoding
them once (fast-DiT does it) takes the encoder out of every step. The output is the project's
record format (:mod:`workshop_dist.data.records`) in the shard layout of ``workshop-data convert``
(:mod:`workshop_dist.data.convert`, whose manifest, shard writer and resume this reuses): split
``s`` becomes ``DEST/s-KKKKK-of-NNNNN.array_record``, examples in source order, each record holding
``mean`` and ``logvar`` (``--store moments``, the default) or one posterior draw ``latent``
(``--store sample``), float32 and unscaled, and ``label`` when the source has labels.
``DEST/latents.json`` holds the scale factor and shapes (:mod:`workshop_dist.data.latents`), so
``data.source: array_record:DEST/{split}-*.array_record`` with ``data.normalize: latent`` trains on them.

The encoder runs jitted on a data mesh over all local devices, ``--batch-size`` images on each
device per call (the last call padded). The per-device shape is what XLA's kernels depend on, so
an example's latents are bitwise the same on 1 device as on 8; a draw of ``--store sample`` comes
from the example's own key (seed, split, index): the files do not depend on the number of devices. Shards are written under temporary
names and renamed when complete: an interrupted run, repeated, skips the finished shards.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from workshop_dist import parallel
from workshop_dist.config import ConfigError
from workshop_dist.data import convert, latents
from workshop_dist.data.records import encode_example
from workshop_dist.data.splits import DataSet
from workshop_dist.parallel import MeshConfiguration
from workshop_dist.training.first_stage import FirstStage

COMMAND = "workshop-data encode"


@dataclasses.dataclass
class DigitsSplit:
    """A split of the built-in digits, resized as ``data.image_size`` does for training (same pixels)."""

    name: str
    split: str
    image_size: int | None
    _arrays: dict[str, np.ndarray] | None = dataclasses.field(default=None, repr=False)

    def _load(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            from workshop_dist.data.sklearn_digits import load_digits_split

            self._arrays = load_digits_split(self.split)
        return self._arrays

    def __len__(self) -> int:
        return len(self._load()["label"])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        from workshop_dist.data.sklearn_digits import SIZE
        from workshop_dist.data.transforms import ResizeImage

        example = {key: value[index] for key, value in self._load().items()}
        return ResizeImage(self.image_size).map(example) if self.image_size not in (None, SIZE) else example


def digits_dataset(image_size: int | None, splits: list[str] | None = None) -> DataSet:
    """The built-in digits as a :class:`DataSet` (their max level is 16, not the dtype's)."""
    from workshop_dist.data.sklearn_digits import SPLITS

    unknown = sorted(set(splits or []) - set(SPLITS))
    if unknown:
        raise ConfigError(f"The digits have no split(s) {unknown}; choose from {list(SPLITS)}.")
    named = {split: DigitsSplit(f"digits[{split}]", split, image_size) for split in splits or SPLITS}
    return DataSet("digits", named)


def encode_dataset(
    dataset: DataSet,
    dest: str | Path,
    stage: FirstStage,
    *,
    shards: int = 1,
    store: str = "moments",
    batch_size: int = 16,
    seed: int = 0,
    max_level: float | None = None,
    settings: dict[str, Any] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Write ``dataset``'s latents under ``stage`` into ``dest``; return the manifest (as ``convert``'s).

    ``max_level``: the pixel value that is white (default: 16 for the digits, else the image dtype's
    maximum, 1 for float images); images are scaled to the autoencoder's own range from it.
    ``batch_size``: images per device per call (not divided by the devices: see the module docstring).
    """
    if store not in latents.STORES:
        raise ConfigError(f"--store must be one of {list(latents.STORES)}, got {store!r}")
    if shards < 1 or batch_size < 1:
        raise ConfigError(f"--shards and --batch-size must be at least 1, got {shards} and {batch_size}")
    mesh = mesh if mesh is not None else parallel.make_mesh(MeshConfiguration(), jax.local_devices())
    stage = stage.placed(mesh)
    batch_size *= parallel.data_parallel_size(mesh)
    dest = Path(dest)
    image_shape, top = _image_shape(dataset, stage), max_level or (16.0 if dataset.source == "digits" else None)
    latent_shape = stage.latent_shape(image_shape)
    info = {"format": latents.FORMAT, "store": store, "scale_factor": stage.scale_factor, "latent_shape": list(latent_shape),
            "image_shape": list(image_shape), "autoencoder": stage.source, "image_max_value": stage.max_value}
    expected = {
        "source": dataset.source,
        "settings": {**(settings or {}), "store": store, "seed": seed, "max_level": top, "scale_factor": stage.scale_factor},
        "splits": {s: {"examples": len(src), "shards": max(1, min(shards, len(src)))} for s, src in dataset.splits.items()},
    }
    manifest = convert.start_manifest(dest, expected, command=COMMAND)
    convert.write_json(dest / latents.LATENTS_FILE, info)
    planned = convert.plan_shards(dataset, shards)
    todo = [shard for shard in planned if not (dest / shard.name).is_file()]
    for shard in planned:
        if shard not in todo and shard.name not in manifest["shards"]:  # renamed, then interrupted
            manifest["shards"][shard.name] = {"examples": convert.num_records(dest / shard.name), "skipped": []}
    encoder = _Encoder(stage, mesh, store, batch_size, seed)
    from tqdm import tqdm

    total = sum(shard.stop - shard.start for shard in todo)
    with tqdm(total=total, unit="ex", desc=f"encode {len(todo)}/{len(planned)} shards",
              disable=None if progress is None else not progress) as bar:
        for shard in todo:
            writer = convert.ShardWriter(dest, shard)
            source = dataset.splits[shard.split]
            for start in range(shard.start, shard.stop, batch_size):
                stop = min(start + batch_size, shard.stop)
                examples = [source[i] for i in range(start, stop)]
                writer.write(list(encoder.records(shard.split, start, examples, top)))
                bar.update(stop - start)
            writer.finish()
            manifest["shards"][shard.name] = {"examples": shard.stop - shard.start, "skipped": []}
            convert.write_json(dest / convert.MANIFEST, manifest)
    manifest["complete"] = True
    manifest["written"] = {
        split: sum(entry["examples"] for name, entry in manifest["shards"].items() if name.rsplit("-", 3)[0] == split)
        for split in dataset.splits
    }
    convert.write_json(dest / convert.MANIFEST, manifest)
    return manifest


def _image_shape(dataset: DataSet, stage: FirstStage) -> tuple[int, int, int]:
    """The one image shape of every split (its first example's), which the autoencoder must take."""
    shapes = {}
    for split, source in dataset.splits.items():
        if len(source):
            image = np.asarray(source[0]["image"]) if "image" in source[0] else None
            if image is None:
                raise ConfigError(f"{source.name} has no 'image' feature (features: {sorted(source[0])}): nothing to encode")
            shapes[split] = image.shape if image.ndim == 3 else (*image.shape, 1)
    if not shapes:
        raise ConfigError(f"{dataset.source} has no examples to encode")
    if len(set(shapes.values())) > 1:
        raise ConfigError(f"the splits of {dataset.source} have images of different shapes {shapes}: resize them (--image-size)")
    shape = next(iter(shapes.values()))
    stage.latent_shape(shape)  # one message when the autoencoder cannot take them
    return tuple(int(d) for d in shape)


class _Encoder:
    """The jitted encoder on the mesh: host examples in, per-example records out."""

    def __init__(self, stage: FirstStage, mesh: jax.sharding.Mesh, store: str, batch_size: int, seed: int):
        self.stage, self.store, self.batch_size, self.seed = stage, store, batch_size, seed
        self.sharding = parallel.batch_sharding(mesh)
        replicated = parallel.replicated(mesh)
        self._fn = parallel.CompiledTogether(jax.jit(
            self._encode, in_shardings=(replicated, self.sharding, self.sharding, replicated), out_shardings=self.sharding
        ), "encode")

    def _encode(self, params: Any, images: jax.Array, indices: jax.Array, key: jax.Array) -> jax.Array:
        mean, logvar = self.stage.encode_fn(params, images)
        if self.store == "moments":
            return jnp.concatenate([mean, logvar], axis=-1)
        eps = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), mean.shape[1:], jnp.float32))(indices)
        return mean + jnp.exp(0.5 * logvar) * eps

    def records(self, split: str, start: int, examples: list[dict[str, Any]], top: float | None) -> Iterator[bytes]:
        count = len(examples)
        images = np.stack([_image(e["image"]) for e in examples])
        scale = np.float32(self.stage.max_value / (top or _dtype_top(images.dtype)))
        padded = np.zeros((self.batch_size, *images.shape[1:]), np.float32)
        padded[:count] = images.astype(np.float32) * scale
        indices = np.arange(start, start + self.batch_size, dtype=np.int32)
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed), zlib.crc32(split.encode()) & 0x7FFFFFFF)
        out = np.asarray(jax.device_get(self._fn(self.stage.params, jax.device_put(padded, self.sharding),
                                                  jax.device_put(indices, self.sharding), key)))[:count]
        channels = self.stage.latent_channels
        for example, value in zip(examples, out, strict=True):
            record = {"mean": value[..., :channels], "logvar": value[..., channels:]} if self.store == "moments" else {
                "latent": value}
            if "label" in example:
                record["label"] = np.asarray(example["label"])
            yield encode_example(record)


def _image(image: Any) -> np.ndarray:
    image = np.asarray(image)
    return image[..., None] if image.ndim == 2 else image


def _dtype_top(dtype: np.dtype) -> float:
    if np.issubdtype(dtype, np.integer):
        return float(np.iinfo(dtype).max)
    return 1.0
