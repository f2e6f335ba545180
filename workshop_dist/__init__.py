"""workshop_dist: train generative models with JAX + Flax NNX, from one CPU to a TPU pod."""

import os
import sys

# TensorFlow is only used (through CLU and TFDS) to write TensorBoard files: keep its start-up quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

if "jax" not in sys.modules:  # before JAX starts its backends: an idle libtpu stays silent
    from workshop_dist.backends import skip_idle_tpu_backend

    skip_idle_tpu_backend()  # on a host without TPU chips only (the CLIs call it too)

from workshop_dist.config import ConfigError, WorkshopError
from workshop_dist.data import DataConfiguration
from workshop_dist.experiment import ExperimentConfiguration
from workshop_dist.metrics import Logger, MetricsLogger
from workshop_dist.models import VAE, ConvVAE, ModelConfiguration, create_model, register_model
from workshop_dist.optim import (
    OptimizerConfiguration,
    SchedulerConfiguration,
    create_optimizer,
    create_schedule,
)
from workshop_dist.parallel import MeshConfiguration
from workshop_dist.training import NonFiniteLossError, Trainer, TrainingConfiguration, TrainingState

__version__ = "0.1.0"

__all__ = [
    "VAE",
    "ConfigError",
    "ConvVAE",
    "DataConfiguration",
    "ExperimentConfiguration",
    "Logger",
    "MeshConfiguration",
    "MetricsLogger",
    "ModelConfiguration",
    "NonFiniteLossError",
    "OptimizerConfiguration",
    "SchedulerConfiguration",
    "Trainer",
    "TrainingConfiguration",
    "TrainingState",
    "WorkshopError",
    "create_model",
    "create_optimizer",
    "create_schedule",
    "register_model",
]
