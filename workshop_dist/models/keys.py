"""Per-example randomness: one PRNG key per example, so an example's noise follows the example.

The engine derives example ``i``'s key as ``fold_in(step_key, i)`` from the run key, the step and
``i``, the example's position in the global batch (in evaluation: its position in the pass).
A micro-batch of ``grad_accum_steps``, a differently sharded mesh or a padded evaluation batch
then hands every example exactly the key it has in the full batch, so the results do not depend
on them (up to floating-point reduction order). A model opts in with
``per_example_keys = True`` (see :mod:`workshop_dist.models.base`) and receives an
:class:`ExampleKeys` as ``rng``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp


def _typed(keys: jax.Array) -> jax.Array:
    """Typed key array (``jax.random.key``); raw ``uint32[..., 2]`` keys (``PRNGKey``) are wrapped."""
    if jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
        return keys
    return jax.random.wrap_key_data(keys)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExampleKeys:
    """Keys ``[B]``, one per example, and draws that give every example its own noise.

    Every draw returns an array with a leading example axis: ``keys.normal((16,))`` is ``[B, 16]``.
    :meth:`split` gives independent streams (e.g. one for time, one for noise). Because each
    example's values depend only on its own key, slicing the examples (micro-batches, shards)
    slices the noise identically.
    """

    keys: jax.Array  # typed PRNG keys, shape [B]

    @classmethod
    def of(cls, rng: jax.Array | ExampleKeys, batch_size: int) -> ExampleKeys:
        """``rng`` as per-example keys: itself if it already is, else ``fold_in(rng, i)`` for example ``i``.

        Lets a model's methods take either: a single key (a hand-written loop, a test) or the
        engine's per-example keys.
        """
        if isinstance(rng, ExampleKeys):
            if len(rng) != batch_size:
                raise ValueError(f"{len(rng)} example keys for a batch of {batch_size}")
            return rng
        key = _typed(jnp.asarray(rng))
        if key.shape == (batch_size,):
            return cls(key)
        if key.shape != ():
            raise ValueError(f"rng must be one key or {batch_size} keys, got key shape {key.shape}")
        return cls.at_positions(key, jnp.arange(batch_size, dtype=jnp.uint32))

    @classmethod
    def at_positions(cls, rng: jax.Array, positions: jax.Array, sharding: Any = None) -> ExampleKeys:
        """Keys ``fold_in(rng, p)`` for each global position ``p`` in ``positions`` (``[B]``).

        ``sharding`` (a NamedSharding of the example axis) keeps the keys split like the batch,
        so each device derives only its examples' keys.
        """
        key = _typed(jnp.asarray(rng))
        keys = jax.vmap(lambda p: jax.random.fold_in(key, p))(positions.astype(jnp.uint32))
        if sharding is not None:
            keys = jax.lax.with_sharding_constraint(keys, sharding)
        return cls(keys)

    def __len__(self) -> int:
        return self.keys.shape[0]

    def map(self, draw: Callable[[jax.Array], Any]) -> Any:
        """``draw(key)`` for each example's key, stacked on a leading axis (any custom per-example draw)."""
        return jax.vmap(draw)(self.keys)

    def split(self, num: int) -> tuple[ExampleKeys, ...]:
        """``num`` independent per-example streams."""
        keys = self.map(lambda key: jax.random.split(key, num))  # [B, num]
        return tuple(ExampleKeys(keys[:, i]) for i in range(num))

    def fold_in(self, data: int | jax.Array) -> ExampleKeys:
        """A stream named by ``data`` (e.g. a layer index)."""
        return ExampleKeys(self.map(lambda key: jax.random.fold_in(key, data)))

    def normal(self, shape: Sequence[int] = (), dtype: Any = jnp.float32) -> jax.Array:
        return self.map(lambda key: jax.random.normal(key, tuple(shape), dtype))

    def uniform(
        self, shape: Sequence[int] = (), dtype: Any = jnp.float32, minval: float = 0.0, maxval: float = 1.0
    ) -> jax.Array:
        return self.map(lambda key: jax.random.uniform(key, tuple(shape), dtype, minval, maxval))

    def bernoulli(self, p: float | jax.Array, shape: Sequence[int] = ()) -> jax.Array:
        """Booleans ``[B, *shape]``, true with probability ``p``."""
        return self.map(lambda key: jax.random.bernoulli(key, p, tuple(shape)))

    def randint(self, minval: int, maxval: int, shape: Sequence[int] = (), dtype: Any = jnp.int32) -> jax.Array:
        return self.map(lambda key: jax.random.randint(key, tuple(shape), minval, maxval, dtype))

    def categorical(self, logits: jax.Array, axis: int = -1) -> jax.Array:
        """One draw per example from ``logits`` ``[B, ..., K]`` (``axis`` counted within one example)."""
        return jax.vmap(lambda key, example: jax.random.categorical(key, example, axis=axis))(self.keys, logits)
