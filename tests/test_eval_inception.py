"""FID's InceptionV3 without PyTorch: its structure, random test weights, input checks.

(Parity with pytorch-fid is tests/test_inception.py, where torch is installed.)
"""

import numpy as np
import pytest

from workshop_dist.eval.inception import FEATURE_DIM, abstract_inception, preprocess, random_inception
from workshop_dist.weights import model_shapes, model_tensors


def test_random_weights_are_seeded_he_normal_with_identity_batchnorm():
    first, again, other = (model_tensors(random_inception(seed)) for seed in (0, 0, 1))
    shapes = model_shapes(abstract_inception())
    assert len(shapes) == 94 * 5  # 94 convolutions: kernel + BatchNorm scale, bias, mean, var
    assert sum(int(np.prod(s)) for s in shapes.values()) == 21_820_000  # pytorch-fid's 21.8M, less fc
    assert shapes["Conv2d_1a_3x3.conv.kernel"] == (3, 3, 3, 32)
    assert shapes["Mixed_7c.branch_pool.conv.kernel"] == (1, 1, 2048, 192)
    kernel = first["Mixed_6b.branch7x7dbl_2.conv.kernel"]  # (7, 1, 128, 128)
    assert kernel.std() == pytest.approx(np.sqrt(2.0 / (7 * 128)), rel=0.02)
    assert all(np.array_equal(first[name], again[name]) for name in first)
    assert not np.array_equal(first["Conv2d_1a_3x3.conv.kernel"], other["Conv2d_1a_3x3.conv.kernel"])
    np.testing.assert_array_equal(first["Mixed_5b.branch1x1.bn.var"], np.ones(64, np.float32))
    np.testing.assert_array_equal(first["Mixed_5b.branch1x1.bn.mean"], np.zeros(64, np.float32))


def test_inputs_are_checked_and_grey_becomes_rgb():
    with pytest.raises(ValueError, match=r"images \[N, H, W, 3\] \(or 1 channel\) in \[0, 1\], got shape \(2, 8, 8, 4\)"):
        preprocess(np.zeros((2, 8, 8, 4), np.float32))
    grey = np.random.default_rng(0).uniform(size=(1, 299, 299, 1)).astype(np.float32)
    x = np.asarray(preprocess(grey))
    assert x.shape == (1, 299, 299, 3)
    np.testing.assert_allclose(x, np.repeat(2 * grey - 1, 3, axis=-1), atol=1e-6)  # 299: no resize


@pytest.mark.slow  # compiles the network (~15-40 s on 2 cores)
def test_random_network_gives_spread_2048_d_features():
    """He-normal weights keep the scale through the 94 ReLU layers: usable features for FID tests."""
    from workshop_dist.eval.inception import feature_function

    images = np.random.default_rng(1).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    features = np.asarray(feature_function(random_inception(0))(images))
    assert features.shape == (2, FEATURE_DIM) and np.isfinite(features).all()
    assert 0.05 < features.std() < 20 and not np.allclose(features[0], features[1])
