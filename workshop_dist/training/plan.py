"""The training configuration resolved once, for one model and one run length: what the engine needs.

Construction flows one way::

    TrainingConfiguration (validated; old names folded in)
      -> make_plan: the model (built, or abstract with its build function), optax transformations
         and schedules per parameter group (optim), the compute dtype, the seed
      -> Engine(plan, mesh, ...): shardings (parallel), the state, the compiled functions (step)

Nothing below asks the configuration again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from workshop_dist.config import ConfigError
from workshop_dist.models import ModelConfiguration, create_model
from workshop_dist.optim import create_optimizer, create_schedule
from workshop_dist.training import step as steps
from workshop_dist.training.config import TrainingConfiguration
from workshop_dist.training.frozen import frozen_of


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to train and how, resolved from the configuration."""

    model: nnx.Module  # a built module, or an abstract one (``nnx.eval_shape``) that ``build`` makes
    build: Callable[[], nnx.Module] | None
    rule: steps.UpdateRule  # optimizers and schedules per group, accumulation, EMA, NaN policy
    compute_dtype: Any  # None: the model's own dtype
    seed: int
    ema_for_eval: bool
    total_steps: int | None

    @property
    def schedules(self) -> Mapping[str, Any]:
        return self.rule.schedules


def make_plan(model: nnx.Module | ModelConfiguration, config: TrainingConfiguration, total_steps: int | None) -> Plan:
    """Resolve ``config`` for ``model``; a ModelConfiguration is built abstractly (initialised later, sharded)."""
    build = None
    if isinstance(model, ModelConfiguration):
        model_config, seed = model.with_precision(config.performance.precision), config.seed  # its compute dtype
        build = lambda: create_model(model_config, rngs=nnx.Rngs(seed))  # noqa: E731
        model = nnx.eval_shape(build)
    return Plan(
        model=model,
        build=build,
        rule=update_rule(model, config, total_steps),
        compute_dtype=jnp.bfloat16 if config.performance.precision == "bfloat16" else None,
        seed=config.seed,
        ema_for_eval=config.ema.used_for_eval,
        total_steps=total_steps,
    )


def update_rule(model: nnx.Module, config: TrainingConfiguration, total_steps: int | None) -> steps.UpdateRule:
    """Optimizers per parameter group, from ``training.optimizer`` or ``training.optimizers``."""
    declared: Mapping[str, str] | None = getattr(model, "param_groups", None)
    held = [g for g, opt in (config.optimizers or {}).items() if opt.frozen and declared and g in declared]
    frozen = frozen_of(model, config.frozen, [declared[g] for g in held])
    frozen.check(nnx.to_pure_dict(nnx.state(model, nnx.Param)), type(model).__name__)
    if frozen and config.ema.posthoc is not None:
        raise ConfigError("training.ema.posthoc with frozen params is not supported yet: drop one of them")
    common = {
        "frozen": frozen,
        "accum_steps": config.performance.grad_accum_steps,
        "ema_decay": config.ema.primary,
        "ema_start_step": config.ema.start_step,
        "ema_profiles": config.ema.profiles(),
        "skip_nonfinite": config.nan_policy == "skip",
    }
    if not declared:
        if config.optimizers:
            raise ConfigError(
                f"training.optimizers names groups {sorted(config.optimizers)}, but {type(model).__name__} "
                "declares no param_groups; use training.optimizer for a single optimizer."
            )
        schedule = create_schedule(config.scheduler, config.optimizer.learning_rate, total_steps)
        tx = create_optimizer(config.optimizer, schedule)
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
        if group in held:  # no optimizer, no update
            del groups[group]
            continue
        schedules[group] = create_schedule(opt.scheduler or config.scheduler, opt.learning_rate, total_steps)
        optimizers[group] = create_optimizer(opt, schedules[group])
    order = tuple(g for g in getattr(model, "update_order", None) or groups if g not in held)
    unknown = sorted(set(order) - set(groups))
    if unknown:
        raise ConfigError(f"{type(model).__name__}.update_order names unknown groups {unknown}; groups: {sorted(groups)}")
    if not order:
        raise ConfigError(f"every parameter group of {type(model).__name__} is frozen: nothing would train")
    return steps.UpdateRule(optimizers, schedules, groups, order, **common)
