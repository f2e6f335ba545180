"""Training: configuration, state, the pure step functions and the Trainer."""

from workshop_dist.training.config import TrainingConfiguration
from workshop_dist.training.state import TrainingState
from workshop_dist.training.trainer import NonFiniteLossError, Trainer

__all__ = ["NonFiniteLossError", "Trainer", "TrainingConfiguration", "TrainingState"]
