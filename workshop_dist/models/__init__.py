"""Generative models: the registry/factory and one module per model family."""

from workshop_dist.models import artifex as artifex  # registers artifex_vae, artifex_ddpm, artifex_realnvp
from workshop_dist.models import autoencoder as autoencoder  # registers 'autoencoder'
from workshop_dist.models import autoencoder_gan as autoencoder_gan  # its discriminator variant
from workshop_dist.models import dit as dit  # registers 'dit'
from workshop_dist.models import flow as flow  # registers 'flow'
from workshop_dist.models import gan as gan  # registers 'gan'
from workshop_dist.models import latent as latent  # registers 'latent' (the encoder inside the step)
from workshop_dist.models import pixelcnn as pixelcnn  # registers 'pixelcnn'
from workshop_dist.models import unet as unet  # registers 'ddpm_unet'
from workshop_dist.models import vae
from workshop_dist.models.base import GenerativeModel
from workshop_dist.models.config import DataSpec, ModelConfiguration
from workshop_dist.models.keys import ExampleKeys
from workshop_dist.models.registry import (
    create_model,
    register_model,
    registered_models,
    resolve_model_class,
)
from workshop_dist.models.vae import VAE, ConvVAE

__all__ = [
    "VAE",
    "ConvVAE",
    "DataSpec",
    "ExampleKeys",
    "GenerativeModel",
    "ModelConfiguration",
    "create_model",
    "register_model",
    "registered_models",
    "resolve_model_class",
    "vae",
]
