"""The Frechet distance of two Gaussians, the feature statistics behind it, and their files.

:func:`frechet_distance` is pytorch-fid's ``calculate_frechet_distance`` step for step (the
same ``scipy.linalg.sqrtm`` of the covariance product, the same ``eps`` on the diagonals when
that product is singular, the same tolerance for round-off imaginary parts), so FID values
agree with the published ones to round-off (tested against pytorch-fid to 1e-6 relative).

Statistics stream: :class:`FeatureStatistics` keeps the count, the sum and the sum of outer
products of the features in float64 on the host, so any number of batches, devices or hosts
merge exactly (sums add) and the covariance ``(S - n mu mu^T) / (n - 1)`` keeps ~1e-12
relative precision for Inception features. On devices, :func:`feature_sums` computes one
batch's sums in float32 about a fixed shift (say the reference mean): centred values keep the
outer products from cancelling; :meth:`FeatureStatistics.add_sums` takes them back to float64.

Files are pytorch-fid's ``.npz`` (``mu``: ``[D]``, ``sigma``: ``[D, D]``), so published
reference statistics (e.g. for CIFAR-10) work as they are.
"""

from __future__ import annotations

import logging
import os
import warnings
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from workshop_dist.config import WorkshopError

logger = logging.getLogger(__name__)


class FIDError(WorkshopError):
    """Statistics that cannot be compared: other feature sizes, unreadable files, complex roots."""

    exit_code = 2  # bad input: the message says which file and what to do


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2))``, as pytorch-fid computes it.

    When ``sqrtm`` of the product is not finite, ``eps`` is added to both diagonals (with a
    warning); an imaginary part of the root's diagonal larger than 1e-3 is an error, a smaller
    one (round-off) is dropped.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise FIDError(
            f"statistics of different feature sizes: mean {mu1.shape} and {mu2.shape}, "
            f"covariance {sigma1.shape} and {sigma2.shape}"
        )
    diff = mu1 - mu2
    with warnings.catch_warnings():  # a singular product is handled below (pytorch-fid's disp=False)
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        logger.warning("Frechet distance: singular covariance product; adding %s to the diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise FIDError(
                f"Frechet distance: the covariance product's square root has an imaginary component of "
                f"{np.max(np.abs(covmean.imag)):.3g} (too few samples for the feature size, or bad statistics)"
            )
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """The Frechet distance between Gaussians fitted to two feature sets ``[N, D]``, ``[M, D]``."""
    return frechet_distance(*FeatureStatistics.of(features1).gaussian(), *FeatureStatistics.of(features2).gaussian())


