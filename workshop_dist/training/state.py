"""The training state: one PyTree holding everything a resumed run needs."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

_FIELDS = ("step", "params", "opt_state", "rng", "best_loss", "model_state")


@struct.dataclass
class TrainingState:
    """params, opt_state, rng, step and best_loss (plus non-trainable model variables).

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
    ) -> TrainingState:
        return cls(
            step=jnp.asarray(step, jnp.int32),
            params=params,
            opt_state=opt_state,
            rng=rng,
            best_loss=jnp.asarray(best_loss, jnp.float32),
            model_state={} if model_state is None else model_state,
        )

    def __getitem__(self, key: str) -> Any:
        if key not in _FIELDS:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in _FIELDS else default

    def keys(self) -> tuple[str, ...]:
        return _FIELDS
