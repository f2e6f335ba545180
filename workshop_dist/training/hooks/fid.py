"""Sample quality while training: every ``eval.fid_every`` steps, ``eval.fid_samples`` samples scored
against reference statistics in a feature network's space (``val/fid``, or ``val/fd`` for digits).

Nothing leaves the devices but the statistics: each call samples one batch on the whole mesh
(split over it like a training batch), computes the features there and adds each shard's sum and
sum of outer products to that shard's totals inside the same jitted program; at the end they are
reduced across devices and hosts once and read back in float64 (:class:`~workshop_dist.eval.fid.FeatureStatistics`) and computes the Frechet
distance. The samples' noise is the same at every evaluation (``eval.seed``), so the scores of a
run compare; conditional models get class-balanced labels.

A latent model (``model.decoder``) has its samples decoded to pixels by the frozen autoencoder in the
same program, and those are scored (reference data from the evaluation split is decoded likewise).
When the images (a pixel model's samples, or the decoded ones) are an integer multiple of the one
size a network scores (the digits classifier's 8x8: the digits at ``data.image_size`` 32), they are
average-pooled down to it, so pixel and latent models of the 32x32 digits are scored alike.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from workshop_dist import parallel
from workshop_dist.eval import fid
from workshop_dist.eval.config import EvalConfiguration
from workshop_dist.eval.features import FeatureNetwork, OnMesh
from workshop_dist.training import inputs
from workshop_dist.training import step as steps
from workshop_dist.training.engine import Engine
from workshop_dist.training.hooks import next_multiple
from workshop_dist.training.hooks.evaluate import Best
from workshop_dist.training.hooks.log import MetricSink

log = logging.getLogger("workshop_dist")


class FIDHook:
    """Logs ``val/<network.metric>`` of ``num_samples`` samples every ``every`` steps and offers it to ``best``."""

    kind = "eval"  # its time is evaluation time in the clock and the run report

    def __init__(
        self,
        engine: Engine,
        network: FeatureNetwork,
        *,
        every: int,
        num_samples: int,
        batch_size: int,
        sink: MetricSink,
        best: Best,
        data_max: float = 1.0,
        sampling: dict[str, Any] | None = None,
        seed: int = 0,
        reference: tuple[np.ndarray, np.ndarray] | None = None,
        reference_data: Any = None,
        decoder: Any = None,
    ):
        """``reference``: (mu, sigma); else the network's own, else the statistics of ``reference_data``
        (an evaluation loader), computed on the mesh at the first evaluation. ``decoder``: a
        :class:`~workshop_dist.training.first_stage.FirstStage` whose decodes of the samples are scored."""
        self.engine, self.network, self.every, self.num_samples = engine, network, every, num_samples
        self.decoder = decoder
        data_max = decoder.max_value if decoder is not None else data_max
        self.batch_size = inputs.round_up(batch_size, parallel.data_parallel_size(engine.mesh))
        self.sink, self.best, self.seed = sink, best, seed
        self.sampling = tuple(sorted((sampling or {}).items()))
        self._reference, self.reference_data = reference, reference_data
        self.features = OnMesh(network, engine.mesh, data_max=data_max)
        self._sample_sums = parallel.CompiledTogether(
            jax.jit(self._sample_feature_sums, static_argnums=(0,), out_shardings=self.features.partial), "fid-samples")
        self._sample = steps.make_sample_fn(engine.calls)
        self.last_step: int | None = None
        self.history: list[dict[str, float]] = []
        if num_samples <= network.dim:
            log.warning("eval.fid_samples=%d is not more than the %d features: their covariance is singular, so %s is "
                        "unstable and biased; use several times more (FID-10k, FID-50k).", num_samples, network.dim,
                        self.metric)

    @property
    def metric(self) -> str:
        return f"val/{self.network.metric}"

    def next_step(self, step: int) -> int | None:
        return next_multiple(step, self.every)

    def __call__(self, info: Any) -> None:
        self.run(info.step, info.state)

    def run(self, step: int, state: Any) -> float:
        """Score ``state``'s samples at ``step``: log the distance, remember it, offer it to the best metric."""
        mu_ref, sigma_ref = self.reference()
        mu, sigma = self.sample_statistics(state, shift=mu_ref).gaussian()
        self.last_step = step
        try:
            value = fid.frechet_distance(mu, sigma, mu_ref, sigma_ref)
        except fid.FIDError as err:  # e.g. too few samples for a stable matrix root: the run goes on
            log.warning("No %s at step %d: %s", self.metric, step, err)
            return float("nan")
        self.history.append({"step": step, self.network.metric: value})
        self.sink.write(step, {self.network.metric: value}, "val")
        self.best.offer(step, {self.metric: value})
        return value

    # --- Statistics ---------------------------------------------------------------------------

    def reference(self) -> tuple[np.ndarray, np.ndarray]:
        """The reference (mu, sigma): given, the network's own, or of the reference data (once)."""
        if self._reference is None:
            if self.network.reference is not None:
                self._reference = self.network.reference()
            elif self.reference_data is not None:
                self._reference = self.data_statistics(self.reference_data).gaussian()
                log.info("FID reference statistics: %d examples of the evaluation split.", self.reference_count)
            else:
                raise fid.FIDError("FID needs reference statistics: set eval.reference or give evaluation data.")
        return self._reference

    def sample_statistics(self, state: Any, shift: np.ndarray | None = None) -> fid.FeatureStatistics:
        """Feature statistics of ``num_samples`` samples of ``state`` (the evaluation parameters)."""
        params, model_state = self.engine.eval_params(state), state.model_state
        classes, place = self.engine.num_classes, self.features.place
        shift_on_mesh = place(np.zeros(self.network.dim, np.float32) if shift is None else shift.astype(np.float32))
        totals = None
        for index, start in enumerate(range(0, self.num_samples, self.batch_size)):
            count = min(self.batch_size, self.num_samples - start)
            labels = place(((start + np.arange(self.batch_size)) % classes).astype(np.int32)) if classes else None
            mask = place((np.arange(self.batch_size) < count).astype(np.float32))
            rng = jax.random.fold_in(jax.random.PRNGKey(self.seed), index)
            sums = self._sample_sums(self.batch_size, params, model_state, self.features.weights, rng, labels, mask,
                                     shift_on_mesh, self.decoder.params if self.decoder is not None else None)
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)  # on the device: no sync
        return self.features.to_host(totals, shift)

    def data_statistics(self, data: Any) -> fid.FeatureStatistics:
        """Feature statistics of every example of ``data`` (an evaluation loader; padding masked), on the mesh."""
        batches = (self._pixels(parallel.host_batch_to_global(batch, self.engine.mesh))
                   for batch in inputs.eval_batches(data, self.batch_size // jax.process_count()))
        stats = self.features.statistics(batches)
        self.reference_count = stats.count
        return stats

    def _pixels(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """A reference batch as the network scores it: latents decoded, sizes pooled (see the module docstring)."""
        images = batch["image"] if self.decoder is None else self.decoder.decode_on_mesh(batch["image"])
        return {**batch, "image": pool_to(images, self.network.image_shape)}

    def _sample_feature_sums(self, count: int, params: Any, model_state: Any, weights: Any, rng: jax.Array,
                             labels: jax.Array | None, mask: jax.Array, shift: jax.Array, decoder_params: Any) -> Any:
        images = self._sample(params, model_state, rng, labels, count, self.sampling)
        images = jax.lax.with_sharding_constraint(images, self.engine.batch_sharding)  # features per device
        if self.decoder is not None:
            images = self.decoder.decode_fn(decoder_params, images)
        return self.features.sums(weights, pool_to(images, self.network.image_shape), mask, shift)

    @classmethod
    def for_run(
        cls, config: EvalConfiguration | None, engine: Engine, *, sink: MetricSink, best: Best, batch_size: int,
        experiment_config: dict[str, Any] | None, reference_data: Any, network: FeatureNetwork | None = None,
        decoder: Any = None,
    ) -> FIDHook | None:
        """The hook ``config`` asks for (None while ``eval.fid_every`` is null)."""
        if config is None or config.fid_every is None:
            return None
        from workshop_dist.data import DataConfiguration
        from workshop_dist.eval import features

        data = DataConfiguration.model_validate((experiment_config or {}).get("data") or {})
        if network is None and config.resolved_features(data.source) == "inception" and not config.inception_weights:
            log.warning(  # a digits config pointed at other data: its val/fd does not apply, FID needs weights
                "eval.fid_every is set, but FID on data.source=%s needs InceptionV3: no FID is computed. Set "
                "eval.inception_weights to a file made with `workshop-data convert-weights inception "
                "pt_inception-2015-12-05-6726825d.pth OUT.safetensors`, or eval.fid_every=null.", data.source)
            return None
        if network is None and config.resolved_features(data.source) == "digits" and (data.image_size or 8) % 8:
            raise fid.FIDError(
                f"eval.features=digits scores 8x8 digits (or multiples of 8, average-pooled to 8x8), but "
                f"data.image_size={data.image_size}: set eval.fid_every=null, or eval.features=inception with "
                "eval.inception_weights"
            )
        network = network or features.for_run(config, data.source)
        shape = sample_shape(engine, config.sampling)
        if decoder is not None:  # scored after decoding
            shape = decoder.image_shape(shape)
        pooled = pooled_shape(shape, network.image_shape)
        if pooled != tuple(shape):
            log.info("%s scores %s images: samples of %s are average-pooled to it.", network.metric,
                     "x".join(map(str, pooled)), "x".join(map(str, shape)))
            shape = pooled
        if not network.scores(shape):  # e.g. a user's model on the digits config: its samples are not 8x8 digits
            log.warning("eval.fid_every is set, but this model's samples are %s, which %s cannot score: no %s is "
                        "computed (set eval.fid_every=null to silence this).", shape, network.metric, network.metric)
            return None
        reference = None
        if config.reference:
            reference = fid.load_statistics(config.reference, network.dim)
        return cls(engine, network, every=config.fid_every, num_samples=config.fid_samples,
                   batch_size=config.fid_batch_size or batch_size, sink=sink, best=best, data_max=data.max_value,
                   sampling=config.sampling, seed=config.seed, reference=reference, reference_data=reference_data,
                   decoder=decoder)


def pooled_shape(shape: tuple[int, ...], target: tuple[int, ...] | None) -> tuple[int, ...]:
    """``shape`` after :func:`pool_to` ``target``: the target when it divides ``shape`` evenly, else unchanged."""
    shape = tuple(shape)
    if target is None or shape == tuple(target) or len(shape) != 3 or shape[-1] != target[-1]:
        return shape
    if shape[0] % target[0] or shape[1] % target[1]:
        return shape
    return tuple(target)


def pool_to(images: jax.Array, target: tuple[int, ...] | None) -> jax.Array:
    """Images ``[N, H, W, C]`` average-pooled to ``target`` ``(h, w, C)`` when that divides them evenly."""
    shape = pooled_shape(tuple(images.shape[1:]), target)
    if shape == tuple(images.shape[1:]):
        return images
    (h, w, c), (big_h, big_w, _) = shape, images.shape[1:]
    return images.reshape(images.shape[0], h, big_h // h, w, big_w // w, c).mean(axis=(2, 4))


def sample_shape(engine: Engine, sampling: dict[str, Any]) -> tuple[int, ...]:
    """The shape of one sample of the engine's model (traced abstractly: nothing runs)."""
    shapes, sample = engine.state_shapes, steps.make_sample_fn(engine.calls)
    count = parallel.data_parallel_size(engine.mesh)  # splits over the mesh like a batch
    labels = jax.ShapeDtypeStruct((count,), jnp.int32) if engine.num_classes else None
    out = jax.eval_shape(lambda p, ms, key, y: sample(p, ms, key, y, count, tuple(sorted(sampling.items()))),
                         shapes.params, shapes.model_state, jax.ShapeDtypeStruct((2,), jnp.uint32), labels)
    return tuple(out.shape[1:])
