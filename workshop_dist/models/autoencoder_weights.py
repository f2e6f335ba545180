"""Stable Diffusion's VAE weights (a diffusers ``AutoencoderKL`` state dict) into :class:`Autoencoder`.

Why a converter: published first-stage weights (``stabilityai/sd-vae-ft-mse``, SD 1.x/2.x) are
PyTorch tensors under diffusers' names. :func:`convert_sd_vae` maps them once onto the NNX
layout through the shared converter (:func:`workshop_dist.weights.torch_to_nnx`, the same one
the Inception port uses) and writes a safetensors file that :func:`load_autoencoder` reads
without PyTorch. The architecture (widths, blocks per level, latent and image channels, quant
convolutions, mid-block attention) is read off the tensors' names and shapes; only the GroupNorm
group count cannot be, so it comes from a diffusers ``config.json`` beside the source file, or
``norm_num_groups`` (default 32, SD's). Older checkpoints name the mid-block attention
``query/key/value/proj_attn`` (as linear or 1x1-convolution weights): both are accepted.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from workshop_dist.models.autoencoder import Autoencoder, AutoencoderParameters
from workshop_dist.models.config import ModelConfiguration
from workshop_dist.weights import (
    WeightsError,
    load_tensors,
    read_safetensors,
    read_torch_state_dict,
    torch_to_nnx,
    write_safetensors,
)

FORMAT = "workshop_dist/autoencoder_kl"
_OLD_ATTENTION = re.compile(r"(mid_block\.attentions\.\d+)\.(query|key|value|proj_attn)\.")
_NEW_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_CONFIG_KEYS = ("norm_num_groups", "scaling_factor")  # what config.json adds to the tensors' shapes


def diffusers_name(name: str) -> str:
    """Today's diffusers name of a tensor (older ``mid_block.attentions.0.query.weight`` -> ``...to_q.weight``)."""
    return _OLD_ATTENTION.sub(lambda m: f"{m.group(1)}.{_NEW_ATTENTION[m.group(2)]}.", name)


def infer_parameters(state: Mapping[str, np.ndarray], *, source: str = "state dict") -> tuple[dict[str, Any], int]:
    """``(parameters, image channels)`` of the ``AutoencoderKL`` a state dict (diffusers' names) belongs to."""
    for needed in ("encoder.conv_in.weight", "decoder.conv_in.weight", "encoder.down_blocks.0.resnets.0.conv1.weight"):
        if needed not in state:
            raise WeightsError(
                f"{source} is not a diffusers AutoencoderKL state dict: it has no {needed} (names like "
                "encoder.down_blocks.0.resnets.0.conv1.weight; convert CompVis/LDM checkpoints with diffusers first)"
            )
    widths = []
    while f"encoder.down_blocks.{len(widths)}.resnets.0.conv1.weight" in state:
        widths.append(int(state[f"encoder.down_blocks.{len(widths)}.resnets.0.conv1.weight"].shape[0]))
    blocks = 0
    while f"encoder.down_blocks.0.resnets.{blocks}.conv1.weight" in state:
        blocks += 1
    parameters = {
        "block_out_channels": widths,
        "layers_per_block": blocks,
        "latent_channels": int(state["decoder.conv_in.weight"].shape[1]),
        "mid_block_attention": any(name.startswith("encoder.mid_block.attentions.") for name in state),
        "use_quant_conv": "quant_conv.weight" in state,
        "use_post_quant_conv": "post_quant_conv.weight" in state,
    }
    return parameters, int(state["encoder.conv_in.weight"].shape[1])


def autoencoder_config(parameters: Mapping[str, Any], input_dim: Sequence[int]) -> ModelConfiguration:
    """The model config of an ``autoencoder`` with these parameters for images of shape ``input_dim``."""
    return ModelConfiguration(name="sd_vae", model_class="autoencoder", input_dim=tuple(input_dim), parameters=dict(parameters))


