"""The engine: one model on one mesh, with its sharded state and every jitted function.

Built once, up front, from a :class:`~workshop_dist.training.plan.Plan` and the batch
specification the input reports: shardings of the whole :class:`TrainingState`, the initial
state placed straight into them, the compiled step (n steps per call), evaluation and sampling,
and the step's FLOPs. No I/O, no loop, no configuration here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import clu.metrics
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from workshop_dist import parallel
from workshop_dist.parallel import MeshConfiguration
from workshop_dist.training import inputs
from workshop_dist.training import step as steps
from workshop_dist.training.plan import Plan
from workshop_dist.training.state import TrainingState

Batch = dict[str, jax.Array]
Spec = Mapping[str, jax.ShapeDtypeStruct]


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """The jitted n-steps-per-call step for one batch shape: host batches, or indices into data on the mesh."""

    metric_names: tuple[str, ...]
    host: Any  # (carry, rng, batches [n, B, ...]) -> (carry, metrics [n, m])
    on_device: Any  # (carry, rng, data, indices [n, B]) -> (carry, metrics [n, m])


class Engine:
    """Sharded training state and compiled functions for ``plan.model`` on ``mesh``."""

    def __init__(
        self,
        plan: Plan,
        mesh: jax.sharding.Mesh,
        mesh_config: MeshConfiguration,
        batch_spec: Spec | None = None,
        *,
        abstract: bool = False,
    ):
        """``batch_spec``: one global training batch's shapes (None: no training data; the step is then
        compiled for the batches given to :meth:`program`). A plan with a ``build`` function (a model
        given as its configuration) is initialised by one jitted function straight into its shardings,
        so no host or device ever holds a full copy. ``abstract=True`` creates no arrays at all
        (ahead-of-time compilation for devices this machine does not have)."""
        self.plan, self.mesh = plan, mesh
        model, rule = plan.model, plan.rule
        graphdef, params_state, model_state = nnx.split(model, nnx.Param, ...)
        self.calls = steps.ModelCalls.for_model(
            model, graphdef, nnx.to_pure_dict(model_state), plan.compute_dtype, batch_sharding=parallel.batch_sharding(mesh)
        )
        if not self.calls.per_example:
            steps.warn_loss_only(model)
        self.num_classes: int | None = getattr(model, "num_classes", None) or None

        # --- Shardings of the whole state ---------------------------------------------------
        params = nnx.to_pure_dict(params_state)
        logical = nnx.to_pure_dict(nnx.get_partition_spec(params_state))
        replicated = parallel.replicated(mesh)
        param_shardings = parallel.parameter_shardings(params, logical, mesh, mesh_config)
        opt_shapes = jax.eval_shape(self._init_opt_state, params)
        opt_shardings = self._opt_shardings(opt_shapes, param_shardings, replicated)
        stored_model_state = jax.eval_shape(self.calls.storable, nnx.to_pure_dict(model_state))
        ema_on, held = rule.ema_decay is not None, rule.frozen  # the EMAs average only the trainable params
        ema_shardings, ema_shapes = held.trainable(param_shardings), held.trainable(params)
        profile_names = [name for name, _, _ in rule.ema_profiles] or None  # None: no profiles, nothing stored
        self.state_shardings = TrainingState(
            step=replicated,
            params=param_shardings,
            opt_state=opt_shardings,
            rng=replicated,
            best_loss=replicated,
            model_state=jax.tree.map(lambda _: replicated, stored_model_state),
            ema_params=ema_shardings if ema_on else None,
            ema_profiles={name: ema_shardings for name in profile_names} if profile_names else None,
        )
        shapes = TrainingState(
            step=jax.ShapeDtypeStruct((), jnp.int32),
            params=params,
            opt_state=opt_shapes,
            rng=jax.eval_shape(lambda: jax.random.PRNGKey(0)),
            best_loss=jax.ShapeDtypeStruct((), jnp.float32),
            model_state=stored_model_state,
            ema_params=ema_shapes if ema_on else None,
            ema_profiles={name: ema_shapes for name in profile_names} if profile_names else None,
        )
        self.state_shapes = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, self.state_shardings
        )

        # --- The initial state, created in its shardings ------------------------------------
        self.initial_state: TrainingState | None = None
        if not abstract:
            if plan.build is not None:  # sharded initialisation: each device computes only its shards
                def init() -> tuple[Any, Any]:
                    _, p, ms = nnx.split(plan.build(), nnx.Param, ...)
                    return nnx.to_pure_dict(p), self.calls.storable(nnx.to_pure_dict(ms))

                placed, placed_model_state = run_once(
                    jax.jit(init, out_shardings=(param_shardings, self.state_shardings.model_state)), mesh
                )
            else:
                placed = parallel.place(params, param_shardings)  # a copy: the module stays usable
                placed_model_state = parallel.place(self.calls.storable(nnx.to_pure_dict(model_state)), replicated)
            copy = jax.jit(lambda p: jax.tree.map(jnp.copy, held.trainable(p)), out_shardings=ema_shardings)
            self.initial_state = TrainingState(
                step=parallel.place(np.int32(0), replicated),
                params=placed,
                opt_state=jax.jit(self._init_opt_state, out_shardings=opt_shardings)(placed),
                rng=parallel.place(jax.random.PRNGKey(plan.seed), replicated),
                best_loss=parallel.place(np.float32(np.inf), replicated),
                model_state=placed_model_state,
                ema_params=copy(placed) if ema_on else None,
                ema_profiles={name: copy(placed) for name in profile_names} if profile_names else None,
            )

        # --- Compiled functions -----------------------------------------------------------
        self.batch_sharding = parallel.batch_sharding(mesh)
        self.stacked_sharding = NamedSharding(mesh, P(None, parallel.BATCH_AXES))
        self.train_step = steps.make_train_step(self.calls, rule)
        self.eval_sums = steps.make_eval_sums(self.calls)
        eval_in = (param_shardings, self.state_shardings.model_state, replicated, self.batch_sharding, replicated)
        self.eval_step = parallel.CompiledTogether(
            jax.jit(self._accumulate, in_shardings=eval_in, out_shardings=replicated), "eval")
        self.sample = parallel.CompiledTogether(
            jax.jit(steps.make_sample_fn(self.calls), static_argnums=(4, 5), out_shardings=replicated), "sample")
        self._programs: dict[tuple, TrainProgram] = {}
        self.batch_spec = None if batch_spec is None else self.global_spec(batch_spec)
        self._main = self.program(self.batch_spec) if batch_spec else None  # the training input's (no lookup per call)
        self.metric_names: tuple[str, ...] = self._main.metric_names if self._main else ()
        self.flops_per_step: float | None = None
        if batch_spec is not None and not abstract:  # for MFU: XLA's cost analysis of one step
            cost = self.lower().cost_analysis()
            cost = cost[0] if isinstance(cost, list | tuple) else cost
            self.flops_per_step = float(cost["flops"]) if cost and cost.get("flops") else None

    # --- Optimizer state per group -----------------------------------------------------------

    def _init_opt_state(self, params: Any) -> Any:
        rule = self.plan.rule  # only the trainable params have optimizer state
        if rule.group_keys is None:
            return rule.optimizers[steps.SINGLE].init(rule.frozen.trainable(params))
        return {group: rule.optimizers[group].init(rule.frozen.trainable(params[key], (key,)))
                for group, key in rule.group_keys.items()}

    def _opt_shardings(self, opt_shapes: Any, param_shardings: Any, default: NamedSharding) -> Any:
        rule, held = self.plan.rule, self.plan.rule.frozen
        if rule.group_keys is None:
            tx = rule.optimizers[steps.SINGLE]
            return parallel.optimizer_state_shardings(tx, opt_shapes, held.trainable(param_shardings), default)
        return {
            group: parallel.optimizer_state_shardings(
                rule.optimizers[group], opt_shapes[group], held.trainable(param_shardings[key], (key,)), default)
            for group, key in rule.group_keys.items()
        }

    # --- The training step: one compiled form per batch shape, n steps per call -----------------

    def global_spec(self, spec: Spec) -> dict[str, jax.ShapeDtypeStruct]:
        """``spec`` with this engine's batch sharding (the shapes are those of the global batch)."""
        return {key: jax.ShapeDtypeStruct(tuple(s.shape), s.dtype, sharding=self.batch_sharding) for key, s in spec.items()}

    def program(self, spec: Spec | None = None) -> TrainProgram:
        """The jitted steps for global batches shaped like ``spec`` (default: the training input's)."""
        spec = self.batch_spec if spec is None else spec
        if spec is None:
            raise ValueError("This engine was built without a batch specification: pass one.")
        key = tuple(sorted((name, tuple(s.shape), str(s.dtype)) for name, s in spec.items()))
        if key not in self._programs:
            spec = self.global_spec(spec)
            names = tuple(sorted(jax.eval_shape(self.train_step, self.state_shapes, spec)[1]))
            train_steps, on_device = steps.make_train_steps(self.train_step, list(names), self.batch_sharding)
            replicated = parallel.replicated(self.mesh)
            carry = _carry(self.state_shardings)
            self._programs[key] = TrainProgram(
                names,
                parallel.CompiledTogether(jax.jit(
                    _lean(train_steps), in_shardings=(carry, replicated, self.stacked_sharding),
                    out_shardings=(carry, replicated), donate_argnums=0), "train"),
                parallel.CompiledTogether(jax.jit(
                    _lean(on_device), in_shardings=(carry, replicated, None, replicated),
                    out_shardings=(carry, replicated), donate_argnums=0), "train-on-device"),
            )
        return self._programs[key]

    def train_steps(
        self, state: TrainingState, batches: Batch, program: TrainProgram | None = None
    ) -> tuple[TrainingState, jax.Array]:
        """``n`` steps on batches stacked ``[n, B, ...]`` (global arrays); metrics ``[n, len(metric_names)]``."""
        carry, metrics = (program or self._main).host(_carry(state), state.rng, batches)
        return carry.replace(rng=state.rng, best_loss=state.best_loss), metrics

    def train_steps_on_device(self, state: TrainingState, data: Batch, indices: jax.Array) -> tuple[TrainingState, jax.Array]:
        """``n`` steps on ``data[indices[i]]`` gathered on the mesh."""
        carry, metrics = self._main.on_device(_carry(state), state.rng, data, indices)
        return carry.replace(rng=state.rng, best_loss=state.best_loss), metrics

    def lower(self, spec: Spec | None = None) -> jax.stages.Lowered:
        """One step for global batches shaped like ``spec`` (default: the input's), lowered (compile to inspect it)."""
        program = self.program(spec)
        spec = self.global_spec(self.batch_spec if spec is None else spec)
        stacked = {k: jax.ShapeDtypeStruct((1, *s.shape), s.dtype, sharding=self.stacked_sharding) for k, s in spec.items()}
        return program.host.lower(_carry(self.state_shapes), self.state_shapes.rng, stacked)

    def one_step(self, state: TrainingState, batch: Mapping[str, Any]) -> tuple[TrainingState, dict[str, jax.Array]]:
        """One training step on ``batch`` (a host batch or global arrays), as the loop's compiled program takes it."""
        batch = inputs.as_batch(batch)
        if not all(isinstance(v, jax.Array) and not v.is_fully_addressable for v in batch.values()):
            batch = parallel.host_batch_to_global({k: np.asarray(v) for k, v in batch.items()}, self.mesh)
        program = self.program({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()})
        state, metrics = self.train_steps(state, {key: value[None] for key, value in batch.items()}, program)
        return state, dict(zip(program.metric_names, metrics[0], strict=True))

    # --- Evaluation ---------------------------------------------------------------------------

    def eval_params(self, state: TrainingState) -> Any:
        """The params evaluation and sampling use (the EMA when on, with the frozen params beside it)."""
        if self.plan.ema_for_eval and state.ema_params is not None:
            return self.plan.rule.frozen.merge(state.ema_params, state.params)
        return state.params

    def empty_totals(self, params: Any, model_state: Any, rng: jax.Array, batch: Batch) -> tuple[Any, jax.Array]:
        """The start of an evaluation pass on the mesh: an empty ``clu.metrics`` collection, batch index 0."""
        sums = jax.eval_shape(self.eval_sums, params, model_state, rng, batch, 0)
        fields = {_field(name): clu.metrics.Average for name in sums if name not in _COUNTS}
        return parallel.place((clu.metrics.Collection.create(**fields).empty(), np.int32(0)), parallel.replicated(self.mesh))

    def _accumulate(self, params: Any, model_state: Any, rng: jax.Array, batch: Batch, totals: Any) -> tuple[Any, jax.Array]:
        """Merge one batch's masked sums into the pass's collection of averages (on the device)."""
        collection, index = totals
        sums = self.eval_sums(params, model_state, rng, batch, index)
        count = sums["num_examples"].astype(jnp.int32)
        averages = {_field(k): clu.metrics.Average(total=v, count=count) for k, v in sums.items() if k not in _COUNTS}
        return collection.merge(clu.metrics.Collection.create_collection(**averages)), index + 1


