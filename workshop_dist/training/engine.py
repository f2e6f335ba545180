"""The engine: one model on one mesh, with its sharded state and every jitted function.

Built once by the :class:`~workshop_dist.training.trainer.Trainer` (or by itself for ahead-of-time
compilation): optimizers per parameter group, shardings of the whole :class:`TrainingState`,
the initial state placed straight into them, and the compiled step, evaluation and sampling.
No I/O and no loop here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from workshop_dist import parallel
from workshop_dist.config import ConfigError
from workshop_dist.models import ModelConfiguration, create_model
from workshop_dist.optim import create_optimizer, create_schedule
from workshop_dist.parallel import MeshConfiguration
from workshop_dist.training import step as steps
from workshop_dist.training.config import TrainingConfiguration
from workshop_dist.training.state import TrainingState

Batch = dict[str, jax.Array]


class Engine:
    """Sharded training state and compiled functions for ``model`` on ``mesh``."""

    def __init__(
        self,
        model: nnx.Module | ModelConfiguration,
        config: TrainingConfiguration,
        mesh: jax.sharding.Mesh,
        mesh_config: MeshConfiguration,
        total_steps: int | None,
        *,
        abstract: bool = False,
    ):
        """``model`` is a built module (its params are copied onto the mesh) or a ModelConfiguration:
        then the model is built abstractly and initialised by one jitted function straight into its
        shardings, so no host or device ever holds a full copy. ``abstract=True`` creates no arrays
        at all (ahead-of-time compilation for devices this machine does not have)."""
        self.config, self.mesh = config, mesh
        build = None
        if isinstance(model, ModelConfiguration):
            model_config = model.with_precision(config.precision)  # built in its compute dtype, once
            build = lambda: create_model(model_config, rngs=nnx.Rngs(config.seed))  # noqa: E731
            model = nnx.eval_shape(build)
        graphdef, params_state, model_state = nnx.split(model, nnx.Param, ...)
        compute = jnp.bfloat16 if config.precision == "bfloat16" else None
        self.calls = steps.ModelCalls.for_model(
            model, graphdef, nnx.to_pure_dict(model_state), compute, batch_sharding=parallel.batch_sharding(mesh)
        )
        if not self.calls.per_example:
            steps.warn_loss_only(model)
        self.num_classes: int | None = getattr(model, "num_classes", None) or None
        self.rule = _update_rule(model, config, total_steps)
        self.schedule = self.rule.schedules[next(iter(self.rule.schedules))]

        # --- Shardings of the whole state ---------------------------------------------------
        params = nnx.to_pure_dict(params_state)
        logical = nnx.to_pure_dict(nnx.get_partition_spec(params_state))
        replicated = parallel.replicated(mesh)
        param_shardings = parallel.parameter_shardings(params, logical, mesh, mesh_config)
        opt_shapes = jax.eval_shape(self._init_opt_state, params)
        opt_shardings = self._opt_shardings(opt_shapes, param_shardings, replicated)
        stored_model_state = jax.eval_shape(self.calls.storable, nnx.to_pure_dict(model_state))
        ema_on = config.ema_decay is not None
        self.state_shardings = TrainingState(
            step=replicated,
            params=param_shardings,
            opt_state=opt_shardings,
            rng=replicated,
            best_loss=replicated,
            model_state=jax.tree.map(lambda _: replicated, stored_model_state),
            ema_params=param_shardings if ema_on else None,
        )
        shapes = TrainingState(
            step=jax.ShapeDtypeStruct((), jnp.int32),
            params=params,
            opt_state=opt_shapes,
            rng=jax.eval_shape(lambda: jax.random.PRNGKey(0)),
            best_loss=jax.ShapeDtypeStruct((), jnp.float32),
            model_state=stored_model_state,
            ema_params=params if ema_on else None,
        )
        self.state_shapes = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, self.state_shardings
        )

        # --- The initial state, created in its shardings ------------------------------------
        self.initial_state: TrainingState | None = None
        if not abstract:
            if build is not None:  # sharded initialisation: each device computes only its shards
                def init() -> tuple[Any, Any]:
                    _, p, ms = nnx.split(build(), nnx.Param, ...)
                    return nnx.to_pure_dict(p), self.calls.storable(nnx.to_pure_dict(ms))

                placed, placed_model_state = jax.jit(
                    init, out_shardings=(param_shardings, self.state_shardings.model_state)
                )()
            else:
                placed = parallel.place(nnx.to_pure_dict(params_state), param_shardings)  # a copy: the module stays usable
                placed_model_state = parallel.place(self.calls.storable(nnx.to_pure_dict(model_state)), replicated)
            self.initial_state = TrainingState(
                step=parallel.place(np.int32(0), replicated),
                params=placed,
                opt_state=jax.jit(self._init_opt_state, out_shardings=opt_shardings)(placed),
                rng=parallel.place(jax.random.PRNGKey(config.seed), replicated),
                best_loss=parallel.place(np.float32(np.inf), replicated),
                model_state=placed_model_state,
                ema_params=jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=param_shardings)(placed)
                if ema_on
                else None,
            )

        # --- Compiled functions -----------------------------------------------------------
        self.batch_sharding = parallel.batch_sharding(mesh)
        self.stacked_sharding = NamedSharding(mesh, P(None, parallel.BATCH_AXES))
        self.train_step = steps.make_train_step(self.calls, self.rule)
        self.metric_names: list[str] = []
        self._train_steps: Any = None
        self._train_steps_on_device: Any = None
        self.eval_sums = steps.make_eval_sums(self.calls)  # unjitted: for the shapes of a pass's totals
        self.eval_step = jax.jit(
            steps.make_eval_step(self.calls),
            in_shardings=(param_shardings, self.state_shardings.model_state, replicated, self.batch_sharding, replicated),
            out_shardings=replicated,
        )
        self.sample = jax.jit(steps.make_sample_fn(self.calls), static_argnums=(4, 5), out_shardings=replicated)

    # --- Optimizer state per group -----------------------------------------------------------

    def _init_opt_state(self, params: Any) -> Any:
        if self.rule.group_keys is None:
            return self.rule.optimizers[steps.SINGLE].init(params)
        return {group: self.rule.optimizers[group].init(params[key]) for group, key in self.rule.group_keys.items()}

    def _opt_shardings(self, opt_shapes: Any, param_shardings: Any, default: NamedSharding) -> Any:
        if self.rule.group_keys is None:
            return parallel.optimizer_state_shardings(self.rule.optimizers[steps.SINGLE], opt_shapes, param_shardings, default)
        return {
            group: parallel.optimizer_state_shardings(self.rule.optimizers[group], opt_shapes[group], param_shardings[key], default)
            for group, key in self.rule.group_keys.items()
        }

    # --- The training step: one compiled form, n steps per call ------------------------------

    def build(self, batch: Batch) -> None:
        """Compile-ready jitted forms of the step, given one (global, unstacked) batch's shapes."""
        if self._train_steps is not None:
            return
        shapes = jax.eval_shape(self.train_step, self.initial_state_shapes(), batch)[1]
        self.metric_names = sorted(shapes)
        train_steps, on_device = steps.make_train_steps(self.train_step, self.metric_names, self.batch_sharding)
        replicated = parallel.replicated(self.mesh)
        carry = _carry(self.state_shardings)
        self._train_steps = jax.jit(
            _lean(train_steps),
            in_shardings=(carry, replicated, self.stacked_sharding),
            out_shardings=(carry, replicated),
            donate_argnums=0,
        )
        self._train_steps_on_device = jax.jit(
            _lean(on_device),
            in_shardings=(carry, replicated, None, replicated),
            out_shardings=(carry, replicated),
            donate_argnums=0,
        )

    def initial_state_shapes(self) -> TrainingState:
        """The state as sharded ``ShapeDtypeStruct`` s (restore targets, lowering)."""
        return self.state_shapes

    def train_steps(self, state: TrainingState, batches: Batch) -> tuple[TrainingState, jax.Array]:
        """``n`` steps on batches stacked ``[n, B, ...]`` (global arrays); metrics ``[n, len(metric_names)]``."""
        carry, metrics = self._train_steps(_carry(state), state.rng, batches)
        return carry.replace(rng=state.rng, best_loss=state.best_loss), metrics

    def train_steps_on_device(self, state: TrainingState, data: Batch, indices: jax.Array) -> tuple[TrainingState, jax.Array]:
        """``n`` steps on ``data[indices[i]]`` gathered on the mesh."""
        carry, metrics = self._train_steps_on_device(_carry(state), state.rng, data, indices)
        return carry.replace(rng=state.rng, best_loss=state.best_loss), metrics

    def lower(self, state: TrainingState, batches: Batch) -> jax.stages.Lowered:
        return self._train_steps.lower(_carry(state), state.rng, batches)

    def eval_params(self, state: TrainingState) -> Any:
        """The params evaluation and sampling use (the EMA when on)."""
        return state.ema_params if self.config.ema_for_eval and state.ema_params is not None else state.params


