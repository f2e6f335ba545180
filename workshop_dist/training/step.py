"""Pure step functions (no I/O): jitted once by the trainer with explicit shardings."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from workshop_dist.training.state import TrainingState

Metrics = dict[str, jax.Array]
# Distinct streams derived from the base key, so evaluation never reuses a training key.
EVAL_STREAM = 0x7FFF_FFFF
SAMPLE_STREAM = 0x7FFF_FFFE


def make_train_step(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: optax.Schedule, *, skip_nonfinite: bool = False
) -> Callable[[TrainingState, dict[str, jax.Array]], tuple[TrainingState, Metrics]]:
    """One optimizer step; reports ``nonfinite=1`` when the loss or gradient is NaN/Inf.

    With ``skip_nonfinite`` such an update is skipped (params, opt_state and model_state stay
    as they were). Without it the step stays as lean as a hand-written one: the trainer reads
    ``nonfinite`` before any checkpoint or evaluation and stops, so a broken state is never saved.
    """

    def train_step(state: TrainingState, batch: dict[str, jax.Array]) -> tuple[TrainingState, Metrics]:
        rng = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params: Any) -> tuple[jax.Array, tuple[Metrics, Any]]:
            model = nnx.merge(graphdef, params, state.model_state)
            loss, metrics = model.loss(batch, rng)
            return loss, (metrics, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param))))

        (loss, (metrics, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply(_: None) -> tuple[Any, Any, Any]:
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            return optax.apply_updates(state.params, updates), opt_state, model_state

        if skip_nonfinite:  # lax.cond runs one branch: no extra pass over the state when finite
            keep = lambda _: (state.params, state.opt_state, state.model_state)  # noqa: E731
            params, opt_state, model_state = jax.lax.cond(finite, apply, keep, None)
        else:
            params, opt_state, model_state = apply(None)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state)
        metrics = {
            **metrics,
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
            "nonfinite": 1.0 - finite.astype(jnp.float32),
        }
        return new_state, {key: jnp.asarray(value, jnp.float32) for key, value in metrics.items()}

    return train_step


def make_loop_step(
    train_step: Callable[[TrainingState, dict[str, jax.Array]], tuple[TrainingState, Metrics]],
    metric_names: list[str],
) -> Callable[[tuple, jax.Array, dict[str, jax.Array]], tuple[tuple, jax.Array]]:
    """The training loop's form of ``train_step``: the same computation, fewer arrays in and out.

    Dispatch cost grows with the number of arrays crossing the jit boundary (times the number
    of devices), so only what a step changes (step, params, opt_state, model_state) is passed
    in and returned (and donated), the rng is a read-only input, and the metrics come back
    as one vector ordered like ``metric_names``.
    """

    def loop_step(carry: tuple, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[tuple, jax.Array]:
        step, params, opt_state, model_state = carry
        state = TrainingState(step, params, opt_state, rng, jnp.zeros((), jnp.float32), model_state)
        new, metrics = train_step(state, batch)
        carry = (new.step, new.params, new.opt_state, new.model_state)
        return carry, jnp.stack([metrics[name] for name in metric_names])

    return loop_step


def make_eval_sums(graphdef: nnx.GraphDef) -> Callable[[TrainingState, dict[str, jax.Array], jax.Array], Metrics]:
    """Masked per-example sums of the loss and every model metric over one batch.

    Each example is scored alone (``vmap`` over a batch of one), so padding examples
    (``mask == 0``) never influence real ones and every real example counts exactly once.
    ``batch_index`` gives every batch of a pass its own random keys.
    """

    def eval_sums(state: TrainingState, batch: dict[str, jax.Array], batch_index: jax.Array) -> Metrics:
        mask = batch["mask"].astype(jnp.float32)
        examples = {key: value for key, value in batch.items() if key != "mask"}
        model = nnx.merge(graphdef, state.params, state.model_state)
        pass_key = jax.random.fold_in(jax.random.fold_in(state.rng, EVAL_STREAM), batch_index)
        keys = jax.random.split(pass_key, mask.shape[0])

        def one(example: dict[str, jax.Array], key: jax.Array) -> Metrics:
            loss, metrics = model.loss(jax.tree.map(lambda x: x[None], example), key)
            return {**metrics, "loss": loss}

        per_example = jax.vmap(one)(examples, keys)
        sums = {key: jnp.sum(jnp.asarray(value, jnp.float32) * mask) for key, value in per_example.items()}
        sums["num_examples"] = jnp.sum(mask)
        return sums

    return eval_sums


def make_eval_step(graphdef: nnx.GraphDef) -> Callable[[TrainingState, dict[str, jax.Array], Metrics], Metrics]:
    """``totals + eval_sums(batch)``: accumulates on device, read once after the pass."""
    eval_sums = make_eval_sums(graphdef)

    def eval_step(state: TrainingState, batch: dict[str, jax.Array], totals: Metrics) -> Metrics:
        sums = eval_sums(state, batch, totals["num_batches"].astype(jnp.int32))
        sums["num_batches"] = jnp.ones((), jnp.float32)
        return {key: totals[key] + value for key, value in sums.items()}

    return eval_step


def make_sample_fn(graphdef: nnx.GraphDef) -> Callable[[Any, Any, jax.Array, int], jax.Array]:
    def sample(params: Any, model_state: Any, rng: jax.Array, num_samples: int) -> jax.Array:
        return nnx.merge(graphdef, params, model_state).sample(rng, num_samples)

    return sample
