"""How the engine rebuilds and calls a model inside a traced function, and the model contract's check."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from workshop_dist.config import WorkshopError
from workshop_dist.models import layers
from workshop_dist.models.base import GenerativeModel, mean_losses
from workshop_dist.models.keys import ExampleKeys

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class ModelCalls:
    """How to rebuild and call the model inside a traced function.

    ``key_paths`` are the model-state leaves that hold typed PRNG keys (``nnx.Rngs``): the state
    stores them as raw key data (placeable, checkpointable) and they are re-wrapped here.
    ``example_sharding`` (the batch's sharding of the example axis) keeps per-example keys split
    like the batch.
    """

    graphdef: nnx.GraphDef
    key_paths: Mapping[tuple, Any] = dataclasses.field(default_factory=dict)  # path -> key impl
    loss_kwargs: frozenset[str] = frozenset()  # which of step/group the training method takes
    per_example: bool = True  # the model has example_losses (else: a loss-only model)
    own_loss: bool = False  # training calls model.loss (else: the mean of example_losses)
    per_example_keys: bool = False  # the model takes ExampleKeys (one key per example) as rng
    example_sharding: Any = None

    @classmethod
    def for_model(
        cls, model: nnx.Module, graphdef: nnx.GraphDef, model_state: Any, compute_dtype: Any = None, *,
        batch_sharding: Any = None,
    ) -> ModelCalls:
        """``compute_dtype`` (from the deprecated ``training.precision``) is only checked: a model
        computes in the dtype it was built with (``model.dtype``)."""
        kind = type(model)
        per_example, own_loss = check_contract(kind)
        if compute_dtype is not None:
            layers.check_compute_dtype(model, compute_dtype)
        keys = {
            path: _key_impl(leaf)
            for path, leaf in _leaves(model_state)
            if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key)
        }
        method = kind.loss if own_loss else kind.example_losses
        params = inspect.signature(method).parameters
        has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        kwargs = frozenset(k for k in ("step", "group") if k in params or has_var_kw)
        per_example_keys = bool(getattr(kind, "per_example_keys", False))
        return cls(graphdef, keys, kwargs, per_example, own_loss, per_example_keys, batch_sharding)

    def storable(self, model_state: Any) -> Any:
        """Typed keys -> raw key data."""
        return _map_paths(model_state, self.key_paths, lambda leaf, _: jax.random.key_data(leaf))

    def merge(self, params: Any, model_state: Any, *, training: bool | None, rng: jax.Array | None = None) -> nnx.Module:
        """The model with ``params``, in training or evaluation mode (None: as built), its Rngs reseeded from ``rng``.

        The model computes in the dtype its layers were built with: nothing is cast here.
        """
        state = _map_paths(model_state, self.key_paths, lambda data, impl: jax.random.wrap_key_data(data, impl=impl))
        model = nnx.merge(self.graphdef, params, state)
        if training is not None:
            model.train() if training else model.eval()
        if rng is not None and self.key_paths:
            streams = [node for _, node in nnx.iter_graph(model) if isinstance(node, nnx.RngStream)]
            for index, stream in enumerate(streams):  # streams derived from the run's key and step
                impl = jax.random.key_impl(stream.key.get_value())
                stream.key.set_value(jax.random.wrap_key_data(jax.random.fold_in(rng, index), impl=impl))
                stream.count.set_value(jnp.zeros_like(stream.count.get_value()))
        return model

    def model_state(self, model: nnx.Module) -> Any:
        return self.storable(nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param))))

    def example_keys(self, rng: jax.Array, positions: jax.Array) -> ExampleKeys:
        """``fold_in(rng, p)`` for each example's global position ``p``, sharded like the batch."""
        return ExampleKeys.at_positions(rng, positions, self.example_sharding)

    def constrain(self, keys: jax.Array) -> ExampleKeys:
        if self.example_sharding is not None:
            keys = jax.lax.with_sharding_constraint(keys, self.example_sharding)
        return ExampleKeys(keys)

    def loss(self, model: nnx.Module, batch: Batch, rng: Any, step: jax.Array | None, group: str | None):
        """The training objective: ``model.loss``, or the mean of ``example_losses`` (one reduction)."""
        kwargs = {k: v for k, v in {"step": step, "group": group}.items() if k in self.loss_kwargs}
        if self.own_loss:
            loss, metrics = model.loss(batch, rng, **kwargs)
        else:
            loss, metrics = mean_losses(model.example_losses(batch, rng, **kwargs))
        return jnp.asarray(loss, jnp.float32), metrics


def check_contract(kind: type) -> tuple[bool, bool]:
    """``(has example_losses, overrides loss)``; one WorkshopError naming what a model lacks."""
    def defined(name: str) -> bool:
        method = getattr(kind, name, None)
        return callable(method) and method is not getattr(GenerativeModel, name)

    per_example, own_loss = defined("example_losses"), defined("loss")
    missing = []
    if not (per_example or own_loss):
        missing.append("example_losses(batch, rng, *, step=None, group=None) -> {'loss': [B], ...} "
                       "(or loss(batch, rng) -> (loss, metrics))")
    if not defined("sample"):
        missing.append("sample(rng, num_samples, *, labels=None, **options) -> samples")
    if missing:
        raise WorkshopError(
            f"{kind.__name__} does not follow the model contract: define {' and '.join(missing)}. "
            "See workshop_dist.models.base (subclassing workshop_dist.models.GenerativeModel helps)."
        )
    return per_example, own_loss


def _key_impl(leaf: Any) -> Any:
    """The PRNG implementation of a typed key array (or of its abstract shape), through public APIs only."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        found: list[Any] = []
        jax.eval_shape(lambda key: found.append(jax.random.key_impl(key)) or key, leaf)
        return found[0]
    return jax.random.key_impl(leaf)


def _leaves(tree: Any) -> list[tuple[tuple, Any]]:
    return [(tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path), leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def _map_paths(tree: Any, paths: Mapping[tuple, Any], fn: Callable[[Any, Any], Any]) -> Any:
    if not paths:
        return tree

    def one(path: tuple, leaf: Any) -> Any:
        name = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        return fn(leaf, paths[name]) if name in paths else leaf

    return jax.tree_util.tree_map_with_path(one, tree)
