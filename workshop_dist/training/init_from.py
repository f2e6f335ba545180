"""``training.init_from``: start a run's params (all or some) from another run's checkpoint.

Why: fine-tuning, a latent model's backbone warm-started from a pixel run, a bigger model grown
from a smaller one's layers. Only params are taken, read straight into this run's shardings (no
full copy on any host); the optimizer state is fresh, the step is 0, the EMAs start from the
loaded params, the model state (BatchNorm statistics) stays as initialised.

Names are ``/``-joined param paths (``network/blocks/0/attn/qkv/kernel``). Each checkpoint param is
renamed (``rename``: ``{from_prefix: to_prefix}``, or ``[[regex, replacement], ...]``, the first rule
that matches applies), then taken if its new name is a param of this model, matches an ``include``
pattern and no ``exclude`` pattern (patterns as :func:`workshop_dist.training.frozen.matches`:
the path, a prefix of it, or a glob). Every param taken, skipped (excluded, or no such param here)
and missing (this model's, kept as initialised) is logged; a shape mismatch of a param that
would be taken is one error naming every such param and both shapes. A run whose workdir holds
its own checkpoint resumes from it and ignores ``init_from`` (logged).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import traverse_util

from workshop_dist import storage
from workshop_dist.checkpoint import STATE
from workshop_dist.config import ConfigError
from workshop_dist.training.config import InitFromConfiguration
from workshop_dist.training.frozen import matches, path_name
from workshop_dist.training.state import TrainingState


@dataclasses.dataclass(frozen=True)
class Selection:
    """What ``init_from`` does with each name: ``taken`` maps this model's name -> the checkpoint's."""

    taken: dict[str, str]
    excluded: list[str]  # this model's names, left as initialised by include/exclude
    unmatched: list[str]  # checkpoint names (renamed) that are no param of this model
    missing: list[str]  # this model's params the checkpoint does not provide
    mismatched: list[str]  # "name: checkpoint (a, b), model (c, d)"


def step_dir(checkpoint: str) -> storage.AnyPath:
    """The step directory ``checkpoint`` names: itself, or the latest complete step of a run's (checkpoints) directory."""
    path = storage.as_path(checkpoint)
    if (path / STATE).is_dir():
        return path
    directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = [s for s in (ocp.utils.checkpoint_steps(directory) if directory.is_dir() else [])
             if (directory / str(s) / STATE).is_dir() and ocp.utils.is_checkpoint_finalized(directory / str(s))]
    if not steps:
        raise ConfigError(
            f"training.init_from.checkpoint: no checkpoint at {path} (a run's workdir, its checkpoints directory, "
            f"or a step directory holding '{STATE}')"
        )
    return directory / str(max(steps))


def rename(name: str, rules: dict[str, str] | list[tuple[str, str]]) -> str:
    """``name`` under the first rule that matches (prefixes for a dict, regular expressions for pairs)."""
    if isinstance(rules, dict):
        for old, new in rules.items():
            old, new = old.strip("/"), new.strip("/")
            if name == old or name.startswith(old + "/"):
                return (new + name[len(old):]).strip("/")
        return name
    for pattern, replacement in rules:
        if re.search(pattern, name):
            return re.sub(pattern, replacement, name, count=1)
    return name


def select(saved: dict[str, tuple], target: dict[str, tuple], config: InitFromConfiguration) -> Selection:
    """Which params to take, from the checkpoint's and this model's ``{name: shape}``."""
    taken, excluded, unmatched, mismatched = {}, [], [], []
    for source, shape in saved.items():
        name = rename(source, config.rename)
        if name not in target:
            unmatched.append(name if name == source else f"{source} -> {name}")
        elif not any(matches(name, p) for p in config.include) or any(matches(name, p) for p in config.exclude):
            excluded.append(name)
        elif tuple(shape) != tuple(target[name]):
            mismatched.append(f"{name}: checkpoint {tuple(shape)} ({source}), this model {tuple(target[name])}")
        elif name in taken:
            raise ConfigError(f"training.init_from.rename maps both {taken[name]} and {source} onto {name}")
        else:
            taken[name] = source
    missing = [name for name in target if name not in taken and name not in excluded]
    return Selection(taken, sorted(set(excluded)), unmatched, missing, mismatched)


