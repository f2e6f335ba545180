"""Published weights in and out of NNX modules: safetensors files, PyTorch state dicts.

The project reads weights only from files the user names, and only from safetensors files (no
pickle, so a weights file cannot run code). A PyTorch checkpoint is converted once, by
:func:`torch_to_nnx` (names and layouts) and :func:`write_safetensors`; that conversion may
import torch (lazily, :func:`read_torch_state_dict`), nothing else here does.

Names are NNX's state paths joined by dots (``Mixed_5b.branch1x1.conv.kernel``,
``blocks.0.norm.scale``), values numpy arrays in NNX's layouts. Every check collects all
problems before failing, so a wrong file is one :class:`WeightsError` that lists every
unmatched, missing and mis-shaped tensor.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from workshop_dist._deps import require
from workshop_dist.config import WorkshopError

Shape = tuple[int, ...]

# PyTorch kernel layouts -> NNX's (spatial..., in, out), by number of dimensions: a linear
# (out, in), conv1d (O, I, W), conv2d (O, I, H, W), conv3d (O, I, D, H, W). Transposed
# convolutions (I, O, ...) are not covered: the networks converted so far have none.
KERNEL_AXES = {2: (1, 0), 3: (2, 1, 0), 4: (2, 3, 1, 0), 5: (2, 3, 4, 1, 0)}
# PyTorch buffer/parameter suffix -> NNX variable name (BatchNorm/GroupNorm/LayerNorm).
SUFFIXES = {"running_mean": "mean", "running_var": "var"}
ALWAYS_IGNORED = ("num_batches_tracked",)  # PyTorch's BatchNorm step counter: no NNX counterpart


class WeightsError(WorkshopError):
    """A weights file that is missing, unreadable, or does not fit the model."""

    exit_code = 2  # bad input: the message says which file and what to do


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors (numpy) and metadata of a safetensors file, or a :class:`WeightsError`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist (give the path of a .safetensors file)")
    try:
        with safe_open(str(path), framework="numpy") as file:
            metadata = dict(file.metadata() or {})
            tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(
            f"{path} is not a readable safetensors file ({err}); convert PyTorch weights first "
            "(workshop-data convert-weights)"
        ) from err
    return tensors, metadata


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``tensors`` to ``path`` atomically (a temporary file renamed into place)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")  # processes writing the same file do not mix
    arrays = {name: np.ascontiguousarray(value) for name, value in tensors.items()}
    try:
        save_file(arrays, str(partial), metadata=dict(metadata) if metadata else None)
        os.replace(partial, path)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise WeightsError(f"cannot write weights file {path}: {err}") from err
    return path


def _variables(model: nnx.Module) -> dict[str, nnx.Variable]:
    return {".".join(map(str, key)): var for key, var in nnx.to_flat_state(nnx.state(model, nnx.Variable))}


def model_shapes(model: nnx.Module) -> dict[str, Shape]:
    """Dotted name -> shape of every variable of ``model`` (also of an ``nnx.eval_shape`` one)."""
    return {name: tuple(var.get_value().shape) for name, var in _variables(model).items()}


def model_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
    """Dotted name -> numpy value of every variable of ``model`` (what :func:`load_tensors` reads)."""
    return {name: np.asarray(var.get_value()) for name, var in _variables(model).items()}


def load_tensors(model: nnx.Module, tensors: Mapping[str, np.ndarray], *, source: str = "weights") -> None:
    """Set every variable of ``model`` from ``tensors`` (same names and shapes), in place.

    Works on a module made with ``nnx.eval_shape`` (nothing initialised twice). Fails, before
    changing anything, with one :class:`WeightsError` listing every tensor of ``tensors`` the
    model has no variable for, every variable left without a tensor, and every shape mismatch.
    """
    problems = check_tensors({n: tuple(v.shape) for n, v in tensors.items()}, model_shapes(model))
    if problems:
        raise WeightsError(mismatch_message(source, type(model).__name__, problems))
    flat = nnx.to_flat_state(nnx.state(model, nnx.Variable))
    updated = [
        (key, var.replace(jnp.asarray(tensors[".".join(map(str, key))], var.get_value().dtype)))
        for key, var in flat
    ]
    nnx.update(model, nnx.from_flat_state(updated))


def check_tensors(
    found: Mapping[str, Shape], expected: Mapping[str, Shape], *, origin: Mapping[str, str] | None = None
) -> list[str]:
    """One line per problem: unmatched (in ``found`` only), missing (in ``expected`` only), mis-shaped.

    ``origin`` maps a found name to what it was converted from (shown in the line).
    """
    origin = origin or {}

    def label(name: str) -> str:
        return f"{origin[name]} (as {name})" if origin.get(name, name) != name else name

    problems = [
        f"unmatched  {label(name)} {shape}: the model has no such variable"
        for name, shape in found.items()
        if name not in expected
    ]
    problems += [f"missing    {name} {shape}" for name, shape in expected.items() if name not in found]
    problems += [
        f"mis-shaped {label(name)}: file {found[name]}, model {shape}"
        for name, shape in expected.items()
        if name in found and tuple(found[name]) != tuple(shape)
    ]
    return problems


def mismatch_message(source: str, model_name: str, problems: list[str]) -> str:
    counts = {kind: sum(p.startswith(kind) for p in problems) for kind in ("unmatched", "missing", "mis-shaped")}
    summary = ", ".join(f"{n} {kind}" for kind, n in counts.items() if n)
    return (
        f"{source} does not fit {model_name} ({summary} tensor(s)); is it the right file for this network?\n  "
        + "\n  ".join(problems)
    )


def torch_to_nnx(
    torch_state: Mapping[str, np.ndarray],
    model: nnx.Module,
    *,
    rename: Callable[[str], str | None] | None = None,
    ignore: Iterable[str] = (),
    source: str = "PyTorch state dict",
) -> dict[str, np.ndarray]:
    """A PyTorch state dict (numpy values) as :func:`load_tensors` input for ``model``.

    ``rename`` first maps each PyTorch name to the module path it belongs to (``None`` drops
    it; default: unchanged, for ports that keep PyTorch's attribute names). Then, per tensor:
    ``weight`` becomes the model's ``kernel`` (transposed from PyTorch's (out, in, spatial...)
    to (spatial..., in, out); a 1x1 convolution's weight into a linear kernel is squeezed first),
    or ``scale`` (norms) or ``embedding``, whichever the model has;
    ``running_mean``/``running_var`` become ``mean``/``var``; ``num_batches_tracked`` and the
    names in ``ignore`` are dropped. Fails with one :class:`WeightsError` listing every
    unmatched, missing and mis-shaped tensor (the PyTorch name beside the NNX one).
    """
    expected = model_shapes(model)
    ignored = set(ignore)
    converted: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for torch_name, value in torch_state.items():
        if torch_name in ignored or torch_name.rsplit(".", 1)[-1] in ALWAYS_IGNORED:
            continue
        name = rename(torch_name) if rename else torch_name
        if name is None:
            continue
        prefix, _, leaf = name.rpartition(".")
        value = np.asarray(value)
        if leaf == "weight":
            candidates = [_sibling(prefix, s) for s in ("kernel", "scale", "embedding")]
            name = next((c for c in candidates if c in expected), name)
            if name == candidates[0] and value.ndim == 4 and value.shape[2:] == (1, 1) and len(expected[name]) == 2:
                value = value[:, :, 0, 0]  # a 1x1 convolution's weight into a linear layer (older attention blocks)
            if name == candidates[0] and value.ndim in KERNEL_AXES:
                value = np.transpose(value, KERNEL_AXES[value.ndim])
        elif leaf in SUFFIXES:
            name = _sibling(prefix, SUFFIXES[leaf])
        if name in converted:
            raise WeightsError(f"{source}: {torch_name} and {origin[name]} both map to {name}")
        converted[name] = value
        origin[name] = torch_name
    problems = check_tensors({n: v.shape for n, v in converted.items()}, expected, origin=origin)
    if problems:
        raise WeightsError(mismatch_message(source, type(model).__name__, problems))
    return converted


def _sibling(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A PyTorch checkpoint's state dict as float numpy arrays (imports torch; only conversions do).

    Loaded with ``weights_only=True``: tensors and plain containers only, no code from the file.
    A checkpoint that wraps its state dict (``{"state_dict": ...}``) is unwrapped.
    """
    torch = require("torch", "convert PyTorch weights (only the conversion needs it; training never does)")
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"PyTorch weights file {path} does not exist")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        raise WeightsError(f"cannot read {path} as a PyTorch checkpoint: {type(err).__name__}: {err}") from err
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} holds no state dict (a mapping of names to tensors)")
    return {name: tensor.detach().cpu().numpy() for name, tensor in state.items()}
