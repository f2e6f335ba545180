"""The original design's "Complete Training Example", run on the built-in digits.

Everything below the marked line is the original example verbatim, with only its import paths
changed to ``workshop_dist`` (``model_class`` names our VAE by its dotted path). The original
leaves ``train_loader``, ``val_loader`` and ``val_data`` to the reader; they are defined here
first: scikit-learn's 8x8 digits, scaled 3x and padded to the 28x28x1 images the example's
model expects.

    python examples/seed_complete_example.py
"""

import numpy as np
from sklearn.datasets import load_digits


def digits_28x28() -> np.ndarray:
    images = load_digits().images.astype(np.float32) / 16.0  # [1797, 8, 8] in [0, 1]
    images = np.kron(images, np.ones((1, 3, 3), np.float32))  # 24 x 24
    return np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None]  # 28 x 28 x 1


_images = digits_28x28()
_train, val_data = _images[:1000], _images[1000:1350]


def train_loader(batch_size):
    """A seed-style loader: called once per epoch, returns that epoch's batches."""
    order = np.random.default_rng(len(_train)).permutation(len(_train))
    return [{"image": _train[order[i : i + batch_size]]} for i in range(0, len(order) - batch_size + 1, batch_size)]


def val_loader(batch_size):
    return [{"image": val_data[i : i + batch_size]} for i in range(0, len(val_data), batch_size)]


if __name__ != "__main__":
    raise SystemExit("run this file as a script")

# ---- the original example, import paths changed to workshop_dist --------------------------

from workshop_dist import (  # noqa: E402
    ModelConfiguration,
    TrainingConfiguration,
    OptimizerConfiguration,
    SchedulerConfiguration,
)
from workshop_dist import create_model  # noqa: E402
from workshop_dist import Trainer  # noqa: E402
from flax import nnx  # noqa: E402

# 1. Create model configuration
model_config = ModelConfiguration(
    name="vae_mnist",
    model_class="workshop_dist.models.vae.VAE",
    input_dim=(28, 28, 1),
    hidden_dims=[512, 256],
    output_dim=64,
    parameters={"beta": 1.0},
)

# 2. Initialize model
rngs = nnx.Rngs(42)
model = create_model(config=model_config, rngs=rngs)

# 3. Configure optimizer
optimizer_config = OptimizerConfiguration(
    name="adamw",
    optimizer_type="adamw",
    learning_rate=3e-4,
    weight_decay=0.01,
    gradient_clip_norm=1.0,
)

# 4. Configure learning rate schedule
scheduler_config = SchedulerConfiguration(
    name="cosine_warmup",
    scheduler_type="cosine",
    warmup_steps=1000,
    cycle_length=50000,
    min_lr_ratio=0.1,
)

# 5. Create training configuration
training_config = TrainingConfiguration(
    name="vae_training",
    batch_size=128,
    num_epochs=100,
    optimizer=optimizer_config,
    scheduler=scheduler_config,
    save_frequency=5000,
    log_frequency=100,
    checkpoint_dir="./checkpoints/vae",
)

# 6. Initialize trainer
trainer = Trainer(
    model=model,
    training_config=training_config,
    train_data_loader=train_loader,
    val_data_loader=val_loader,
    workdir="./experiments/vae",
)

# 7. Train
for epoch in range(training_config.num_epochs):
    # Train epoch
    train_metrics = trainer.train_epoch()
    print(f"Epoch {epoch + 1}: Train Loss = {train_metrics['loss']:.4f}")

    # Validate
    val_metrics = trainer.evaluate(val_data, batch_size=128)
    print(f"Epoch {epoch + 1}: Val Loss = {val_metrics['loss']:.4f}")

    # Save best model
    if val_metrics['loss'] < trainer.state.get('best_loss', float('inf')):
        trainer.save_checkpoint(f"./checkpoints/vae/best_model.pkl")

# 8. Generate samples
samples = trainer.generate_samples(num_samples=16)
