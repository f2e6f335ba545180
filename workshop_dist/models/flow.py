"""RealNVP affine coupling flow (Dinh et al., 2017) on dequantised pixel levels.

Discrete levels ``x`` in 0..L-1 become continuous ``v = x + u`` with ``u`` in [0, 1)^D, then
``y = v / L`` in [0, 1), then ``z0 = logit(alpha + (1 - 2 alpha) y)`` (RealNVP's
preprocessing), then affine couplings (checkerboard masks at full resolution, then
checkerboard and channel masks after a 2x2 squeeze) to ``z ~ N(0, I)``. Every step's
log-Jacobian is counted, the ``1/L`` scaling included, so ``log p_V(v)`` is a density over
level space, and ``E_u[log p_V(x + u) - log q(u | x)] <= log P(x)`` bounds the discrete
likelihood. ``u`` is uniform (``q = 1``) or, with ``dequantization: variational``, drawn from
a learned conditional flow ``q(u | x)`` (Ho et al., 2019, Flow++), which tightens the bound.

Batches hold integer levels (``data.normalize: levels``); ``sample`` returns levels as floats.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import pydantic
from flax import nnx

from workshop_dist.config import ConfigError
from workshop_dist.models import layers
from workshop_dist.models.base import GenerativeModel
from workshop_dist.models.config import LevelsParameters, ModelConfiguration, data_levels
from workshop_dist.models.keys import ExampleKeys
from workshop_dist.models.registry import register_model, validate_parameters


class FlowParameters(LevelsParameters):
    network: Literal["conv", "mlp"] = pydantic.Field(
        "conv", description="Coupling networks: conv ResNets, or MLPs on the flattened image (faster on CPU)."
    )
    channels: int = pydantic.Field(64, ge=1, description="Hidden channels (conv) or units (mlp) of each network.")
    num_blocks: int = pydantic.Field(2, ge=0, description="Residual blocks per coupling network.")
    full_couplings: int = pydantic.Field(4, ge=0, description="Checkerboard couplings at full resolution.")
    squeezed_couplings: int = pydantic.Field(
        8, ge=0, description="Couplings after the 2x2 squeeze (checkerboard / channel masks in turn)."
    )
    alpha: float = pydantic.Field(0.05, gt=0, lt=0.5, description="logit(alpha + (1 - 2 alpha) y) preprocessing.")
    dequantization: Literal["uniform", "variational"] = "uniform"
    dequant_couplings: int = pydantic.Field(2, ge=0, description="Conditional couplings of q(u | x).")
    dequant_channels: int = pydantic.Field(16, ge=1, description="Hidden channels of q(u | x)'s conv networks.")


def _checkerboard(height: int, width: int, channels: int, parity: int) -> np.ndarray:
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    board = ((rows + cols) % 2 == parity).astype(np.float32)
    return np.repeat(board[:, :, None], channels, axis=2)


def _channel_mask(height: int, width: int, channels: int, parity: int) -> np.ndarray:
    half = (np.arange(channels) < channels // 2) if parity == 0 else (np.arange(channels) >= channels // 2)
    return np.broadcast_to(half.astype(np.float32), (height, width, channels)).copy()


def _mask(kind: str, shape: tuple[int, int, int]) -> np.ndarray:
    """The static coupling mask: 1 where values pass through unchanged and condition the rest."""
    pattern, parity = kind.split("_")
    return (_checkerboard if pattern == "board" else _channel_mask)(*shape, int(parity))


def squeeze(x: jax.Array) -> jax.Array:
    """``[B, H, W, C] -> [B, H/2, W/2, 4C]`` (each 2x2 block becomes channels)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h // 2, w // 2, 4 * c)


