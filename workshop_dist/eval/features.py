"""The feature networks sample quality is measured in: FID's InceptionV3, or the digits classifier.

A :class:`FeatureNetwork` is a pure function of its weights (``apply(weights, images)``, images
``[N, H, W, C]`` in [0, 1]) plus the reference statistics it is compared with, so the FID hook
can jit it with the sampler into one program on the mesh. ``val/fid`` is the Inception one (the
number papers report); ``val/fd`` the digits classifier's (:mod:`workshop_dist.quality`: Inception
means nothing on 8x8 images).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from workshop_dist import parallel
from workshop_dist.eval import fid
from workshop_dist.eval.config import EvalConfiguration


@dataclasses.dataclass(frozen=True)
class FeatureNetwork:
    """A feature extractor for Frechet distances; ``metric`` is the logged name (``val/<metric>``)."""

    metric: str
    dim: int
    graphdef: nnx.GraphDef
    weights: Any  # an nnx.State of arrays
    reference: Callable[[], tuple[Any, Any]] | None = None  # (mu, sigma) when it comes with its own reference
    image_shape: tuple[int, ...] | None = None  # the one image shape it scores (None: any H x W with 1 or 3 channels)

    def scores(self, shape: tuple[int, ...]) -> bool:
        """Whether images of ``shape`` (one image, H x W x C) can be scored."""
        if self.image_shape is not None:
            return tuple(shape) == self.image_shape
        return len(shape) == 3 and shape[-1] in (1, 3)

    def apply(self, weights: Any, images: jax.Array) -> jax.Array:
        """``[N, dim]`` features of images ``[N, H, W, C]`` in [0, 1] (jittable)."""
        model = nnx.merge(self.graphdef, weights)
        return model.features(images) if hasattr(model, "features") else model(images)


class OnMesh:
    """A feature network's weights replicated on ``mesh``, and the statistics of image batches computed there.

    :meth:`sums` is pure (jit it inside a bigger program, as the FID hook does with its sampler). Each
    data-parallel shard keeps its own partial sums (``[shards, ...]``, sharded like the batch), so a
    batch costs no communication; :meth:`to_host` reduces them across devices and hosts once.
    """

    def __init__(self, network: FeatureNetwork, mesh: jax.sharding.Mesh, *, data_max: float = 1.0):
        self.network, self.mesh, self.data_max = network, mesh, float(data_max)
        self.shards = parallel.data_parallel_size(mesh)
        self.replicated = parallel.replicated(mesh)
        self.partial = parallel.batch_sharding(mesh)  # the leading (shard) axis over the batch axes
        self.weights = parallel.place(network.weights, jax.tree.map(lambda _: self.replicated, network.weights))
        self._sums = parallel.CompiledTogether(jax.jit(self.sums, out_shardings=self.partial), "features")
        self._reduce = parallel.CompiledTogether(jax.jit(
            lambda totals: jax.tree.map(lambda x: x.sum(axis=0), totals), out_shardings=self.replicated), "features-reduce")

    def sums(self, weights: Any, images: jax.Array, mask: jax.Array, shift: jax.Array) -> Any:
        """Per-shard ``(count, sum(x - shift), sum((x - shift)(x - shift)^T))`` of images in the data's range
        (``[0, data_max]``), padding rows (``mask`` 0) left out: shapes ``[shards]``, ``[shards, D]``, ``[shards, D, D]``."""
        unit = jnp.clip(images.astype(jnp.float32) / self.data_max, 0.0, 1.0)
        feats = self.network.apply(weights, unit).astype(jnp.float32)
        grouped = jax.lax.with_sharding_constraint(feats.reshape(self.shards, -1, feats.shape[-1]), self.partial)
        weight = mask.astype(jnp.float32).reshape(self.shards, -1)
        centred = (grouped - shift) * weight[..., None]  # rows of padding become zeros
        outer = jnp.einsum("gnd,gne->gde", centred, centred, precision=jax.lax.Precision.HIGHEST)
        return weight.sum(axis=1).astype(jnp.int32), centred.sum(axis=1), outer

    def place(self, value: np.ndarray) -> jax.Array:
        return parallel.place(np.asarray(value), self.replicated)

    def statistics(self, batches: Iterable[Mapping[str, jax.Array]]) -> fid.FeatureStatistics:
        """Statistics of global batches (``image``, ``mask``) on the mesh, read back once at the end."""
        zero, totals = self.place(np.zeros(self.network.dim, np.float32)), None
        for batch in batches:
            sums = self._sums(self.weights, batch["image"], batch["mask"], zero)
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)  # on the device: no sync
        if totals is None:
            raise fid.FIDError("no images to compute feature statistics of")
        return self.to_host(totals)

    def to_host(self, totals: Any, shift: np.ndarray | None = None) -> fid.FeatureStatistics:
        """The per-shard sums reduced across devices and hosts, in float64 on the host."""
        count, total, outer = jax.device_get(self._reduce(totals))
        return fid.FeatureStatistics(self.network.dim).add_sums(count, total, outer, shift)


def inception(weights_path: str | None, *, precision: str = "highest") -> FeatureNetwork:
    """FID's network with the weights of ``weights_path`` (None: random weights, for tests only)."""
    from workshop_dist.eval import inception as net

    model = net.random_inception(0, precision) if weights_path is None else net.load_inception(weights_path, precision=precision)
    graphdef, weights = nnx.split(model)
    return FeatureNetwork("fid", net.FEATURE_DIM, graphdef, weights)


def digits_classifier(seed: int = 0, steps: int | None = None) -> FeatureNetwork:
    """The quality benchmark's classifier; its reference is the digits' test split (as the benchmark's)."""
    from workshop_dist import quality

    classifier = quality.train_classifier(seed, steps)

    def reference() -> tuple[Any, Any]:
        split = quality.load_digits_split("test")["image"]
        return fid.FeatureStatistics.of(classifier.features(split)).gaussian()

    return FeatureNetwork("fd", quality.FEATURE_DIM, classifier.graphdef, classifier.state, reference, (8, 8, 1))


def for_run(config: EvalConfiguration, data_source: str) -> FeatureNetwork:
    """The network ``config`` asks for (``auto``: the digits classifier on the built-in digits)."""
    if config.resolved_features(data_source) == "digits":
        return digits_classifier()
    if not config.inception_weights:
        raise fid.FIDError(
            "FID needs the Inception weights: set eval.inception_weights to a file made with "
            "`workshop-data convert-weights inception pt_inception-2015-12-05-6726825d.pth OUT.safetensors`"
        )
    return inception(config.inception_weights)
