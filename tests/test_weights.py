"""workshop_dist.weights without PyTorch: safetensors files, PyTorch names and layouts, errors.

A hand-made "PyTorch state dict" (numpy arrays in PyTorch's layouts) goes through
``torch_to_nnx`` into a small NNX module, whose outputs must equal the same computation done
in PyTorch's layouts with ``lax.conv_general_dilated(..., ("NCHW", "OIHW", "NCHW"))``.
(The Inception conversion against real PyTorch is tests/test_inception.py.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from workshop_dist.config import WorkshopError
from workshop_dist.weights import (
    WeightsError,
    load_tensors,
    model_shapes,
    model_tensors,
    read_safetensors,
    torch_to_nnx,
    write_safetensors,
)


class Small(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 4, (3, 2), padding="VALID", rngs=rngs)
        self.norm = nnx.BatchNorm(4, epsilon=1e-3, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(4, 5, rngs=rngs)])

    def __call__(self, x):
        h = self.norm(self.conv(x), use_running_average=True)
        return self.blocks[0](h.mean(axis=(1, 2)))


def torch_like_state(rng) -> dict[str, np.ndarray]:
    """What ``Small``'s PyTorch twin's ``state_dict()`` would hold (PyTorch names and layouts)."""
    return {
        "conv.weight": rng.normal(size=(4, 3, 3, 2)).astype(np.float32),  # OIHW
        "conv.bias": rng.normal(size=4).astype(np.float32),
        "norm.weight": rng.uniform(0.5, 1.5, 4).astype(np.float32),
        "norm.bias": rng.normal(size=4).astype(np.float32),
        "norm.running_mean": rng.normal(size=4).astype(np.float32),
        "norm.running_var": rng.uniform(0.5, 2.0, 4).astype(np.float32),
        "norm.num_batches_tracked": np.array(7, np.int64),
        "blocks.0.weight": rng.normal(size=(5, 4)).astype(np.float32),  # (out, in)
        "blocks.0.bias": rng.normal(size=5).astype(np.float32),
    }


def torch_forward(state, x_nhwc):
    """``Small`` computed in PyTorch's layouts (NCHW, OIHW kernel, y = x W^T + b)."""
    x = jnp.transpose(x_nhwc, (0, 3, 1, 2))
    h = jax.lax.conv_general_dilated(x, state["conv.weight"], (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW"))
    h = h + state["conv.bias"][None, :, None, None]
    scale = state["norm.weight"] / np.sqrt(state["norm.running_var"] + 1e-3)
    h = (h - state["norm.running_mean"][None, :, None, None]) * scale[None, :, None, None]
    h = h + state["norm.bias"][None, :, None, None]
    return h.mean(axis=(2, 3)) @ state["blocks.0.weight"].T + state["blocks.0.bias"]


def abstract_small() -> Small:
    return nnx.eval_shape(lambda: Small(nnx.Rngs(0)))


def test_torch_names_and_layouts_map_onto_the_module():
    state = torch_like_state(np.random.default_rng(0))
    model = abstract_small()
    tensors = torch_to_nnx(state, model)
    assert sorted(tensors) == sorted(model_shapes(model))
    assert tensors["conv.kernel"].shape == (3, 2, 3, 4)  # HWIO
    load_tensors(model, tensors, source="test")
    x = np.random.default_rng(1).normal(size=(2, 6, 5, 3)).astype(np.float32)
    np.testing.assert_allclose(model(x), torch_forward(state, x), rtol=1e-5, atol=1e-5)


def test_safetensors_round_trip_keeps_tensors_and_metadata(tmp_path):
    tensors = torch_to_nnx(torch_like_state(np.random.default_rng(2)), abstract_small())
    path = write_safetensors(tmp_path / "sub" / "small.safetensors", tensors, {"format": "small"})
    assert not list(path.parent.glob("*.partial"))
    loaded, metadata = read_safetensors(path)
    assert metadata == {"format": "small"}
    assert sorted(loaded) == sorted(tensors)
    for name in tensors:
        np.testing.assert_array_equal(loaded[name], tensors[name])
    model = abstract_small()
    load_tensors(model, loaded)
    for name, value in model_tensors(model).items():
        np.testing.assert_array_equal(value, tensors[name])


def test_every_unmatched_missing_and_misshaped_tensor_is_listed_in_one_error():
    state = torch_like_state(np.random.default_rng(3))
    del state["norm.running_var"]
    state["conv.weight"] = state["conv.weight"][:2]  # 2 output channels instead of 4
    state["head.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(WeightsError) as info:
        torch_to_nnx(state, abstract_small(), source="small.pth")
    message = str(info.value)
    assert isinstance(info.value, WorkshopError)
    assert message.startswith("small.pth does not fit Small (1 unmatched, 1 missing, 1 mis-shaped tensor(s))")
    assert "unmatched  head.weight (3, 3)" in message
    assert "missing    norm.var (4,)" in message
    assert "mis-shaped conv.weight (as conv.kernel): file (3, 2, 3, 2), model (3, 2, 3, 4)" in message

    model = abstract_small()
    tensors = torch_to_nnx(torch_like_state(np.random.default_rng(3)), model)
    tensors["extra"] = np.zeros(2, np.float32)
    del tensors["blocks.0.bias"]
    with pytest.raises(WeightsError, match=r"(?s)1 unmatched, 1 missing.*unmatched  extra.*missing    blocks.0.bias"):
        load_tensors(model, tensors, source="w.safetensors")
    assert isinstance(model.conv.kernel.get_value(), jax.ShapeDtypeStruct)  # nothing was changed


def test_unreadable_or_absent_files_are_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        read_safetensors(tmp_path / "absent.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        read_safetensors(tmp_path / "bad.safetensors")
