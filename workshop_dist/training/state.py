"""The training state: one PyTree holding everything a resumed run needs."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

_FIELDS = ("step", "params", "opt_state", "rng", "best_loss", "model_state", "ema_params", "ema_profiles")


@struct.dataclass
class TrainingState:
    """params, opt_state, rng, step and best_loss, plus non-trainable model variables and the EMA.

    ``opt_state`` is one optax state, or ``{group: state}`` for models with parameter groups.
    ``ema_params`` is None when EMA is off (no copy in memory or in checkpoints); ``ema_profiles``
    (``{name: params}``, None when there are none) holds the other averages: further EMA decays and
    the post-hoc EMA's power-function profiles (``training.ema``). Typed PRNG
    keys a model keeps (``nnx.Rngs``) are stored in ``model_state`` as raw key data.

    ``rng`` is the run's base key: the key of step ``s`` is ``fold_in(rng, s)``, so a resumed
    run draws exactly the random numbers an uninterrupted one would. Dict-style access
    (``state["step"]``, ``state.get("best_loss")``) works as in the original design.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    best_loss: jax.Array
    model_state: Any = struct.field(default_factory=dict)
    ema_params: Any = None
    ema_profiles: Any = None

    @classmethod
    def create(
        cls,
        *,
        params: Any,
        opt_state: Any,
        rng: jax.Array,
        step: int = 0,
        best_loss: float = float("inf"),
        model_state: Any = None,
        ema_params: Any = None,
        ema_profiles: Any = None,
    ) -> TrainingState:
        return cls(
            step=jnp.asarray(step, jnp.int32),
            params=params,
            opt_state=opt_state,
            rng=rng,
            best_loss=jnp.asarray(best_loss, jnp.float32),
            model_state={} if model_state is None else model_state,
            ema_params=ema_params,
            ema_profiles=ema_profiles,
        )

    def __getitem__(self, key: str) -> Any:
        if key not in _FIELDS:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in _FIELDS else default

    def keys(self) -> tuple[str, ...]:
        return _FIELDS
