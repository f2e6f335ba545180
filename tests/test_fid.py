"""Frechet distance and feature statistics without PyTorch: closed forms and numpy references.

(The comparison with pytorch-fid itself is in tests/test_inception.py.)
"""

import logging

import jax
import numpy as np
import pytest

from workshop_dist import quality
from workshop_dist.eval.fid import (
    FeatureStatistics,
    FIDError,
    feature_sums,
    fid_from_features,
    frechet_distance,
    load_statistics,
    save_statistics,
)


def test_diagonal_gaussians_have_the_closed_form():
    """For diagonal covariances FD = |mu1 - mu2|^2 + sum_i (sqrt(s1_i) - sqrt(s2_i))^2."""
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    s1, s2 = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0.0, abs=1e-10)


def test_full_covariances_agree_with_the_symmetric_eigen_formulation():
    """sqrtm(S1 S2) (pytorch-fid's way) against S1^1/2 S2 S1^1/2 (quality.py's), on correlated features."""
    rng = np.random.default_rng(1)
    a = rng.normal(size=(400, 12)) @ rng.normal(size=(12, 12))
    b = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12)) + 0.5
    assert fid_from_features(a, b) == pytest.approx(quality.frechet_distance(a, b), rel=1e-9)


def test_rank_deficient_covariances_drop_round_off_imaginary_parts():
    """Fewer samples than dimensions: sqrtm comes back complex with round-off imaginary parts."""
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(6, 10)), rng.normal(size=(6, 10)) + 1.0
    value = fid_from_features(a, b)
    assert np.isfinite(value) and value == pytest.approx(quality.frechet_distance(a, b), rel=1e-6)


def test_singular_product_gets_eps_on_the_diagonals(caplog):
    """A product without a square root (nilpotent): sqrtm gives inf, eps on the diagonals fixes it."""
    sigma1, sigma2 = np.array([[0.0, 1.0], [0.0, 0.0]]), np.eye(2)
    eps = 1e-6
    with caplog.at_level(logging.WARNING, logger="workshop_dist.eval.fid"):
        value = frechet_distance(np.zeros(2), sigma1, np.zeros(2), sigma2, eps=eps)
    assert "singular covariance product; adding 1e-06" in caplog.text
    # (S1 + eps I)(1 + eps) is upper triangular with diagonal eps(1 + eps): trace of its root
    # is 2 sqrt(eps (1 + eps)); tr S1 = 0, tr S2 = 2.
    assert value == pytest.approx(2.0 - 4.0 * np.sqrt(eps * (1 + eps)), rel=1e-9)


def test_large_imaginary_component_is_an_error():
    with pytest.raises(FIDError, match="imaginary component of 1"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([1.0, -1.0]))


def test_statistics_of_different_sizes_are_an_error():
    with pytest.raises(FIDError, match=r"different feature sizes: mean \(3,\) and \(4,\)"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_streaming_statistics_match_numpy_in_any_grouping():
    """Batches, merged accumulators and device sums (float32, shifted) give numpy's mean and cov.

    The features sit far from zero (mean 50, std ~1), where an unshifted float32 sum of outer
    products would lose most digits of the covariance.
    """
    rng = np.random.default_rng(3)
    features = 50.0 + rng.normal(size=(1000, 8)) @ rng.normal(size=(8, 8)) * 0.3
    mean, cov = features.mean(0), np.cov(features, rowvar=False)

    streamed = FeatureStatistics(8)
    for batch in np.array_split(features, 7):
        streamed.update(batch)
    np.testing.assert_allclose(streamed.mean(), mean, rtol=1e-12)
    np.testing.assert_allclose(streamed.covariance(), cov, rtol=1e-9, atol=1e-12)

    halves = FeatureStatistics.of(features[:300]).merge(FeatureStatistics.of(features[300:]))
    np.testing.assert_allclose(halves.covariance(), cov, rtol=1e-9, atol=1e-12)

    shift = features[:100].mean(0)  # a fixed shift near the mean (e.g. the first batch's)
    device = FeatureStatistics(8)
    sums = jax.jit(feature_sums)
    for batch in np.array_split(features.astype(np.float32), 4):
        device.add_sums(*sums(batch, shift), shift=shift)
    assert device.count == 1000
    np.testing.assert_allclose(device.mean(), mean, rtol=1e-6)
    np.testing.assert_allclose(device.covariance(), cov, rtol=1e-4, atol=1e-4 * np.abs(cov).max())


def test_statistics_files_round_trip_and_check_the_feature_size(tmp_path):
    rng = np.random.default_rng(4)
    stats = FeatureStatistics.of(rng.normal(size=(50, 64)))
    path = stats.save(tmp_path / "ref.npz")
    with np.load(path) as data:  # pytorch-fid's format: exactly mu and sigma
        assert sorted(data.files) == ["mu", "sigma"]
    mu, sigma = load_statistics(path, feature_dim=64)
    np.testing.assert_array_equal(mu, stats.mean())
    np.testing.assert_array_equal(sigma, stats.covariance())

    with pytest.raises(FIDError, match=r"64-d features, but these features are 2048-d"):
        load_statistics(path)  # Inception's 2048 by default
    np.savez(tmp_path / "other.npz", mean=mu)
    with pytest.raises(FIDError, match=r"lacks \['mu', 'sigma'\] \(has \['mean'\]\)"):
        load_statistics(tmp_path / "other.npz", feature_dim=64)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(FIDError, match="cannot read statistics file"):
        load_statistics(tmp_path / "junk.npz")
    with pytest.raises(FIDError, match="does not exist"):
        load_statistics(tmp_path / "absent.npz")
    with pytest.raises(FIDError, match=r"sigma \[D, D\]"):
        save_statistics(tmp_path / "bad.npz", mu, sigma[:3])
