"""Configuration of the model (the ``model`` section), and what the model knows of the data."""

from __future__ import annotations

import warnings
from typing import Any, Literal

import pydantic

from workshop_dist.config import ConfigError, StrictConfig

Dtype = Literal["float32", "bfloat16"]


class DataSpec(StrictConfig):
    """The data as the model sees it; :class:`~workshop_dist.experiment.ExperimentConfiguration` fills it
    from the ``data`` section once (the defaults are the built-in digits')."""

    num_levels: int = pydantic.Field(
        17, ge=2, description="Distinct pixel values of the source, 0..num_levels-1 (digits: 17, 8-bit images: 256)."
    )
    normalize: Literal["unit", "levels", "latent"] | None = pydantic.Field(
        None,
        description="How batches hold pixels, as data.normalize: floats in [0, 1] ('unit'), the integer "
        "levels 0..num_levels-1 ('levels'), or an autoencoder's scaled latents ('latent': no pixel range); "
        "null: not stated (each model assumes its usual form).",
    )

    @property
    def max_value(self) -> float | None:
        """The value of a white pixel in batches (None when ``normalize`` is not stated, or for latents)."""
        if self.normalize in (None, "latent"):
            return None
        return 1.0 if self.normalize == "unit" else float(self.num_levels - 1)


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
    dtype: Dtype = pydantic.Field(
        "float32",
        description="Compute dtype of the layers (activations, matmuls), fixed when the model is built; "
        "params, optimizer state, gradients and the loss stay float32 (see param_dtype).",
    )
    param_dtype: Dtype = pydantic.Field(
        "float32",
        description="Storage dtype of the parameters (master weights). Keep float32 with dtype=bfloat16: "
        "compute runs in bf16, updates and checkpoints stay float32.",
    )
    decoder: str | None = pydantic.Field(
        None,
        description="A frozen autoencoder that decodes this model's samples (latents) to pixels for sample grids "
        "and the FID hook: converted weights (.safetensors) or an autoencoder run's workdir/checkpoint "
        "(workshop_dist.training.first_stage). Never trained, not in checkpoints.",
    )
    data: DataSpec = pydantic.Field(
        default_factory=DataSpec,
        exclude=True,  # derived from the data section, never written back (a saved config re-derives it)
        description="Filled from the experiment's data section; set it only when building a model by hand.",
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

    def with_precision(self, precision: str | None) -> ModelConfiguration:
        """This config with ``training.performance.precision`` (the deprecated spelling of ``model.dtype``) resolved."""
        if precision in (None, "float32") or precision == self.dtype:
            if precision not in (None, "float32"):
                _warn_precision()
            return self
        if "dtype" in self.model_fields_set:
            raise ConfigError(
                f"training.performance.precision={precision} and model.dtype={self.dtype} disagree: set only model.dtype"
            )
        _warn_precision()
        return self.model_copy(update={"dtype": precision})


def _warn_precision() -> None:
    warnings.warn(
        "training.performance.precision is deprecated and will be removed in the next release; set model.dtype "
        "(the compute dtype the model is built with)",
        DeprecationWarning,
        stacklevel=3,
    )


class LevelsParameters(StrictConfig):
    """Parameters of a family over integer pixel levels; the level count comes from ``model.data``."""

    num_levels: int | None = pydantic.Field(
        None, ge=2, description="Deprecated: the levels come from model.data.num_levels (the data section)."
    )


def data_levels(config: ModelConfiguration, parameters: LevelsParameters, family: str) -> int:
    """The data's level count: ``model.data.num_levels`` (the deprecated ``parameters.num_levels`` still works)."""
    spec = config.data
    if spec.normalize == "latent":
        raise ConfigError(
            f"{family} models integer pixel levels, but the data is an autoencoder's latents: train a flow matching "
            "or EDM objective on them (model.parameters.objective)"
        )
    if spec.normalize == "unit":
        raise ConfigError(
            f"{family} models integer pixel levels, but the data is normalized to [0, 1]: set data.normalize: levels"
        )
    old = parameters.num_levels
    if old is None:
        return spec.num_levels
    warnings.warn(
        f"model.parameters.num_levels is deprecated and will be removed in the next release; {family} takes "
        "the level count from the data section (model.data.num_levels)",
        DeprecationWarning,
        stacklevel=3,
    )
    if "num_levels" in spec.model_fields_set and spec.num_levels != old:
        raise ConfigError(
            f"model.parameters.num_levels={old} disagrees with the data's {spec.num_levels} levels: remove it"
        )
    return old
