"""Training: configuration, state, the pure step functions, the loop and its hooks, and the Trainer."""

from workshop_dist.training import latent_stage as latent_stage  # a latent model's autoencoder from a run
from workshop_dist.training.config import TrainingConfiguration
from workshop_dist.training.hooks import Every
from workshop_dist.training.loop import StepInfo
from workshop_dist.training.state import TrainingState
from workshop_dist.training.trainer import NonFiniteLossError, Trainer

__all__ = ["Every", "NonFiniteLossError", "StepInfo", "Trainer", "TrainingConfiguration", "TrainingState"]