_COUNTS = ("num_examples", "num_batches")


def _field(name: str) -> str:
    """A metric name as a field of the collection (reversibly: ``loss`` stays ``loss``)."""
    return name if name.isidentifier() and not name.startswith("hex_") else "hex_" + name.encode().hex()


def _name(field: str) -> str:
    return bytes.fromhex(field[4:]).decode() if field.startswith("hex_") else field


def averages(totals: Any) -> dict[str, float]:
    """An evaluation pass's results (host floats) from the engine's totals: each metric's mean, and
    ``num_examples``, by the model's own metric names."""
    collection, _ = jax.device_get(totals)
    means = {_name(field): float(value) for field, value in collection.compute().items()}
    return {**means, "num_examples": int(collection.loss.count)}


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


def run_once(program: Any, mesh: Any) -> Any:
    """Run a jitted program with no arguments that runs once per process (the sharded initialisation).

    On CPU it is compiled without LLVM's optimisations: running it takes milliseconds either way,
    but the optimised compilation of its random initialisers does not (the 32x32 autoencoder's:
    80 s against 9 s on 2 cores; the digits U-Net's: 23 s against 6 s).
    """
    cpu = all(device.platform == "cpu" for device in mesh.devices.flat)
    options = {"xla_backend_optimization_level": 0} if cpu else {}
    return program.lower().compile(compiler_options=options)()
