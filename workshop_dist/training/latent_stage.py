"""Lets :class:`~workshop_dist.models.latent.LatentModel` read its frozen autoencoder from a run's checkpoint.

Why here: ``models/`` must not import the training package, and reading a run takes the engine's
abstract state (:func:`workshop_dist.training.first_stage.load_first_stage`); the training package
imports this module, which hands the model that loader.
"""

from __future__ import annotations

from flax import nnx

from workshop_dist.models.latent import LatentModel
from workshop_dist.training.first_stage import load_first_stage


def run_autoencoder(path: str, channels: int) -> nnx.Module:
    """The autoencoder of a run (workdir, checkpoints folder or one checkpoint) with the params evaluation uses."""
    stage = load_first_stage(path, image_channels=channels)
    return nnx.merge(stage.graphdef, stage.params)


LatentModel.run_loader = staticmethod(run_autoencoder)
