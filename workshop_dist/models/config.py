"""Configuration of the model (the ``model`` section)."""

from __future__ import annotations

from typing import Any

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
