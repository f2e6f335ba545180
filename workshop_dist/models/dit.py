"""DiT: the Diffusion Transformer (Peebles & Xie, 2023), on patches of the noisy image.

Patchify -> transformer blocks conditioned by adaLN-Zero on (time + class) embeddings ->
an adaLN final layer -> unpatchify. Attention and MLP weights carry the logical axes
``("embed", "heads")`` / ``("heads", "embed")`` and ``("embed", "mlp")`` / ``("mlp", "embed")``,
so ``mesh.tensor`` shards them Megatron-style (see :mod:`workshop_dist.parallel`). The
objective is ``parameters.objective``: DDPM/VDM (:mod:`workshop_dist.models.diffusion`),
flow matching or EDM (:mod:`workshop_dist.models.objective_model`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pydantic
from flax import nnx

from workshop_dist.config import ConfigError, StrictConfig
from workshop_dist.models import layers
from workshop_dist.models.diffusion import (
    DiffusionParameters,
    register_backbone,
    remat_policy,
    timestep_embedding,
)
from workshop_dist.models.layers import dense, layer_norm


class DiTNetworkParameters(StrictConfig):
    """The transformer's sizes (DiT-S/2 is hidden 384, depth 12, 6 heads)."""

    patch_size: int = pydantic.Field(2, ge=1, description="Side of the square patches (tokens).")
    # each block: attention over the tokens, then an MLP of mlp_ratio x hidden_size
    hidden_size: int = pydantic.Field(128, ge=1, description="Token width.")
    num_heads: int = pydantic.Field(4, ge=1, description="Attention heads.")
    mlp_ratio: float = pydantic.Field(4.0, gt=0, le=64, description="MLP width / token width.")
    depth: int = pydantic.Field(4, ge=1, description="Transformer blocks.")


class DiTParameters(DiffusionParameters, DiTNetworkParameters):
    """The diffusion options plus the transformer's sizes."""


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1.0 + scale) + shift


def sincos_positions(grid: int, dim: int) -> np.ndarray:
    """Fixed 2D sine-cosine position embeddings ``[grid*grid, dim]`` (as in DiT/MAE)."""
    def one_axis(positions: np.ndarray, width: int) -> np.ndarray:
        freqs = 1.0 / 10_000 ** (np.arange(width // 2, dtype=np.float64) / (width // 2))
        angles = positions[:, None] * freqs[None]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    half = dim // 2
    emb = np.concatenate([one_axis(rows.ravel(), half), one_axis(cols.ravel(), dim - half)], axis=1)
    return emb.astype(np.float32)


class DiTBlock(nnx.Module):
    """Pre-norm attention + MLP; adaLN-Zero: shift/scale/gate from the condition, gates start at 0."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, **kw: Any):
        self.heads = heads
        self.norm1, self.norm2 = layer_norm(dim, **kw), layer_norm(dim, **kw)
        self.query = dense(dim, dim, ("embed", "heads"), **kw)
        # no bias on the keys: softmax is invariant to it, so its gradient is exactly zero
        self.key = dense(dim, dim, ("embed", "heads"), use_bias=False, **kw)
        self.value = dense(dim, dim, ("embed", "heads"), **kw)
        self.attn_out = dense(dim, dim, ("heads", "embed"), **kw)
        self.mlp_in = dense(dim, mlp_dim, ("embed", "mlp"), **kw)
        self.mlp_out = dense(mlp_dim, dim, ("mlp", "embed"), **kw)
        self.modulation = dense(dim, 6 * dim, ("embed", "mlp"), zero=True, **kw)

    def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
        batch, tokens, dim = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(self.modulation(nnx.swish(cond))[:, None], 6, -1)
        h = modulate(self.norm1(x), shift1, scale1)
        q, k, v = (layer(h).reshape(batch, tokens, self.heads, -1) for layer in (self.query, self.key, self.value))
        h = jax.nn.dot_product_attention(q, k, v).reshape(batch, tokens, dim)
        x = x + gate1 * self.attn_out(h)
        h = modulate(self.norm2(x), shift2, scale2)
        return x + gate2 * self.mlp_out(nnx.gelu(self.mlp_in(h), approximate=True))


class DiT(nnx.Module):
    """``(z, t, labels) -> out``: the denoising transformer."""

    def __init__(self, hp: DiTNetworkParameters, image_shape: tuple[int, ...], out_features: int, num_classes: int,
                 remat: str, **kw: Any):
        height, width, channels = image_shape
        patch, dim = hp.patch_size, hp.hidden_size
        if height % patch or width % patch or height != width:
            raise ConfigError(f"dit: square images divisible by patch_size={patch} needed, got {height}x{width}")
        if dim % hp.num_heads:
            raise ConfigError(f"dit: hidden_size={dim} is not divisible by num_heads={hp.num_heads}")
        self.patch, self.grid, self.out_features, self.remat = patch, height // patch, out_features, remat
        self.freq_dim = 256
        self.patch_embed = dense(patch * patch * channels, dim, (None, "embed"), **kw)
        self.time = nnx.List([dense(self.freq_dim, dim, (None, "embed"), **kw), dense(dim, dim, ("embed", None), **kw)])
        self.classes = layers.embed(num_classes + 1, dim, **kw) if num_classes else None
        mlp_dim = int(dim * hp.mlp_ratio)
        self.blocks = nnx.List([DiTBlock(dim, hp.num_heads, mlp_dim, **kw) for _ in range(hp.depth)])
        self.final_norm = layer_norm(dim, **kw)
        self.final_modulation = dense(dim, 2 * dim, ("embed", "mlp"), zero=True, **kw)
        self.final = dense(dim, patch * patch * out_features, ("embed", None), zero=True, **kw)

    def __call__(self, z: jax.Array, t: jax.Array, labels: jax.Array | None) -> jax.Array:
        batch, height, width, channels = z.shape
        p, g = self.patch, self.grid
        patches = z.reshape(batch, g, p, g, p, channels).transpose(0, 1, 3, 2, 4, 5).reshape(batch, g * g, -1)
        x = self.patch_embed(patches) + sincos_positions(g, self.patch_embed.out_features)[None]
        cond = self.time[1](nnx.swish(self.time[0](timestep_embedding(t, self.freq_dim))))
        if self.classes is not None:
            cond = cond + self.classes(labels)
        wrap = remat_policy(self.remat)
        for block in self.blocks:
            x = wrap(lambda b, h, c: b(h, c))(block, x, cond) if wrap else block(x, cond)
        shift, scale = jnp.split(self.final_modulation(nnx.swish(cond))[:, None], 2, -1)
        out = self.final(modulate(self.final_norm(x), shift, scale))
        out = out.reshape(batch, g, g, p, p, self.out_features).transpose(0, 1, 3, 2, 4, 5)
        return out.reshape(batch, height, width, self.out_features)


def build_dit(hp: DiTNetworkParameters, image_shape: tuple[int, ...], *args: Any, **kwargs: Any) -> DiT:
    """The DiT for ``image_shape`` (H, W, C)."""
    if len(image_shape) != 3:
        raise ConfigError(f"dit needs input_dim (H, W, C), got {list(image_shape)}")
    return DiT(hp, image_shape, *args, **kwargs)


DiTModel = register_backbone("dit", DiTParameters, DiTNetworkParameters, build_dit)
