"""FID's InceptionV3 and Frechet distance against pytorch-fid itself, on the same random weights.

Needs torch, torchvision and pytorch-fid (skipped without them; CI's Python 3.11 leg installs
them: ``pip install torch==2.14.1 torchvision==0.29.1 pytorch-fid==0.3.0``).
``pytorch_fid.inception.fid_inception_v3()`` downloads the published weights; here that call is
patched out, so the reference is pytorch-fid's own network with random weights: convolutions
and BatchNorm affine parameters drawn from a seed, BatchNorm running statistics measured on
random images (so activations keep a sensible scale through the 94 layers) and then perturbed
(so the statistics are not the identity a wrong layout could hide behind).
"""

from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
fid_inception = pytest.importorskip("pytorch_fid.inception")
fid_score = pytest.importorskip("pytorch_fid.fid_score")

from workshop_dist.eval.fid import FeatureStatistics, frechet_distance  # noqa: E402
from workshop_dist.eval.inception import (  # noqa: E402
    FEATURE_DIM,
    abstract_inception,
    convert_inception,
    feature_function,
    load_inception,
    preprocess,
)
from workshop_dist.weights import WeightsError, load_tensors, torch_to_nnx  # noqa: E402

FEATURE_TOLERANCE = 1e-4  # relative to the largest feature
FD_TOLERANCE = 1e-6


def random_pytorch_fid_network(seed: int = 0):
    """pytorch-fid's ``InceptionV3([3])`` (2048-d pool features) and the ``Inception3`` inside it,
    with random weights and statistics; the download is patched out."""
    torch.manual_seed(seed)
    built, urls = [], []

    def no_download(url, *args, **kwargs):
        urls.append(url)
        return {}

    def keep_random_weights(self, state_dict, *args, **kwargs):
        built.append(self)

    with (
        mock.patch.object(fid_inception, "load_state_dict_from_url", no_download),
        mock.patch.object(torchvision.models.Inception3, "load_state_dict", keep_random_weights),
    ):
        net = fid_inception.InceptionV3([3]).eval()
    assert urls == [fid_inception.FID_WEIGHTS_URL] and len(built) == 1  # the patched path was taken
    inception = built[0]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in inception.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=generator))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=generator))
                module.reset_running_stats()
                module.momentum = None  # cumulative average over the calibration batch
        net.train()
        net(torch.rand((4, 3, 299, 299), generator=generator))
        net.eval()
        for module in inception.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                std = module.running_var.sqrt()
                module.running_mean.add_(0.1 * std * torch.randn(std.shape, generator=generator))
                module.running_var.mul_(0.7 + 0.6 * torch.rand(std.shape, generator=generator))
    return net, inception


def numpy_state(module) -> dict[str, np.ndarray]:
    return {name: value.detach().numpy().copy() for name, value in module.state_dict().items()}


@pytest.fixture(scope="module")
def reference():
    torch.set_num_threads(2)
    net, inception = random_pytorch_fid_network()
    images = np.random.default_rng(1).uniform(size=(3, 3, 83, 120)).astype(np.float32)  # NCHW, not 299
    with torch.no_grad():
        [features] = net(torch.from_numpy(images))
    features = features.squeeze(-1).squeeze(-1).numpy()
    assert features.shape == (3, FEATURE_DIM) and features.std() > 0.1 * np.abs(features).mean()
    return {"inception": inception, "images": images.transpose(0, 2, 3, 1), "features": features}


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def nnx_features(model, images) -> np.ndarray:
    return np.asarray(feature_function(model)(images))


def test_resize_and_scaling_match_pytorch_fid():
    """Both directions (83x120 grows, 400x350 shrinks: no antialiasing) and scaling to [-1, 1]."""
    rng = np.random.default_rng(2)
    for shape in [(2, 3, 83, 120), (2, 3, 400, 350), (1, 1, 299, 299)]:
        images = rng.uniform(size=shape).astype(np.float32)
        x = torch.from_numpy(images).expand(-1, 3, -1, -1)
        expected = 2 * torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
        actual = np.asarray(preprocess(images.transpose(0, 2, 3, 1)))
        np.testing.assert_allclose(actual, expected.numpy().transpose(0, 2, 3, 1), rtol=0, atol=2e-6)