def load(config: InitFromConfiguration, params: Any, shardings: Any, log: Any = None) -> tuple[Any, Selection]:
    """``params`` (this run's, initialised) with the selected ones read from the checkpoint into ``shardings``."""
    where = step_dir(config.checkpoint)
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        saved_tree = checkpointer.metadata(where / STATE).item_metadata
        saved_params = saved_tree.get("params") if hasattr(saved_tree, "get") else None
        if not saved_params:
            raise ConfigError(f"training.init_from: {where} holds no params")
        saved_flat = traverse_util.flatten_dict(dict(saved_params))
        saved_keys = {path_name(path): path for path in saved_flat}
        flat, flat_shardings = traverse_util.flatten_dict(params), traverse_util.flatten_dict(shardings)
        target_keys = {path_name(path): path for path in flat}
        selection = select({n: tuple(saved_flat[p].shape) for n, p in saved_keys.items()},
                           {n: tuple(flat[p].shape) for n, p in target_keys.items()}, config)
        if selection.mismatched:
            shown = "\n  ".join(selection.mismatched)
            raise ConfigError(
                f"training.init_from: {len(selection.mismatched)} params of {where} have other shapes than this model's:"
                f"\n  {shown}\nexclude them (training.init_from.exclude) or rename them onto params of their shape"
            )
        if not selection.taken:
            raise ConfigError(f"training.init_from: no param of {where} is taken (check include, exclude and rename); "
                              f"unmatched: {selection.unmatched[:5]}")
        item = {saved_keys[source]: jax.ShapeDtypeStruct(flat[target_keys[name]].shape, flat[target_keys[name]].dtype,
                                                         sharding=flat_shardings[target_keys[name]])
                for name, source in selection.taken.items()}
        item = {"params": traverse_util.unflatten_dict(item)}
        restored = checkpointer.restore(where / STATE, args=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
    finally:
        checkpointer.close()
    loaded = traverse_util.flatten_dict(restored["params"])
    for name, source in selection.taken.items():
        flat[target_keys[name]] = loaded[saved_keys[source]]
    if log is not None:
        report(log, where, selection)
    return traverse_util.unflatten_dict(flat), selection


def report(log: Any, where: Any, selection: Selection) -> None:
    """A summary on the console, every name in the log file."""
    log.info("init_from %s: took %d params, skipped %d (excluded %d, not in this model %d), %d kept as initialised",
             where, len(selection.taken), len(selection.excluded) + len(selection.unmatched), len(selection.excluded),
             len(selection.unmatched), len(selection.missing))
    lines = [f"  taken    {name}" + ("" if name == source else f" <- {source}") for name, source in selection.taken.items()]
    lines += [f"  skipped  {name} (excluded)" for name in selection.excluded]
    lines += [f"  skipped  {name} (not a param of this model)" for name in selection.unmatched]
    lines += [f"  missing  {name} (kept as initialised)" for name in selection.missing]
    log.info("init_from, param by param:\n%s", "\n".join(lines), console=False)


def initialise(state: TrainingState, config: InitFromConfiguration | None, engine: Any, checkpoints: Any, log: Any) -> TrainingState:
    """The Trainer's initial state after ``init_from`` (unchanged without it, or when the run resumes)."""
    if config is None or state is None:
        return state
    if checkpoints.directory is not None and checkpoints.manager.all_steps():
        log.info("training.init_from ignored: %s holds this run's own checkpoints (latest step %d); it resumes from them",
                 checkpoints.directory, checkpoints.manager.all_steps()[-1])
        return state
    params, _ = load(config, state.params, engine.state_shardings.params, log)
    frozen, shardings = engine.plan.rule.frozen, engine.state_shardings
    copy = None if state.ema_params is None and state.ema_profiles is None else jax.jit(
        lambda p: jax.tree.map(jnp.copy, frozen.trainable(p)), out_shardings=shardings.ema_params
        if shardings.ema_params is not None else next(iter(shardings.ema_profiles.values())))
    return state.replace(
        params=params,
        ema_params=None if state.ema_params is None else copy(params),  # the EMAs start from the loaded params
        ema_profiles=None if state.ema_profiles is None else {name: copy(params) for name in state.ema_profiles},
    )
