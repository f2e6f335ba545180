"""Pure step functions (no I/O): the one training step, its n-steps-per-call form, evaluation and sampling.

The training step takes one optimizer update per entry of ``update_order`` (one group for most
models; e.g. discriminator then generator for a GAN), each on ``accum_steps`` micro-batches,
then updates the EMA. Everything here is traced once by :mod:`workshop_dist.training.engine`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from workshop_dist.training import posthoc_ema
from workshop_dist.training.calls import ModelCalls
from workshop_dist.training.frozen import Frozen
from workshop_dist.training.state import TrainingState

Metrics = dict[str, jax.Array]
Batch = dict[str, jax.Array]
# Distinct streams derived from the base key, so evaluation never reuses a training key.
EVAL_STREAM = 0x7FFF_FFFF
SAMPLE_STREAM = 0x7FFF_FFFE
MODEL_RNG_STREAM = 0x7FFF_FFFD
SINGLE = "model"  # the group name of a model without parameter groups


@dataclasses.dataclass(frozen=True)
class UpdateRule:
    """The optimizers and what a step does with them."""

    optimizers: Mapping[str, optax.GradientTransformation]  # group -> transformation
    schedules: Mapping[str, optax.Schedule]
    group_keys: Mapping[str, str] | None  # group -> top-level params key; None: one group, all params
    update_order: tuple[str, ...] = (SINGLE,)
    accum_steps: int = 1
    ema_decay: float | None = None
    ema_start_step: int = 0
    ema_profiles: tuple[tuple[str, str, float], ...] = ()  # (name, "decay" | "power", decay | gamma)
    skip_nonfinite: bool = False
    frozen: Frozen = dataclasses.field(default_factory=Frozen)  # params held fixed: no gradients, no optimizer state, not in the EMA


def make_train_step(calls: ModelCalls, rule: UpdateRule) -> Callable[[TrainingState, Batch], tuple[TrainingState, Metrics]]:
    """``(state, batch) -> (state, metrics)``: every update of one step; ``nonfinite=1`` on NaN/Inf.

    With ``skip_nonfinite`` a non-finite update leaves the params, optimizer state and model
    state as they were. Without it the step stays as lean as a hand-written one: the trainer
    reads ``nonfinite`` before any checkpoint or evaluation and stops.
    """

    def train_step(state: TrainingState, batch: Batch) -> tuple[TrainingState, Metrics]:
        step_key = jax.random.fold_in(state.rng, state.step)
        params, opt_state, model_state = state.params, state.opt_state, state.model_state
        metrics: Metrics = {}
        finite = jnp.bool_(True)
        for index, group in enumerate(rule.update_order):
            rng = step_key if len(rule.update_order) == 1 else jax.random.fold_in(step_key, index)
            key = rule.group_keys[group] if rule.group_keys else None
            prefix = () if key is None else (key,)
            target = rule.frozen.trainable(params if key is None else params[key], prefix)

            def rebuild(trainable: Any, params: Any = params, key: str | None = key, prefix: tuple = prefix) -> Any:
                """The whole params from the trainable leaves: the frozen ones enter as constants."""
                inner = rule.frozen.merge(trainable, params if key is None else params[key], prefix)
                return inner if key is None else {**params, key: inner}

            loss, group_metrics, new_model_state, grads = _accumulated_grads(
                calls, rule.accum_steps, rebuild, target, model_state, batch, rng, state.step, group if key else None
            )
            grad_norm = optax.tree.norm(grads)
            ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            group_opt = opt_state if key is None else opt_state[group]

            def apply(_: None, target=target, group_opt=group_opt, grads=grads, group=group, new_model_state=new_model_state):
                updates, new_opt = rule.optimizers[group].update(grads, group_opt, target)
                return optax.apply_updates(target, updates), new_opt, new_model_state

            if rule.skip_nonfinite:  # lax.cond runs one branch: no extra pass over the state when finite
                keep = lambda _, t=target, o=group_opt, m=model_state: (t, o, m)  # noqa: E731
                target, group_opt, model_state = jax.lax.cond(ok, apply, keep, None)
            else:
                target, group_opt, model_state = apply(None)
            params = rebuild(target)
            opt_state = group_opt if key is None else {**opt_state, group: group_opt}
            finite &= ok
            tag = "" if key is None else f"{group}/"
            lr = jnp.asarray(rule.schedules[group](state.step), jnp.float32)
            for name, value in {**group_metrics, "loss": loss, "grad_norm": grad_norm, "learning_rate": lr}.items():
                metrics[tag + name] = value  # a group updated k times reports its last update
        if rule.group_keys:
            metrics["loss"] = sum(metrics[f"{group}/loss"] for group in dict.fromkeys(rule.update_order))
        ema, averaged = state.ema_params, rule.frozen.trainable(params)  # the EMAs hold the trainable leaves
        if ema is not None:
            decay = jnp.where(state.step >= rule.ema_start_step, rule.ema_decay, 0.0)
            ema = optax.incremental_update(averaged, ema, 1.0 - decay)
        profiles = state.ema_profiles
        if profiles is not None:
            profiles = dict(profiles)
            for name, kind, value in rule.ema_profiles:
                if kind == "power":  # after the (step + 1)-th update
                    profiles[name] = posthoc_ema.power_ema_update(profiles[name], averaged, state.step + 1, value)
                else:
                    decay = jnp.where(state.step >= rule.ema_start_step, value, 0.0)
                    profiles[name] = optax.incremental_update(averaged, profiles[name], 1.0 - decay)
        metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state, ema_params=ema,
            ema_profiles=profiles,
        )
        return new_state, {key: jnp.asarray(value, jnp.float32) for key, value in metrics.items()}

    return train_step


def _accumulated_grads(
    calls: ModelCalls,
    accum_steps: int,
    rebuild: Callable[[Any], Any],
    target: Any,
    model_state: Any,
    batch: Batch,
    rng: jax.Array,
    step: jax.Array,
    group: str | None,
) -> tuple[jax.Array, Metrics, Any, Any]:
    """Loss, metrics, new model state and gradients of ``target`` (``rebuild(target)``: the whole params),
    averaged over micro-batches.

    A per-example-keys model gets example ``i``'s key ``fold_in(rng, i)`` in whichever
    micro-batch ``i`` lands, so accumulation sees the full batch's noise.
    """

    def loss_fn(trainable: Any, model_state: Any, micro: Batch, micro_rng: jax.Array, keys: jax.Array | None):
        model = calls.merge(rebuild(trainable), model_state, training=True, rng=jax.random.fold_in(micro_rng, MODEL_RNG_STREAM))
        loss, metrics = calls.loss(model, micro, micro_rng if keys is None else calls.constrain(keys), step, group)
        return loss, (metrics, calls.model_state(model))

    size = jax.tree.leaves(batch)[0].shape[0]
    keys = calls.example_keys(rng, jnp.arange(size)).keys if calls.per_example_keys else None
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum_steps == 1:
        (loss, (metrics, model_state)), grads = grad_fn(target, model_state, batch, rng, keys)
        return loss, metrics, model_state, grads

    # Micro-batch j holds examples j, j+k, j+2k, ...: each stays spread over every device.
    def split(x: jax.Array) -> jax.Array:
        return x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)

    micro_batches = jax.tree.map(split, batch)
    micro_keys = None if keys is None else split(keys)

    def body(carry, inputs):
        grads_sum, loss_sum, metrics_sum, model_state = carry
        index, micro, keys = inputs
        (loss, (metrics, model_state)), grads = grad_fn(target, model_state, micro, jax.random.fold_in(rng, index), keys)
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss, jax.tree.map(jnp.add, metrics_sum, metrics), model_state), None

    first = jax.tree.map(lambda x: x[0], (micro_batches, micro_keys))
    metric_shapes = jax.eval_shape(lambda: loss_fn(target, model_state, first[0], rng, first[1])[1][0])
    zeros = (
        jax.tree.map(jnp.zeros_like, target),
        jnp.zeros((), jnp.float32),
        {k: jnp.zeros(v.shape, jnp.float32) for k, v in metric_shapes.items()},
        model_state,
    )
    xs = (jnp.arange(accum_steps), micro_batches, micro_keys)
    (grads, loss, metrics, model_state), _ = jax.lax.scan(body, zeros, xs)
    scale = 1.0 / accum_steps
    return loss * scale, jax.tree.map(lambda m: m * scale, metrics), model_state, jax.tree.map(lambda g: g * scale, grads)


def make_train_steps(
    train_step: Callable[[TrainingState, Batch], tuple[TrainingState, Metrics]],
    metric_names: list[str],
    batch_sharding: jax.sharding.NamedSharding | None = None,
) -> tuple[Callable, Callable]:
    """The loop's forms of ``train_step``: n steps per call with ``lax.scan``, metrics as ``[n, len(names)]``.

    ``train_steps(state, batches)`` takes batches stacked ``[n, B, ...]``;
    ``train_steps_on_device(state, data, indices)`` gathers batch ``i`` as ``data[indices[i]]``
    from a data set staged on the mesh. Both scan the same step.
    """

    def body(state: TrainingState, batch: Batch) -> tuple[TrainingState, jax.Array]:
        state, metrics = train_step(state, batch)
        return state, jnp.stack([metrics[name] for name in metric_names])

    def steps(step_fn: Callable, state: TrainingState, xs: Any) -> tuple[TrainingState, jax.Array]:
        if jax.tree.leaves(xs)[0].shape[0] == 1:  # one step: no loop (XLA:CPU runs convolutions in loops ~20x slower)
            state, metrics = step_fn(state, jax.tree.map(lambda x: x[0], xs))
            return state, metrics[None]
        return jax.lax.scan(step_fn, state, xs)

    def train_steps(state: TrainingState, batches: Batch) -> tuple[TrainingState, jax.Array]:
        return steps(body, state, batches)

    def train_steps_on_device(state: TrainingState, data: Batch, indices: jax.Array) -> tuple[TrainingState, jax.Array]:
        def gather(state: TrainingState, index: jax.Array) -> tuple[TrainingState, jax.Array]:
            batch = {key: jnp.take(value, index, axis=0) for key, value in data.items()}
            if batch_sharding is not None:
                batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
            return body(state, batch)

        return steps(gather, state, indices)

    return train_steps, train_steps_on_device


def make_eval_sums(calls: ModelCalls) -> Callable[[Any, Any, jax.Array, Batch, jax.Array], Metrics]:
    """Masked per-example sums of one batch: ``(params, model_state, rng, batch, batch_index) -> sums``.

    Padding examples (``mask == 0``) are masked out of per-example values, so every real
    example counts exactly once and the model sees whole batches (BatchNorm statistics and
    in-place state updates behave as in training). A per-example-keys model gets the key of
    each example's position in the pass (``batch_index * B + i``), so the results do not
    depend on the batch size; other models get one key per batch. A loss-only model is called
    on the whole batch (see :func:`_whole_batch`).
    """

    def eval_sums(params: Any, model_state: Any, rng: jax.Array, batch: Batch, batch_index: jax.Array) -> Metrics:
        mask = batch["mask"].astype(jnp.float32)
        examples = {key: value for key, value in batch.items() if key != "mask"}
        stream = jax.random.fold_in(rng, EVAL_STREAM)
        key = jax.random.fold_in(stream, batch_index)
        model = calls.merge(params, model_state, training=False, rng=jax.random.fold_in(key, MODEL_RNG_STREAM))
        model_rng: Any = key
        if calls.per_example_keys:
            size = mask.shape[0]
            positions = jnp.asarray(batch_index, jnp.uint32) * size + jnp.arange(size, dtype=jnp.uint32)
            model_rng = calls.example_keys(stream, positions)
        if not calls.per_example:
            return _whole_batch(calls, model, examples, mask, model_rng)
        sums = {}
        for name, value in model.example_losses(examples, model_rng).items():
            value = jnp.asarray(value, jnp.float32)
            if value.shape != mask.shape:
                raise ValueError(
                    f"example_losses()['{name}'] has shape {value.shape}; evaluation needs one value per "
                    f"example, shape {mask.shape}"
                )
            sums[name] = jnp.sum(value * mask)
        sums["num_examples"] = jnp.sum(mask)
        sums["num_batches"] = jnp.ones((), jnp.float32)
        return sums

    return eval_sums


def _whole_batch(calls: ModelCalls, model: nnx.Module, examples: Batch, mask: jax.Array, rng: Any) -> Metrics:
    """A loss-only model's sums: ``loss`` on the whole batch (no vmap: models with Rngs work), its
    padding rows filled with copies of the batch's real rows, each value counted once per real row.

    Exact when the batch is full; a partially padded batch's real rows count with nearly equal
    weights (those copied once more count slightly more), never the padding itself.
    """
    size = mask.shape[0]
    count = jnp.sum(mask)
    real_first = jnp.argsort(mask <= 0, stable=True)
    source = real_first[jnp.arange(size) % jnp.maximum(count, 1.0).astype(jnp.int32)]
    filled = jax.tree.map(lambda x: jnp.take(x, source, axis=0), examples)
    loss, metrics = calls.loss(model, filled, rng, None, None)
    values = {**metrics, "loss": loss}
    sums = {name: jnp.mean(jnp.asarray(value, jnp.float32)) * count for name, value in values.items()}
    sums["num_examples"] = count
    sums["num_batches"] = jnp.ones((), jnp.float32)
    return sums


def make_eval_step(calls: ModelCalls) -> Callable[[Any, Any, jax.Array, Batch, Metrics], Metrics]:
    """``totals + eval_sums(batch)``: accumulates on device, read once after the pass."""
    eval_sums = make_eval_sums(calls)

    def eval_step(params: Any, model_state: Any, rng: jax.Array, batch: Batch, totals: Metrics) -> Metrics:
        sums = eval_sums(params, model_state, rng, batch, totals["num_batches"].astype(jnp.int32))
        return {name: totals[name] + value for name, value in sums.items()}

    return eval_step


def warn_loss_only(model: nnx.Module) -> None:
    warnings.warn(
        f"{type(model).__name__} has no example_losses(): evaluation calls loss() on whole batches and "
        "counts each batch's values once per real example; a padded last batch is filled with copies of "
        "its real examples, so the figures are exact only when the evaluation set fills whole batches. "
        "Implement example_losses (see workshop_dist.models.base) for exact per-example evaluation.",
        UserWarning,
        stacklevel=3,
    )


def make_sample_fn(calls: ModelCalls) -> Callable[..., jax.Array]:
    def sample(params: Any, model_state: Any, rng: jax.Array, labels: jax.Array | None, num_samples: int, options: tuple):
        model = calls.merge(params, model_state, training=False, rng=jax.random.fold_in(rng, MODEL_RNG_STREAM))
        kwargs = dict(options)
        if labels is not None:
            kwargs["labels"] = labels
        if getattr(model, "shards_samples", False):  # the samples split over the mesh like a batch
            kwargs["sharding"] = calls.example_sharding
        return model.sample(rng, num_samples, **kwargs)

    return sample
