"""The digits sample-quality metric: a deterministic classifier and a Frechet distance on its features."""

import numpy as np
import pytest
import scipy.linalg

from workshop_dist import quality
from workshop_dist.data.digits import load_digits_split


@pytest.fixture(scope="module")
def test_split() -> dict[str, np.ndarray]:
    return load_digits_split("test")


@pytest.mark.slow
def test_training_is_deterministic(test_split):
    # the run's first 30 minibatches twice, uncached: the same seed gives the same feature map
    first, again = (quality.train_classifier.__wrapped__(0, steps=30) for _ in range(2))
    np.testing.assert_array_equal(first.features(test_split["image"]), again.features(test_split["image"]))
    other = quality.train_classifier.__wrapped__(1, steps=30)
    assert not np.allclose(first.features(test_split["image"]), other.features(test_split["image"]))


@pytest.mark.slow
def test_classifier_is_accurate_on_held_out_digits():
    classifier = quality.train_classifier(0)
    assert classifier.test_accuracy >= 0.95
    assert classifier.train_accuracy >= 0.99


@pytest.mark.slow
def test_per_class_accuracy_of_real_test_images(test_split):
    result = quality.sample_quality(test_split["image"], test_split["label"])
    assert result["accuracy"] == pytest.approx(quality.train_classifier(0).test_accuracy)
    assert set(result["class_accuracy"]) == set(range(10))
    assert min(result["class_accuracy"].values()) >= 0.85


def test_frechet_distance_matches_the_sqrtm_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5))
    b = rng.normal(size=(200, 5)) @ rng.normal(size=(5, 5)) + 0.5
    mu_a, mu_b, cov_a, cov_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    reference = ((mu_a - mu_b) ** 2).sum() + np.trace(
        cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real
    )
    assert quality.frechet_distance(a, b) == pytest.approx(reference, rel=1e-6)


@pytest.mark.slow
def test_distance_of_a_set_to_itself_is_zero(test_split):
    feats = quality.features(test_split["image"])
    assert quality.frechet_distance(feats, feats) < 1e-6 * np.trace(np.cov(feats, rowvar=False))


@pytest.mark.slow
def test_distance_grows_with_noise_and_noise_is_far_above_the_floor(test_split):
    rng = np.random.default_rng(0)
    images = test_split["image"].astype(np.float32)
    floor = quality.floor()
    assert floor > 0
    scores = [
        quality.sample_quality(np.clip(images + rng.normal(0, sigma, images.shape), 0, 16))["fd"]
        for sigma in (1.0, 3.0, 6.0)
    ]
    assert scores == sorted(scores) and scores[0] > 0
    uniform = rng.uniform(0, 16, (1000, 8, 8, 1))
    result = quality.sample_quality(uniform)
    assert result["fd_floor"] == floor and result["num_samples"] == 1000
    assert result["fd"] > 10 * floor


def test_to_levels():
    x = np.array([0.0, 0.5, 1.0])
    np.testing.assert_allclose(quality.to_levels(x, "unit"), [0, 8, 16])
    np.testing.assert_allclose(quality.to_levels(x, "levels"), x)
    with pytest.raises(ValueError, match="normalize"):
        quality.to_levels(x, "bits")


def test_processes_that_need_the_classifier_together_train_it_once(tmp_path, monkeypatch):
    # Two threads stand for two processes (flock holds per open file): the second waits for the
    # first one's training, then loads what it wrote instead of training it again.
    import threading
    import time

    monkeypatch.setenv("WORKSHOP_CACHE_DIR", str(tmp_path))
    trained, train = [], quality._train_classifier

    def train_briefly(seed, steps):
        trained.append(seed)
        time.sleep(0.5)  # long enough for the other thread to reach the lock
        return train(seed, 1)

    monkeypatch.setattr(quality, "_train_classifier", train_briefly)
    results = []
    threads = [threading.Thread(target=lambda: results.append(quality.train_classifier.__wrapped__(0))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert trained == [0] and len(results) == 2
    x = load_digits_split("test")["image"][:16]
    np.testing.assert_array_equal(results[0].features(x), results[1].features(x))
    assert len(list((tmp_path / "quality").glob("*.safetensors"))) == 1