@pytest.mark.slow  # compiles the network (~20-60 s on 2 cores)
def test_features_match_pytorch_fid(reference):
    model = abstract_inception()
    load_tensors(model, torch_to_nnx(numpy_state(reference["inception"]), model, ignore=("fc.weight", "fc.bias")))
    features = nnx_features(model, reference["images"])
    error = relative_error(features, reference["features"])
    expected = reference["features"]
    large = np.abs(expected) > 0.01 * np.abs(expected).max()
    elementwise = np.abs(features - expected)[large] / np.abs(expected)[large]
    print(
        f"Inception features vs pytorch-fid: max |diff| / max |feature| = {error:.2e}; "
        f"elementwise relative error (features above 1% of the largest) max {elementwise.max():.2e}"
    )
    assert error < FEATURE_TOLERANCE
    reference["nnx_features"] = features


@pytest.mark.slow
def test_pth_to_safetensors_round_trip_reproduces_the_features(reference, tmp_path):
    pth = tmp_path / "random_inception.pth"
    torch.save(reference["inception"].state_dict(), pth)  # the published file's names, plus fc
    out = convert_inception(pth, tmp_path / "inception.safetensors")
    model = load_inception(out)
    features = nnx_features(model, reference["images"])
    assert relative_error(features, reference["features"]) < FEATURE_TOLERANCE
    if "nnx_features" in reference:  # the same weights, through the file: bit for bit
        np.testing.assert_array_equal(features, reference["nnx_features"])


def test_frechet_distance_matches_pytorch_fid():
    """Well-conditioned, rank-deficient (fewer samples than dims: complex round-off) and singular."""
    rng = np.random.default_rng(3)
    mix = rng.normal(size=(64, 64)) / 8
    cases = {
        "full rank": (rng.normal(size=(500, 64)) @ mix, rng.normal(size=(400, 64)) @ mix + 0.1),
        "rank deficient": (rng.gamma(2.0, size=(40, 64)), rng.gamma(2.2, size=(50, 64))),
    }
    for name, (a, b) in cases.items():
        mu1, sigma1 = FeatureStatistics.of(a).gaussian()
        mu2, sigma2 = FeatureStatistics.of(b).gaussian()
        np.testing.assert_allclose(sigma1, np.cov(a, rowvar=False), rtol=1e-10, atol=1e-13)  # pytorch-fid's stats
        expected = fid_score.calculate_frechet_distance(mu1, sigma1, mu2, sigma2)
        actual = frechet_distance(mu1, sigma1, mu2, sigma2)
        print(f"Frechet distance, {name}: {actual!r} vs pytorch-fid {expected!r}")
        assert actual == pytest.approx(expected, rel=FD_TOLERANCE), name
    singular = (np.zeros(2), np.array([[0.0, 1.0], [0.0, 0.0]]), np.ones(2), np.eye(2))
    assert frechet_distance(*singular) == pytest.approx(
        fid_score.calculate_frechet_distance(*singular), rel=FD_TOLERANCE
    )


def test_wrong_weights_files_are_named_errors(reference, tmp_path):
    state = reference["inception"].state_dict()
    broken = dict(state)
    del broken["Mixed_6b.branch7x7_2.bn.running_var"]  # 128 channels (channels_7x7)
    broken["Conv2d_1a_3x3.conv.weight"] = torch.zeros(16, 3, 3, 3)
    broken["AuxLogits.fc.weight"] = torch.zeros(1000, 768)  # a torchvision checkpoint's aux head
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(WeightsError) as info:
        convert_inception(tmp_path / "broken.pth", tmp_path / "out.safetensors")
    message = str(info.value)
    assert "does not fit InceptionV3 (1 unmatched, 1 missing, 1 mis-shaped tensor(s))" in message
    assert "unmatched  AuxLogits.fc.weight (1000, 768): the model has no such variable" in message
    assert "missing    Mixed_6b.branch7x7_2.bn.var (128,)" in message
    assert (
        "mis-shaped Conv2d_1a_3x3.conv.weight (as Conv2d_1a_3x3.conv.kernel): file (3, 3, 3, 16), model (3, 3, 3, 32)"
        in message
    )
    assert not (tmp_path / "out.safetensors").exists()

    # Checked before any name: the classifier's size and torch hub's hash prefix in the name.
    torch.save({"fc.weight": torch.zeros(1000, 2048)}, tmp_path / "imagenet.pth")
    with pytest.raises(WeightsError, match="1000-class classifier: that is torchvision's ImageNet Inception"):
        convert_inception(tmp_path / "imagenet.pth", tmp_path / "out.safetensors")
    torch.save({"x": torch.zeros(2)}, tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    with pytest.raises(WeightsError, match="name promises sha256 6726825d"):
        convert_inception(tmp_path / "pt_inception-2015-12-05-6726825d.pth", tmp_path / "out.safetensors")

    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        load_inception(tmp_path / "broken.pth")  # the .pth itself, unconverted