def _carry(state: TrainingState) -> TrainingState:
    """What a call of steps changes and donates: the state without its rng and best loss.

    Fewer arrays cross the jit boundary (dispatch cost grows with arrays x devices: ~5% of a
    small model's step on 8 devices); the rng is a read-only input, the best loss untouched.
    """
    return state.replace(rng=None, best_loss=None)


def _lean(steps_fn: Any) -> Any:
    def lean(carry: TrainingState, rng: jax.Array, *inputs: Any) -> tuple[TrainingState, jax.Array]:
        state, metrics = steps_fn(carry.replace(rng=rng, best_loss=jnp.zeros((), jnp.float32)), *inputs)
        return _carry(state), metrics

    return lean


def _update_rule(model: nnx.Module, config: TrainingConfiguration, total_steps: int | None) -> steps.UpdateRule:
    """Optimizers per parameter group, from ``training.optimizer`` or ``training.optimizers``."""
    declared: Mapping[str, str] | None = getattr(model, "param_groups", None)
    common = {
        "accum_steps": config.grad_accum_steps,
        "ema_decay": config.ema_decay,
        "ema_start_step": config.ema_start_step,
        "skip_nonfinite": config.nan_policy == "skip",
    }
    if not declared:
        if config.optimizers:
            raise ConfigError(
                f"training.optimizers names groups {sorted(config.optimizers)}, but {type(model).__name__} "
                "declares no param_groups; use training.optimizer for a single optimizer."
            )
        schedule = create_schedule(config.scheduler, config.optimizer.learning_rate, total_steps)
        tx = create_optimizer(config.effective_optimizer(), schedule)
        return steps.UpdateRule({steps.SINGLE: tx}, {steps.SINGLE: schedule}, None, **common)
    groups = dict(declared)
    given = set(config.optimizers or {})
    if given != set(groups):
        raise ConfigError(
            f"{type(model).__name__} has parameter groups {sorted(groups)}: set training.optimizers with one "
            f"optimizer for each (got {sorted(given) or 'none'})."
        )
    optimizers, schedules = {}, {}
    for group, opt in config.optimizers.items():
        base = opt.model_copy(update={"scheduler": None})
        schedule = create_schedule(opt.scheduler or config.scheduler, opt.learning_rate, total_steps)
        clip = base.gradient_clip_norm or config.gradient_clip_norm
        optimizers[group] = create_optimizer(base.model_copy(update={"gradient_clip_norm": clip}), schedule)
        schedules[group] = schedule
    order = tuple(getattr(model, "update_order", None) or groups)
    unknown = sorted(set(order) - set(groups))
    if unknown:
        raise ConfigError(f"{type(model).__name__}.update_order names unknown groups {unknown}; groups: {sorted(groups)}")
    return steps.UpdateRule(optimizers, schedules, groups, order, **common)
