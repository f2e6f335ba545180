"""The root configuration: one section per subsystem, validated together."""

from __future__ import annotations

import pydantic

from workshop_dist.config import StrictConfig
from workshop_dist.data import DataConfiguration
from workshop_dist.distributed import DistributedConfiguration
from workshop_dist.logging_config import LoggingConfiguration
from workshop_dist.models import ModelConfiguration
from workshop_dist.parallel import MeshConfiguration
from workshop_dist.training import TrainingConfiguration


class ExperimentConfiguration(StrictConfig):
    """Everything a run needs: ``workshop-train`` reads one of these from YAML plus overrides."""

    model: ModelConfiguration = pydantic.Field(default_factory=ModelConfiguration)
    training: TrainingConfiguration = pydantic.Field(default_factory=TrainingConfiguration)
    data: DataConfiguration = pydantic.Field(default_factory=DataConfiguration)
    mesh: MeshConfiguration = pydantic.Field(default_factory=MeshConfiguration)
    distributed: DistributedConfiguration = pydantic.Field(default_factory=DistributedConfiguration)
    logging: LoggingConfiguration = pydantic.Field(default_factory=LoggingConfiguration)

    @pydantic.model_validator(mode="after")
    def _batch_fits_mesh(self) -> ExperimentConfiguration:
        parallel_size = self.mesh.fixed_data_parallel_size
        if parallel_size is not None and self.training.batch_size % parallel_size:
            raise ValueError(
                f"training.batch_size={self.training.batch_size} is not divisible by the data-parallel size "
                f"{parallel_size} (mesh.data={self.mesh.data} x mesh.fsdp={self.mesh.fsdp})"
            )
        return self
