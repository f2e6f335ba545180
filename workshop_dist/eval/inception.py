"""InceptionV3 as FID is defined with: the 2015 TensorFlow graph, as pytorch-fid reproduces it.

FID (Heusel et al., 2017) is only comparable across papers when computed with one network:
the TensorFlow Inception graph ``inception-2015-12-05``, which pytorch-fid ports as
``fid_inception_v3()`` (torchvision's Inception3 with its ``FIDInceptionA/C/E`` blocks) and
publishes as ``pt_inception-2015-12-05-6726825d.pth``. This is the same network in NNX, NHWC:

- images ``[N, H, W, 3]`` (or 1 channel, repeated) in [0, 1], resized to 299x299 bilinearly
  without antialiasing (PyTorch's ``interpolate(..., align_corners=False)``), scaled to [-1, 1];
- every convolution without bias, then BatchNorm on its running statistics (eps 0.001), ReLU;
- the FID block variants: average pools that do not count the padding (TensorFlow's), and a
  3x3 max pool in the last block (``Mixed_7c``, a quirk of the 2015 graph);
- features: the 2048-d global average pool before the classifier.

Attribute names are pytorch-fid's (``Mixed_6b.branch7x7dbl_3.conv``), so the weights convert
by name (:func:`convert_inception`); the converted safetensors file loads with
:func:`load_inception` without PyTorch. Parity with pytorch-fid on the same random weights is
tested in ``tests/test_inception.py``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from workshop_dist.weights import (
    WeightsError,
    load_tensors,
    model_shapes,
    read_safetensors,
    read_torch_state_dict,
    torch_to_nnx,
    write_safetensors,
)

FEATURE_DIM = 2048
INPUT_SIZE = 299
BN_EPSILON = 1e-3
PUBLISHED_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
FORMAT = "workshop_dist/inception_v3_fid"
# In the published checkpoint but not in the FID network: the 1008-way classifier.
CLASSIFIER = ("fc.weight", "fc.bias")


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else value


class BasicConv2d(nnx.Module):
    """Convolution (no bias) -> BatchNorm on running statistics -> ReLU (torchvision's BasicConv2d)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        *,
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
        precision: Any,
        rngs: nnx.Rngs,
    ):
        self.conv = nnx.Conv(
            in_channels,
            out_channels,
            _pair(kernel_size),
            strides=stride,
            padding=tuple((p, p) for p in _pair(padding)),
            use_bias=False,
            precision=precision,
            kernel_init=nnx.initializers.he_normal(),  # random weights keep the scale through ReLUs
            rngs=rngs,
        )
        self.bn = nnx.BatchNorm(out_channels, epsilon=BN_EPSILON, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        # Always inference form: the running statistics, whatever train()/eval() set.
        return nnx.relu(self.bn(self.conv(x), use_running_average=True))


Conv = Callable[..., BasicConv2d]


def _avg_pool(x: jax.Array) -> jax.Array:
    """3x3, stride 1, padded, averaging only real pixels (TensorFlow's; pytorch-fid's patch)."""
    return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_same(x: jax.Array) -> jax.Array:
    return nnx.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_down(x: jax.Array) -> jax.Array:
    return nnx.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


def _cat(*branches: jax.Array) -> jax.Array:
    return jnp.concatenate(branches, axis=-1)  # channels last: PyTorch's torch.cat(..., 1)


class InceptionA(nnx.Module):
    """pytorch-fid's FIDInceptionA (Mixed_5b/5c/5d): 1x1, 5x5, double 3x3, pool branches."""

    def __init__(self, in_channels: int, pool_features: int, conv: Conv):
        self.branch1x1 = conv(in_channels, 64, 1)
        self.branch5x5_1 = conv(in_channels, 48, 1)
        self.branch5x5_2 = conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = conv(in_channels, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, padding=1)
        self.branch_pool = conv(in_channels, pool_features, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        return _cat(
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool(x)),
        )


class InceptionB(nnx.Module):
    """torchvision's InceptionB (Mixed_6a): the 35x35 -> 17x17 reduction."""

    def __init__(self, in_channels: int, conv: Conv):
        self.branch3x3 = conv(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = conv(in_channels, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, stride=2)

    def __call__(self, x: jax.Array) -> jax.Array:
        return _cat(
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            _max_pool_down(x),
        )


class InceptionC(nnx.Module):
    """pytorch-fid's FIDInceptionC (Mixed_6b..6e): factorised 7x7 branches."""

    def __init__(self, in_channels: int, channels_7x7: int, conv: Conv):
        c7 = channels_7x7
        self.branch1x1 = conv(in_channels, 192, 1)
        self.branch7x7_1 = conv(in_channels, c7, 1)
        self.branch7x7_2 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = conv(in_channels, c7, 1)
        self.branch7x7dbl_2 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = conv(in_channels, 192, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        double = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
            double = layer(double)
        return _cat(
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            self.branch7x7dbl_5(double),
            self.branch_pool(_avg_pool(x)),
        )


class InceptionD(nnx.Module):
    """torchvision's InceptionD (Mixed_7a): the 17x17 -> 8x8 reduction."""

    def __init__(self, in_channels: int, conv: Conv):
        self.branch3x3_1 = conv(in_channels, 192, 1)
        self.branch3x3_2 = conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = conv(in_channels, 192, 1)
        self.branch7x7x3_2 = conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = conv(192, 192, 3, stride=2)

    def __call__(self, x: jax.Array) -> jax.Array:
        branch7x7x3 = self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))
        return _cat(self.branch3x3_2(self.branch3x3_1(x)), self.branch7x7x3_4(branch7x7x3), _max_pool_down(x))


class InceptionE(nnx.Module):
    """pytorch-fid's FIDInceptionE_1 (``pool="avg"``, Mixed_7b) and FIDInceptionE_2 (``"max"``, Mixed_7c)."""

    def __init__(self, in_channels: int, conv: Conv, *, pool: str):
        self.pool = pool
        self.branch1x1 = conv(in_channels, 320, 1)
        self.branch3x3_1 = conv(in_channels, 384, 1)
        self.branch3x3_2a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = conv(in_channels, 448, 1)
        self.branch3x3dbl_2 = conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = conv(in_channels, 192, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3 = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _max_pool_same(x) if self.pool == "max" else _avg_pool(x)
        return _cat(
            self.branch1x1(x),
            self.branch3x3_2a(branch3x3),
            self.branch3x3_2b(branch3x3),
            self.branch3x3dbl_3a(double),
            self.branch3x3dbl_3b(double),
            self.branch_pool(pooled),
        )


class InceptionV3(nnx.Module):
    """FID's InceptionV3: images ``[N, H, W, C]`` in [0, 1] -> pool features ``[N, 2048]``.

    ``precision`` is the convolutions' (``"highest"`` by default: full float32 on GPUs and TPUs
    too, where the default would round to TF32/bfloat16 and move FID; ``"default"`` is faster).
    Built with random weights; load the published ones with :func:`load_inception`.
    """

    def __init__(self, *, rngs: nnx.Rngs, precision: Any = "highest"):
        conv = functools.partial(BasicConv2d, precision=precision, rngs=rngs)
        self.Conv2d_1a_3x3 = conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = conv(32, 32, 3)
        self.Conv2d_2b_3x3 = conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = conv(64, 80, 1)
        self.Conv2d_4a_3x3 = conv(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32, conv)
        self.Mixed_5c = InceptionA(256, 64, conv)
        self.Mixed_5d = InceptionA(288, 64, conv)
        self.Mixed_6a = InceptionB(288, conv)
        self.Mixed_6b = InceptionC(768, 128, conv)
        self.Mixed_6c = InceptionC(768, 160, conv)
        self.Mixed_6d = InceptionC(768, 160, conv)
        self.Mixed_6e = InceptionC(768, 192, conv)
        self.Mixed_7a = InceptionD(768, conv)
        self.Mixed_7b = InceptionE(1280, conv, pool="avg")
        self.Mixed_7c = InceptionE(2048, conv, pool="max")

    def __call__(self, images: jax.Array) -> jax.Array:
        x = preprocess(images)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(_max_pool_down(x)))
        x = _max_pool_down(x)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)
        for block in (self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(axis=(1, 2))


def preprocess(images: jax.Array) -> jax.Array:
    """``[N, H, W, 1 or 3]`` in [0, 1] -> ``[N, 299, 299, 3]`` in [-1, 1], as pytorch-fid does it.

    Bilinear with half-pixel centres and no antialiasing, i.e. PyTorch's
    ``F.interpolate(x, (299, 299), mode="bilinear", align_corners=False)`` (``jax.image.resize``
    antialiases when shrinking unless told not to).
    """
    x = jnp.asarray(images, jnp.float32)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"Inception takes images [N, H, W, 3] (or 1 channel) in [0, 1], got shape {x.shape}")
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)  # grey as RGB, like PIL's convert("RGB")
    if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
        x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3), "bilinear", antialias=False)
    return 2.0 * x - 1.0