def abstract_autoencoder(parameters: Mapping[str, Any], input_dim: Sequence[int]) -> Autoencoder:
    """The autoencoder's structure with shapes only (``nnx.eval_shape``: nothing initialised)."""
    config = autoencoder_config(parameters, input_dim)
    return nnx.eval_shape(lambda: Autoencoder(config, rngs=nnx.Rngs(0)))


def convert_sd_vae(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    norm_num_groups: int | None = None,
    scaling_factor: float | None = None,
) -> Path:
    """A diffusers ``AutoencoderKL`` checkpoint (safetensors; ``.bin``/``.pt`` need PyTorch) -> a safetensors
    file for :func:`load_autoencoder`. Returns ``out``.

    Kernels become HWIO / (in, out), GroupNorm ``weight`` its ``scale``. Every tensor of the source must
    find a variable and every variable a tensor of the right shape: otherwise one :class:`WeightsError`
    names all the unmatched, missing and mis-shaped tensors. ``norm_num_groups`` / ``scaling_factor``
    override a ``config.json`` beside ``src`` (defaults: 32, 0.18215).
    """
    src = Path(src)
    if src.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        state = read_torch_state_dict(src)
    else:
        state, _ = read_safetensors(src)
    state = {diffusers_name(name): value for name, value in state.items()}
    parameters, channels = infer_parameters(state, source=str(src))
    parameters.update(_diffusers_config(src))
    parameters.update({k: v for k, v in (("norm_num_groups", norm_num_groups), ("scaling_factor", scaling_factor))
                       if v is not None})
    AutoencoderParameters.model_validate(parameters)  # a bad group count fails here, with the field named
    factor = 2 ** (len(parameters["block_out_channels"]) - 1)
    out_channels = int(state.get("decoder.conv_out.weight", np.zeros((channels,))).shape[0])
    if out_channels != channels:
        raise WeightsError(f"{src}: {channels} input but {out_channels} output channels; the autoencoder needs them equal")
    model = abstract_autoencoder(parameters, (factor, factor, channels))
    tensors = torch_to_nnx(state, model, source=str(src))
    metadata = {"format": FORMAT, "parameters": json.dumps(parameters), "channels": str(channels), "source": src.name}
    return write_safetensors(out, tensors, metadata)


def load_autoencoder(path: str | os.PathLike, input_dim: Sequence[int]) -> Autoencoder:
    """The autoencoder of a file made by :func:`convert_sd_vae`, for images ``input_dim`` (H, W, C); no PyTorch.

    Its ``encode`` takes data-space images in [0, 1] (SD's [-1, 1] inside) and ``decode`` returns them.
    """
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != FORMAT:
        raise WeightsError(
            f"{path} was not written by convert_sd_vae (format {metadata.get('format')!r}, expected {FORMAT!r}): "
            "convert it with `workshop-data convert-weights sd-vae SRC OUT`"
        )
    channels = int(metadata["channels"])
    if len(input_dim) != 3 or input_dim[-1] != channels:
        raise WeightsError(f"{path} holds an autoencoder of {channels}-channel images; input_dim {list(input_dim)} does not fit")
    model = abstract_autoencoder(json.loads(metadata["parameters"]), input_dim)
    load_tensors(model, tensors, source=str(path))
    return model


def _diffusers_config(src: Path) -> dict[str, Any]:
    """``norm_num_groups`` and ``scaling_factor`` from diffusers' ``config.json`` beside ``src``, if there is one."""
    path = src.with_name("config.json")
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise WeightsError(f"cannot read {path} (diffusers' config beside {src.name}): {err}") from err
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise WeightsError(f"{path} describes {config['_class_name']}, not AutoencoderKL (the converter's model)")
    if config.get("act_fn", "silu") != "silu":
        raise WeightsError(f"{path}: act_fn {config['act_fn']!r}; the autoencoder uses silu")
    return {key: config[key] for key in _CONFIG_KEYS if config.get(key) is not None}
