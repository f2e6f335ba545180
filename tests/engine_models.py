"""Small models that exercise the engine's contract (importable by dotted path from subprocesses)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from workshop_dist.models import GenerativeModel, ModelConfiguration, layers


class TanhModel(GenerativeModel):
    """Deterministic per-example loss ||tanh(x W + b) - x||^2: accumulation must match the full batch exactly."""

    def __init__(self, config: ModelConfiguration, *, rngs: nnx.Rngs):
        self.size = int(jnp.prod(jnp.array(config.input_dim)))
        self.layer = layers.dense(self.size, self.size, ("embed", "mlp"), rngs=rngs)

    def example_losses(self, batch, rng, *, step=None, group=None):
        x = batch["image"].reshape(batch["image"].shape[0], -1).astype(jnp.float32)
        error = ((jnp.tanh(self.layer(x)) - x) ** 2).sum(-1)
        return {"loss": error, "abs_mean": jnp.abs(x).mean(-1)}

    def sample(self, rng, num_samples, *, labels=None, **options):
        return jnp.zeros((num_samples, self.size))


class TwoGroupModel(GenerativeModel):
    """Two parameter groups with separate losses, like a GAN: ``d`` pulls toward 1, ``g`` toward 2 x d."""

    param_groups = {"generator": "generator", "discriminator": "discriminator"}  # noqa: RUF012
    update_order = ("discriminator", "discriminator", "generator")

    def __init__(self, config: ModelConfiguration, *, rngs: nnx.Rngs):
        self.generator = nnx.Param(jnp.zeros((4,)))
        self.discriminator = nnx.Param(jnp.zeros((4,)))

    def example_losses(self, batch, rng, *, step=None, group=None):
        n = batch["image"].shape[0]
        d_loss = jnp.full((n,), ((self.discriminator[...] - 1.0) ** 2).sum())
        g_loss = jnp.full((n,), ((self.generator[...] - 2.0 * self.discriminator[...]) ** 2).sum())
        if group == "discriminator":
            return {"loss": d_loss}
        if group == "generator":
            return {"loss": g_loss}
        return {"loss": d_loss + g_loss, "d_loss": d_loss, "g_loss": g_loss}

    def sample(self, rng, num_samples, *, labels=None, **options):
        return jnp.broadcast_to(self.generator[...].reshape(2, 2, 1), (num_samples, 2, 2, 1))


class DropoutModel(GenerativeModel):
    """Keeps its own ``nnx.Rngs`` (dropout) and a BatchNorm, as outside libraries' models do."""

    def __init__(self, config: ModelConfiguration, *, rngs: nnx.Rngs):
        size = 64
        self.dense = layers.dense(size, 32, ("embed", "mlp"), rngs=rngs)
        self.norm = nnx.BatchNorm(32, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.out = layers.dense(32, size, ("mlp", "embed"), rngs=rngs)
        self.rngs = rngs  # an nnx.Rngs attribute, kept as is
        self.calls = nnx.BatchStat(jnp.zeros((), jnp.int32))  # state updated inside the loss

    def encode(self, x):
        return self.norm(self.dense(x.reshape(x.shape[0], -1)))

    def example_losses(self, batch, rng, *, step=None, group=None):
        x = batch["image"].reshape(batch["image"].shape[0], -1).astype(jnp.float32)
        h = self.dropout(nnx.relu(self.encode(x)))
        noise = jax.random.normal(self.rngs.noise(), ()) * 0.0  # draws from the model's own stream
        self.calls[...] += 1
        return {"loss": ((self.out(h) - x) ** 2).sum(-1) + noise}

    def sample(self, rng, num_samples, *, labels=None, **options):
        return jax.random.uniform(self.rngs.noise(), (num_samples, 64))


class LabelModel(GenerativeModel):
    """Conditional: uses ``label`` and the step; samples are filled with their label (or the guidance scale)."""

    num_classes = 10

    def __init__(self, config: ModelConfiguration, *, rngs: nnx.Rngs):
        self.w = nnx.Param(jnp.zeros(()))

    def example_losses(self, batch, rng, *, step=None, group=None):
        label = batch["label"].astype(jnp.float32)
        seen_step = jnp.zeros_like(label) if step is None else jnp.full_like(label, step)
        return {"loss": (self.w[...] - label) ** 2, "label": label, "step": seen_step}

    def sample(self, rng, num_samples, *, labels=None, guidance_scale=0.0, **options):
        fill = jnp.zeros(num_samples) if labels is None else labels.astype(jnp.float32)
        return jnp.broadcast_to((fill + guidance_scale)[:, None, None, None], (num_samples, 2, 2, 1))


class RngsLossOnlyModel(nnx.Module):
    """The older contract as outside libraries write it: only ``loss`` and ``sample``, its own ``nnx.Rngs``
    and an ``nnx.Dropout`` (no GenerativeModel base, no example_losses)."""

    def __init__(self, config: ModelConfiguration, *, rngs: nnx.Rngs):
        self.dense = layers.dense(64, 16, ("embed", "mlp"), rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.out = layers.dense(16, 64, ("mlp", "embed"), rngs=rngs)
        self.rngs = rngs

    def reconstruct(self, x):
        return self.out(self.dropout(nnx.relu(self.dense(x.reshape(x.shape[0], -1)))))

    def loss(self, batch, rng):
        x = batch["image"].reshape(batch["image"].shape[0], -1).astype(jnp.float32)
        error = ((self.reconstruct(x) - x) ** 2).sum(-1)
        return error.mean(), {"max_error": error.max()}

    def sample(self, rng, num_samples):
        return jax.random.uniform(self.rngs.noise(), (num_samples, 64))