@functools.partial(jax.jit, static_argnums=0)
def _features(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(images)


def feature_function(model: InceptionV3) -> Callable[[jax.Array], jax.Array]:
    """A jitted ``images -> [N, 2048]`` features; the weights are an argument, not constants, so
    every model of the same structure (and precision) shares one compilation per input shape."""
    graphdef, state = nnx.split(model)
    return functools.partial(_features, graphdef, state)


@functools.cache
def _structure(precision: Any) -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0), precision=precision)))


def abstract_inception(precision: Any = "highest") -> InceptionV3:
    """The network's structure with shapes only (``nnx.eval_shape``, traced once per precision):
    a new module each call, nothing initialised."""
    return nnx.merge(*_structure(precision), copy=True)


def random_inception(seed: int = 0, precision: Any = "highest") -> InceptionV3:
    """The network with random weights for tests: He-normal kernels drawn by numpy (a second; jax's
    initialisers take a minute eagerly and longer jitted on a CPU), BatchNorm as the identity."""
    rng = np.random.default_rng(seed)
    model = abstract_inception(precision)
    tensors = {}
    for name, shape in model_shapes(model).items():
        if name.endswith(".kernel"):
            fan_in = int(np.prod(shape[:-1]))
            tensors[name] = rng.standard_normal(shape, np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        else:  # BatchNorm: scale and var 1, bias and mean 0
            fill = 1.0 if name.endswith((".scale", ".var")) else 0.0
            tensors[name] = np.full(shape, fill, np.float32)
    load_tensors(model, tensors, source="random weights")
    return model


def convert_inception(pth_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """pytorch-fid's weights file (``pt_inception-2015-12-05-6726825d.pth``) -> a safetensors file.

    Needs PyTorch (the file is a pickle, read with ``weights_only=True``). Kernels become HWIO,
    BatchNorm's ``running_mean``/``running_var`` its ``mean``/``var``; the 1008-way classifier
    is left out (FID does not use it). A file whose name carries torch hub's hash prefix
    (``-6726825d``) must match it. Returns ``out_path``; errors are one :class:`WeightsError`.
    """
    pth_path = Path(pth_path)
    state = read_torch_state_dict(pth_path)
    digest = _sha256(pth_path)
    prefix = re.search(r"-([0-9a-f]{8,64})\.[A-Za-z]+$", pth_path.name)
    if prefix and not digest.startswith(prefix.group(1)):
        raise WeightsError(
            f"{pth_path}: its name promises sha256 {prefix.group(1)}..., the file has {digest[:12]}...: "
            "a truncated or different download; fetch the file again"
        )
    head = state.get("fc.weight")
    if head is not None and tuple(head.shape) != (1008, FEATURE_DIM):
        raise WeightsError(
            f"{pth_path} has a {head.shape[0]}-class classifier: that is torchvision's ImageNet "
            f"Inception, not FID's network; use pytorch-fid's {PUBLISHED_WEIGHTS}"
        )
    tensors = torch_to_nnx(state, abstract_inception(), ignore=CLASSIFIER, source=str(pth_path))
    metadata = {"format": FORMAT, "source": pth_path.name, "source_sha256": digest}
    return write_safetensors(out_path, tensors, metadata)


def load_inception(path: str | os.PathLike, *, precision: Any = "highest") -> InceptionV3:
    """The FID network with the weights of a file made by :func:`convert_inception` (no PyTorch)."""
    tensors, _ = read_safetensors(path)
    model = abstract_inception(precision)
    load_tensors(model, tensors, source=str(path))
    return model


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