class FeatureStatistics:
    """Count, sum and sum of outer products of feature vectors (float64, host): mean and covariance.

    ``update`` adds a batch, ``merge`` another accumulator (other devices, hosts, shards),
    ``add_sums`` a device's :func:`feature_sums`. Order and grouping change only round-off.
    """

    def __init__(self, dim: int):
        self.dim = int(dim)
        self.count = 0
        self.sum = np.zeros(self.dim, np.float64)
        self.sum_outer = np.zeros((self.dim, self.dim), np.float64)

    @classmethod
    def of(cls, features: np.ndarray) -> FeatureStatistics:
        features = np.asarray(features)
        if features.ndim != 2:
            raise FIDError(f"features must be [N, D], got shape {features.shape}")
        stats = cls(features.shape[1])
        stats.update(features)
        return stats

    def update(self, features: np.ndarray) -> FeatureStatistics:
        features = np.asarray(features, np.float64)
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise FIDError(f"features must be [N, {self.dim}], got shape {features.shape}")
        self.count += features.shape[0]
        self.sum += features.sum(axis=0)
        self.sum_outer += features.T @ features
        return self

    def add_sums(self, count, sum_, sum_outer, shift=None) -> FeatureStatistics:
        """Add sums of ``x - shift`` over ``count`` vectors (from :func:`feature_sums`, any dtype)."""
        count = int(count)
        sum_ = np.asarray(sum_, np.float64)
        sum_outer = np.asarray(sum_outer, np.float64)
        if sum_.shape != (self.dim,) or sum_outer.shape != (self.dim, self.dim):
            raise FIDError(f"sums of shapes {sum_.shape}, {sum_outer.shape} for {self.dim}-d features")
        if shift is not None:  # sum (d + c)(d + c)^T = S_dd + s_d c^T + c s_d^T + n c c^T
            shift = np.broadcast_to(np.asarray(shift, np.float64), (self.dim,))
            sum_outer = sum_outer + np.outer(sum_, shift) + np.outer(shift, sum_) + count * np.outer(shift, shift)
            sum_ = sum_ + count * shift
        self.count += count
        self.sum += sum_
        self.sum_outer += sum_outer
        return self

    def merge(self, other: FeatureStatistics) -> FeatureStatistics:
        return self.add_sums(other.count, other.sum, other.sum_outer)

    def mean(self) -> np.ndarray:
        if self.count < 1:
            raise FIDError("no features were added")
        return self.sum / self.count

    def covariance(self) -> np.ndarray:
        """The unbiased sample covariance (``np.cov``'s), symmetric."""
        if self.count < 2:
            raise FIDError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        mu = self.mean()
        cov = (self.sum_outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return (cov + cov.T) / 2

    def gaussian(self) -> tuple[np.ndarray, np.ndarray]:
        return self.mean(), self.covariance()

    def save(self, path: str | os.PathLike) -> Path:
        return save_statistics(path, *self.gaussian())


def feature_sums(
    features: jax.Array, shift: jax.Array | float = 0.0, mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(count, sum(x - shift), sum((x - shift)(x - shift)^T))`` of ``[N, D]`` features, jittable.

    Float32 on the device (full-precision matmul); with ``shift`` near the mean the outer products
    are of centred values, so the covariance does not lose digits to ``S - n mu mu^T``. ``mask``
    ``[N]`` (0 or 1) leaves padding rows out. On sharded features the sums are reduced across the
    devices by XLA (no features are gathered); :meth:`FeatureStatistics.add_sums` takes them back.
    """
    centred = features.astype(jnp.float32) - jnp.asarray(shift, jnp.float32)
    if mask is None:
        count = jnp.asarray(features.shape[0], jnp.int32)
    else:
        centred = centred * mask.astype(jnp.float32)[:, None]  # rows of padding become zeros
        count = jnp.sum(mask).astype(jnp.int32)
    outer = jnp.matmul(centred.T, centred, precision=jax.lax.Precision.HIGHEST)
    return count, centred.sum(axis=0), outer


def save_statistics(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> Path:
    """Write pytorch-fid's statistics file: ``mu`` ``[D]`` and ``sigma`` ``[D, D]`` in an ``.npz``."""
    mu, sigma = np.asarray(mu), np.asarray(sigma)
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise FIDError(f"statistics need mu [D] and sigma [D, D], got {mu.shape} and {sigma.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial.npz")
    np.savez(partial, mu=mu, sigma=sigma)
    os.replace(partial, path)
    return path


def load_statistics(path: str | os.PathLike, feature_dim: int | None = 2048) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` from a pytorch-fid ``.npz``; ``feature_dim`` (Inception's 2048) is checked.

    A file of another feature size (say the 64-d features of pytorch-fid's ``--dims 64``, or
    the digits classifier's) is an error that says so: its distance would mean nothing.
    """
    path = Path(path)
    if not path.is_file():
        raise FIDError(f"statistics file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = {"mu", "sigma"} - set(data.files)
            if missing:
                raise FIDError(
                    f"{path} is not a statistics file: it lacks {sorted(missing)} (has {sorted(data.files)}); "
                    "expected pytorch-fid's .npz with mu and sigma"
                )
            mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise FIDError(f"cannot read statistics file {path}: {err}") from err
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise FIDError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not a mean [D] and covariance [D, D]")
    if feature_dim is not None and mu.size != feature_dim:
        raise FIDError(
            f"{path} holds statistics of {mu.size}-d features, but these features are {feature_dim}-d "
            f"(Inception's pool features are 2048-d); compute the reference statistics with the same network"
        )
    return mu, sigma
