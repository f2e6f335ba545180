"""The root configuration: one section per subsystem, validated together."""

from __future__ import annotations

from typing import Any

import pydantic

from workshop_dist.compilation import CompilationConfiguration
from workshop_dist.config import StrictConfig
from workshop_dist.data import DataConfiguration
from workshop_dist.distributed import DistributedConfiguration
from workshop_dist.eval.config import EvalConfiguration
from workshop_dist.logging_config import LoggingConfiguration
from workshop_dist.models import ModelConfiguration
from workshop_dist.models.config import DataSpec
from workshop_dist.parallel import MeshConfiguration
from workshop_dist.training import TrainingConfiguration
from workshop_dist.training.config import deprecated


class ExperimentConfiguration(StrictConfig):
    """Everything a run needs: ``workshop-train`` reads one of these from YAML plus overrides."""

    model: ModelConfiguration = pydantic.Field(default_factory=ModelConfiguration)
    training: TrainingConfiguration = pydantic.Field(default_factory=TrainingConfiguration)
    data: DataConfiguration = pydantic.Field(default_factory=DataConfiguration)
    mesh: MeshConfiguration = pydantic.Field(default_factory=MeshConfiguration)
    distributed: DistributedConfiguration = pydantic.Field(default_factory=DistributedConfiguration)
    logging: LoggingConfiguration = pydantic.Field(default_factory=LoggingConfiguration)
    compilation: CompilationConfiguration = pydantic.Field(default_factory=CompilationConfiguration)
    eval: EvalConfiguration = pydantic.Field(default_factory=EvalConfiguration)

    @pydantic.model_validator(mode="before")
    @classmethod
    def _compilation_cache_moved(cls, data: Any) -> Any:
        """``training.compilation_cache_dir`` of earlier releases is ``compilation.cache_dir`` now."""
        training = data.get("training") if isinstance(data, dict) else None
        if not isinstance(training, dict) or "compilation_cache_dir" not in training:
            return data
        training = dict(training)
        cache_dir = training.pop("compilation_cache_dir")
        deprecated("training.compilation_cache_dir", "compilation.cache_dir")
        return {**data, "training": training, "compilation": {**(data.get("compilation") or {}), "cache_dir": cache_dir}}

    @pydantic.model_validator(mode="before")
    @classmethod
    def _model_sees_the_data(cls, data: Any) -> Any:
        """Fill ``model.data`` (levels and pixel range) from the ``data`` section: the one place they come from."""
        if not isinstance(data, dict):
            return data
        try:
            source = DataConfiguration.model_validate(data.get("data") or {})
        except pydantic.ValidationError:
            return data  # reported by the field's own validation
        derived = {"num_levels": source.num_levels, "normalize": source.normalize}
        model = data.get("model") or {}
        given = model.data.model_dump(exclude_unset=True) if isinstance(model, ModelConfiguration) else (
            dict(model.get("data") or {}) if isinstance(model, dict) else {}
        )
        clash = {key: value for key, value in given.items() if derived.get(key, value) != value}
        if clash:
            raise ValueError(
                f"model.data {clash} disagrees with the data section ({derived}); model.data is filled from "
                "the data section: remove it"
            )
        if isinstance(model, ModelConfiguration):
            model = model.model_copy(update={"data": DataSpec(**derived)})
        elif isinstance(model, dict):
            model = {**model, "data": derived}
        return {**data, "model": model}

    @pydantic.model_validator(mode="after")
    def _batch_fits_mesh(self) -> ExperimentConfiguration:
        parallel_size = self.mesh.fixed_data_parallel_size
        if parallel_size is not None and self.training.batch_size % parallel_size:
            raise ValueError(
                f"training.batch_size={self.training.batch_size} is not divisible by the data-parallel size "
                f"{parallel_size} (mesh.data={self.mesh.data} x mesh.fsdp={self.mesh.fsdp})"
            )
        return self
