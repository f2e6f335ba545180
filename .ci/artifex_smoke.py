"""Smoke check that workshop_dist and avitai-artifex work side by side in one environment.

Run after ``pip install . avitai-artifex`` (Python >= 3.12): builds and samples an artifex
VAE, then trains a workshop_dist VAE for 20 steps from numpy arrays, and the packaged
default config (digits through TFDS and Grain) for 20 steps with ``workshop-train``; metrics
go to TensorBoard event files.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
from artifex.generative_models.core.configuration.network_configs import DecoderConfig, EncoderConfig
from artifex.generative_models.core.configuration.vae_config import VAEConfig
from artifex.generative_models.models.vae.base import VAE
from flax import nnx

from workshop_dist import ModelConfiguration, Trainer, TrainingConfiguration, create_model
from workshop_dist.data.digits import load_digits_split

encoder = EncoderConfig(name="enc", input_shape=(8, 8, 1), latent_dim=4, hidden_dims=(32,), activation="relu")
decoder = DecoderConfig(
    name="dec", latent_dim=4, output_shape=(8, 8, 1), hidden_dims=(32,), activation="relu"
)
artifex_vae = VAE(
    VAEConfig(name="vae", encoder=encoder, decoder=decoder, encoder_type="dense"), rngs=nnx.Rngs(0)
)
assert artifex_vae.sample(2).shape == (2, 8, 8, 1)

train = load_digits_split("train")["image"].astype(np.float32) / 16
model = create_model(
    ModelConfiguration(model_class="vae", input_dim=(8, 8, 1), hidden_dims=[64, 32], output_dim=8),
    rngs=nnx.Rngs(0),
)
workdir = Path(tempfile.mkdtemp())
config = TrainingConfiguration(name="smoke", batch_size=64, num_epochs=2, max_steps=20, log_frequency=5)
trainer = Trainer(model, config, train_data_loader=train, workdir=workdir)
trainer.fit()
trainer.close()
assert int(trainer.state["step"]) == 20, trainer.state["step"]
events = list((workdir / "logs").glob("events.out.tfevents.*"))
assert events, "no TensorBoard event file"
assert "tensorflow" not in sys.modules, "TensorFlow was imported"
cli_workdir = workdir / "cli"
env_data = ["data.data_dir=" + str(workdir / "data")]
subprocess.run(
    [
        sys.executable,
        "-m",
        "workshop_dist.cli",
        "--workdir",
        str(cli_workdir),
        "training.max_steps=20",
        "training.scheduler.warmup_steps=5",
        *env_data,
    ],
    check=True,
)
assert (cli_workdir / "checkpoints" / "20").is_dir(), sorted(
    p.name for p in (cli_workdir / "checkpoints").iterdir()
)
print(f"ok: jax {jax.__version__}, 20 steps from arrays and 20 with workshop-train, events {events[0].name}")
