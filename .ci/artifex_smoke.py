"""Smoke check that workshop_dist and avitai-artifex work side by side in one environment.

Run after ``pip install ".[test,artifex]"`` (Python >= 3.12), before
``tests/test_artifex.py`` (the adapter's train/evaluate/sample/resume tests): trains a
workshop_dist VAE for 20 steps from numpy arrays (metrics to TensorBoard event files, no
TensorFlow imported), then, with ``workshop-train`` on digits through TFDS and Grain, the
packaged default config for 20 steps and artifex's VAE (``model.model_class=artifex_vae``) for 10.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
from artifex.generative_models.models.vae.base import VAE
from flax import nnx

from workshop_dist import ModelConfiguration, Trainer, TrainingConfiguration, create_model
from workshop_dist.data.digits import load_digits_split

train = load_digits_split("train")["image"].astype(np.float32) / 16
model = create_model(
    ModelConfiguration(model_class="vae", input_dim=(8, 8, 1), hidden_dims=[64, 32], output_dim=8),
    rngs=nnx.Rngs(0),
)
workdir = Path(tempfile.mkdtemp())
config = TrainingConfiguration(name="smoke", batch_size=64, num_epochs=2, length={"max_steps": 20}, cadence={"log_every": 5})
trainer = Trainer(model, config, train_data_loader=train, workdir=workdir)
trainer.fit()
trainer.close()
assert int(trainer.state["step"]) == 20, trainer.state["step"]
events = list((workdir / "logs").glob("events.out.tfevents.*"))
assert events, "no TensorBoard event file"
assert "tensorflow" not in sys.modules, "TensorFlow was imported"
data = "data.data_dir=" + str(workdir / "data")
runs = {"cli": (20, []), "cli-artifex": (10, ["model.model_class=artifex_vae", "model.parameters={kl_weight: 1.0}"])}
for name, (steps, overrides) in runs.items():
    cli_workdir = workdir / name
    command = ["-m", "workshop_dist.cli", "--workdir", str(cli_workdir), f"training.length.max_steps={steps}"]
    subprocess.run([sys.executable, *command, "training.scheduler.warmup_steps=5", data, *overrides], check=True)
    saved = sorted(p.name for p in (cli_workdir / "checkpoints").iterdir())
    assert str(steps) in saved, (name, saved)
built = create_model(ModelConfiguration(model_class="artifex_vae"), rngs=nnx.Rngs(0))
assert isinstance(built.model, VAE), type(built.model)
print(f"ok: jax {jax.__version__}, 20 steps from arrays, 20 with workshop-train and 10 of artifex's VAE, "
      f"events {events[0].name}")
