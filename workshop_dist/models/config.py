"""Configuration of the model (the ``model`` section)."""

from __future__ import annotations

from typing import Any, Literal

import pydantic

from workshop_dist.config import StrictConfig


class ModelConfiguration(StrictConfig):
    """Which model class to build and its sizes; model-specific knobs go in ``parameters``."""

    name: str = "model"
    model_class: str = pydantic.Field(
        "vae", description="A registered short name ('vae', 'conv_vae') or a dotted import path to a class."
    )
    input_dim: tuple[int, ...] = pydantic.Field((8, 8, 1), description="Shape of one example, e.g. (H, W, C).")
    hidden_dims: list[int] = pydantic.Field(default_factory=lambda: [256, 128])
    output_dim: int = pydantic.Field(16, gt=0, description="Output size; the latent dimension for a VAE.")
    parameters: dict[str, Any] = pydantic.Field(
        default_factory=dict, description="Model-specific parameters, validated by the model class."
    )
    param_dtype: Literal["float32", "bfloat16"] = pydantic.Field(
        "float32",
        description="Storage dtype of the parameters (master weights). Keep float32 with "
        "training.precision=bfloat16: compute runs in bf16, updates and checkpoints stay float32.",
    )
    remat: Literal["none", "full", "dots_saveable", "nothing_saveable", "dots_with_no_batch_dims_saveable"] = (
        pydantic.Field(
            "none",
            description="Rematerialisation of the model's repeated blocks (transformer / U-Net blocks): "
            "'none' keeps every activation; 'full' recomputes each block in the backward pass; the "
            "others are jax.checkpoint_policies names (save matmul outputs, or nothing).",
        )
    )

    @pydantic.field_validator("input_dim", mode="before")
    @classmethod
    def _int_is_vector(cls, value: Any) -> Any:
        return (value,) if isinstance(value, int) else value

    @pydantic.field_validator("input_dim", "hidden_dims")
    @classmethod
    def _positive(cls, value: Any) -> Any:
        if not value or any(dim <= 0 for dim in value):
            raise ValueError(f"must be a non-empty list of positive sizes, got {list(value)}")
        return value
