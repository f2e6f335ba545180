"""Frozen parameters: parts of a model the step holds fixed (a first-stage encoder, a pretrained trunk).

Why a split and not ``stop_gradient``: the step differentiates only the trainable leaves (the frozen
ones enter the loss as constants), so no gradient is computed or stored for them, the optimizer
state and the EMA hold only the trainable leaves, and a frozen half of a model costs its forward
pass and nothing else. The frozen leaves stay in ``TrainingState.params``: sharded like every
param, checkpointed with the run (a resume does not need the file they came from).

What is frozen is a set of patterns over ``/``-joined param paths (``autoencoder``,
``encoder/down_blocks/0``, ``*/norm*/scale``): a pattern freezes a path equal to it, under it, or
matching it as a glob. Three sources, unioned: ``training.frozen`` (any model), a model's class
attribute ``frozen_params`` (e.g. :class:`~workshop_dist.models.latent.LatentModel`'s first stage),
and each parameter group whose ``training.optimizers.<group>`` is ``frozen: true``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterable
from typing import Any

from clu import parameter_overview
from flax import traverse_util

from workshop_dist.config import ConfigError


def path_name(path: Iterable[Any]) -> str:
    """A param path as the run log and the patterns write it: ``encoder/down_blocks/0/conv1/kernel``."""
    return "/".join(str(part) for part in path)


def matches(name: str, pattern: str) -> bool:
    """``name`` is ``pattern``, lies under it, or matches it as a glob."""
    pattern = pattern.strip("/")
    return name == pattern or name.startswith(pattern + "/") or fnmatch.fnmatchcase(name, pattern)


@dataclasses.dataclass(frozen=True)
class Frozen:
    """Which params are frozen (``patterns``) and how to split and join trees of params by it."""

    patterns: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def is_frozen(self, name: str) -> bool:
        return any(matches(name, pattern) for pattern in self.patterns)

    def _select(self, tree: Any, prefix: tuple, frozen: bool) -> Any:
        flat = traverse_util.flatten_dict(tree) if isinstance(tree, dict) else {(): tree}
        kept = {path: leaf for path, leaf in flat.items() if self.is_frozen(path_name(prefix + path)) == frozen}
        if () in kept:
            return kept[()]
        return traverse_util.unflatten_dict(kept) if kept else {}

    def trainable(self, tree: Any, prefix: tuple = ()) -> Any:
        """The trainable leaves of ``tree`` (a params-shaped tree of anything) found at ``prefix``; all of it when nothing is frozen."""
        return self._select(tree, prefix, False) if self else tree

    def frozen(self, tree: Any, prefix: tuple = ()) -> Any:
        """The frozen leaves of ``tree`` at ``prefix``."""
        return self._select(tree, prefix, True) if self else {}

    def merge(self, trainable: Any, full: Any, prefix: tuple = ()) -> Any:
        """``full`` with its trainable leaves replaced by ``trainable`` (the frozen ones kept as they are)."""
        if not self:
            return trainable
        flat = traverse_util.flatten_dict(full) if isinstance(full, dict) else {(): full}
        ours = traverse_util.flatten_dict(trainable) if isinstance(trainable, dict) else {(): trainable}
        merged = {path: ours.get(path, leaf) for path, leaf in flat.items()}
        return merged[()] if () in merged else traverse_util.unflatten_dict(merged)

    def check(self, params: Any, owner: str) -> None:
        """One error for a pattern that freezes nothing, or for patterns that freeze everything."""
        if not self:
            return
        names = [path_name(path) for path in traverse_util.flatten_dict(params)]
        unmatched = [p for p in self.patterns if not any(matches(n, p) for n in names)]
        if unmatched:
            tops = sorted({n.split("/", 1)[0] for n in names})
            raise ConfigError(
                f"frozen params {unmatched} match no parameter of {owner} (its top-level params: {tops}); "
                "patterns are '/'-joined paths ('encoder', 'encoder/mid_block') or globs ('*/norm*')"
            )
        if all(self.is_frozen(n) for n in names):
            raise ConfigError(f"frozen params {list(self.patterns)} freeze every parameter of {owner}: nothing would train")


def frozen_of(model: Any, frozen: Iterable[str] = (), groups: Iterable[str] = ()) -> Frozen:
    """The union of ``training.frozen``, the model's ``frozen_params`` and the frozen groups' params."""
    declared = tuple(getattr(model, "frozen_params", ()) or ())
    patterns = tuple(dict.fromkeys((*declared, *frozen, *groups)))
    return Frozen(patterns)


def parameter_table(params: Any, frozen: Frozen) -> str:
    """clu's parameter overview, each frozen param marked ``(frozen)``, and the trainable / frozen totals."""
    if not frozen:
        return parameter_overview.get_parameter_overview(params, include_stats=False)
    flat = traverse_util.flatten_dict(params)
    marked = {
        path_name(path) + (" (frozen)" if frozen.is_frozen(path_name(path)) else ""): leaf for path, leaf in flat.items()
    }
    table = parameter_overview.get_parameter_overview(marked, include_stats=False)
    sizes = {name: int(getattr(leaf, "size", 0)) for name, leaf in marked.items()}
    held = sum(size for name, size in sizes.items() if name.endswith(" (frozen)"))
    return f"{table}\nTrainable: {sum(sizes.values()) - held:,}  frozen: {held:,} ({', '.join(frozen.patterns)})"