def unsqueeze(x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    return x.reshape(b, h, w, 2, 2, c // 4).transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, c // 4)


class Coupling(nnx.Module):
    """Affine coupling ``z' = m z + (1 - m)(z exp(s) + t)``, with ``s, t`` from a network of ``m z``.

    The network is a conv ResNet (``network="conv"``) or a residual MLP on the flattened image
    (``"mlp"``). ``s = scale * tanh(.)`` keeps the first steps stable; the last layer starts at
    zero, so the flow starts as the identity. ``cond_channels`` adds a conditioning input (q(u | x)).
    """

    def __init__(
        self,
        kind: str,
        shape: tuple[int, int, int],
        channels: int,
        num_blocks: int,
        cond_channels: int = 0,
        network: str = "conv",
        **kw: Any,
    ):
        self.kind = kind
        self.shape = shape
        self.network = network
        features = shape[2]
        if network == "conv":
            self.stem = layers.conv(2 * features + cond_channels, channels, **kw)
            self.blocks = nnx.List(
                [nnx.List([layers.conv(channels, channels, **kw), layers.conv(channels, channels, **kw)])
                 for _ in range(num_blocks)]
            )
            self.out = layers.conv(channels, 2 * features, zero=True, **kw)  # the flow starts as the identity
        else:
            size = math.prod(shape)
            self.stem = layers.dense(2 * size + cond_channels * size // features, channels, ("embed", "mlp"), **kw)
            self.blocks = nnx.List(
                [
                    nnx.List(
                        [
                            layers.dense(channels, channels, ("mlp", "embed"), **kw),
                            layers.dense(channels, channels, ("embed", "mlp"), **kw),
                        ]
                    )
                    for _ in range(num_blocks)
                ]
            )
            self.out = layers.dense(channels, 2 * size, ("mlp", "embed"), zero=True, **kw)
        self.scale = layers.param(
            (features,), ("conv_out",), rngs=kw["rngs"], init=nnx.initializers.ones_init(),
            param_dtype=kw.get("param_dtype", jnp.float32),
        )

    def _shift_scale(self, z: jax.Array, mask: jax.Array, cond: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        inputs = [z * mask, jnp.broadcast_to(mask, z.shape)]
        if cond is not None:
            inputs.append(cond)
        h = jnp.concatenate(inputs, axis=-1)
        if self.network == "mlp":
            h = h.reshape(z.shape[0], -1)
        h = self.stem(h)
        for first, second in self.blocks:
            h = h + second(nnx.relu(first(nnx.relu(h))))
        s, t = jnp.split(self.out(nnx.relu(h)).reshape(*z.shape[:-1], 2 * z.shape[-1]), 2, axis=-1)
        s = self.scale[...] * jnp.tanh(s)
        return s * (1 - mask), t * (1 - mask)

    def __call__(self, z: jax.Array, cond: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Forward (data -> noise): ``(z', log|det|)`` with log-det per example ``[B]``."""
        mask = jnp.asarray(_mask(self.kind, self.shape))
        s, t = self._shift_scale(z, mask, cond)
        return z * jnp.exp(s) + t, s.reshape(z.shape[0], -1).sum(-1)

    def inverse(self, z: jax.Array, cond: jax.Array | None = None) -> jax.Array:
        mask = jnp.asarray(_mask(self.kind, self.shape))
        s, t = self._shift_scale(z, mask, cond)  # depends only on the unchanged (masked) part
        return (z - t) * jnp.exp(-s)


@register_model("flow")
class RealNVP(GenerativeModel):
    """RealNVP on images of integer levels (``input_dim`` = (H, W, C) with even H and W).

    ``config.hidden_dims`` and ``output_dim`` are unused; sizes live in ``parameters``.
    """

    Parameters = FlowParameters
    per_example_keys = True

    def __init__(self, config: ModelConfiguration, *, rngs: nnx.Rngs):
        self.params_config: FlowParameters = validate_parameters(type(self), config)
        p = self.params_config
        self.image_shape = tuple(config.input_dim)
        if len(self.image_shape) != 3 or self.image_shape[0] % 2 or self.image_shape[1] % 2:
            raise ConfigError(f"flow needs input_dim (H, W, C) with even H and W, got {self.image_shape}")
        self.num_levels = data_levels(config, p, "flow")
        kw = {"rngs": rngs, **layers.dtypes(config)}
        height, width, chans = self.image_shape
        full = (height, width, chans)
        small = (height // 2, width // 2, 4 * chans)
        small_kinds = ["board_0", "board_1", "channel_0", "channel_1"]
        self.full = nnx.List(
            [
                Coupling(f"board_{i % 2}", full, p.channels, p.num_blocks, network=p.network, **kw)
                for i in range(p.full_couplings)
            ]
        )
        self.squeezed = nnx.List(
            [
                Coupling(small_kinds[i % 4], small, p.channels, p.num_blocks, network=p.network, **kw)
                for i in range(p.squeezed_couplings)
            ]
        )
        if p.dequantization == "variational":
            hidden = p.dequant_channels
            self.dequant_net = nnx.List([layers.conv(chans, hidden, **kw), layers.conv(hidden, hidden, **kw)])
            self.dequant_affine = layers.conv(hidden, 2 * chans, **kw)
            self.dequant = nnx.List(
                [
                    Coupling(f"board_{i % 2}", full, hidden, 1, cond_channels=hidden, **kw)
                    for i in range(p.dequant_couplings)
                ]
            )

    @property
    def num_dims(self) -> int:
        return math.prod(self.image_shape)

    def forward(self, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Level-space ``v`` in (0, L)^D -> ``(z, log|det dz/dv|)`` per example."""
        p = self.params_config
        y = v / self.num_levels
        s = p.alpha + (1 - 2 * p.alpha) * y
        z = jnp.log(s) - jnp.log1p(-s)
        log_det = (math.log(1 - 2 * p.alpha) - math.log(self.num_levels) - jnp.log(s) - jnp.log1p(-s))
        log_det = log_det.reshape(v.shape[0], -1).sum(-1)
        for layer in self.full:
            z, ld = layer(z)
            log_det = log_det + ld
        z = squeeze(z)
        for layer in self.squeezed:
            z, ld = layer(z)
            log_det = log_det + ld
        return unsqueeze(z), log_det

    def inverse(self, z: jax.Array) -> jax.Array:
        """Noise -> level space (continuous), the inverse of :meth:`forward`."""
        p = self.params_config
        z = squeeze(z)
        for layer in reversed(self.squeezed):
            z = layer.inverse(z)
        z = unsqueeze(z)
        for layer in reversed(self.full):
            z = layer.inverse(z)
        y = (jax.nn.sigmoid(z) - p.alpha) / (1 - 2 * p.alpha)
        return y * self.num_levels

    def log_density(self, v: jax.Array) -> jax.Array:
        """``log p_V(v)``: the flow's density over continuous level space, per example."""
        z, log_det = self.forward(v)
        log_normal = -0.5 * (z**2 + math.log(2 * math.pi))
        return log_normal.reshape(v.shape[0], -1).sum(-1) + log_det

    def dequantize(self, x: jax.Array, rng: jax.Array | ExampleKeys) -> tuple[jax.Array, jax.Array]:
        """Noise ``u`` in (0, 1)^D for levels ``x`` and ``log q(u | x)`` per example (0 when uniform);
        each example's noise comes from its own key."""
        keys = ExampleKeys.of(rng, x.shape[0])
        if self.params_config.dequantization == "uniform":
            return keys.uniform(x.shape[1:]), jnp.zeros(x.shape[0])
        return self.dequantize_noise(x, keys.normal(x.shape[1:]))

    def dequantize_noise(self, x: jax.Array, eps: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Variational dequantisation as a map of Gaussian noise: ``u = sigmoid(g(eps; x))``, ``log q(u | x)``."""
        cond = 2.0 * x / (self.num_levels - 1) - 1.0
        for layer in self.dequant_net:
            cond = nnx.relu(layer(cond))
        mean, log_scale = jnp.split(self.dequant_affine(cond), 2, axis=-1)
        log_q = (-0.5 * (eps**2 + math.log(2 * math.pi))).reshape(x.shape[0], -1).sum(-1)
        h = mean + jnp.exp(log_scale) * eps
        log_q = log_q - log_scale.reshape(x.shape[0], -1).sum(-1)
        for layer in self.dequant:
            h, ld = layer(h, cond)
            log_q = log_q - ld
        # u = sigmoid(h): log|du/dh| = log sigmoid(h) + log sigmoid(-h)
        log_q = log_q - (jax.nn.log_sigmoid(h) + jax.nn.log_sigmoid(-h)).reshape(x.shape[0], -1).sum(-1)
        return jax.nn.sigmoid(h), log_q

    def log_prob_bound(self, x: jax.Array, rng: jax.Array | ExampleKeys) -> jax.Array:
        """One-sample ``log p_V(x + u) - log q(u | x)``: its mean is <= ``log P(x)`` (nats)."""
        u, log_q = self.dequantize(x, rng)
        return self.log_density(x + u) - log_q

    def _levels(self, batch: dict[str, jax.Array]) -> jax.Array:
        x = batch["image"]
        layers.check_images(x, self.image_shape)
        return jnp.clip(jnp.round(x.astype(jnp.float32)), 0, self.num_levels - 1)

    def example_losses(
        self, batch: dict[str, jax.Array], rng: jax.Array | ExampleKeys, *, step: jax.Array | None = None,
        group: str | None = None,
    ) -> dict[str, jax.Array]:
        """Per-example dequantisation bound on the discrete NLL (nats per image), and bits/dim."""
        loss = -self.log_prob_bound(self._levels(batch), rng)
        return {"loss": loss, "bits_per_dim": loss / (self.num_dims * math.log(2.0))}

    def nll(self, batch: dict[str, jax.Array], rng: jax.Array, **options: Any) -> jax.Array:
        """``-log mean_k exp(bound_k)`` over ``num_samples`` dequantisations (default 16), ``[B]``.

        With K samples this is the importance-weighted bound ``-log E_q[mean_k P_V / q]``: an upper
        bound on the discrete NLL that tightens with K (uniform: K=1 is the plain bound).
        """
        num_samples = int(options.get("num_samples", 16))
        x = self._levels(batch)
        bounds = jax.vmap(lambda key: self.log_prob_bound(x, key))(jax.random.split(rng, num_samples))
        return -(jax.nn.logsumexp(bounds, axis=0) - math.log(num_samples))

    def sample(self, rng: jax.Array, num_samples: int, *, labels: jax.Array | None = None, **options: Any) -> jax.Array:
        """``[N, H, W, C]`` levels as floats: ``floor`` of the inverse flow of Gaussian noise.

        ``temperature`` (option, default 1) scales the noise.
        """
        z = options.get("temperature", 1.0) * jax.random.normal(rng, (num_samples, *self.image_shape))
        v = self.inverse(z)
        return jnp.clip(jnp.floor(v), 0, self.num_levels - 1)
