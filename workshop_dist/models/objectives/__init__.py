"""Training objectives over a shared network ``network(x, t, labels) -> out``.

One file per objective: :mod:`.flow_matching` (SiT-style stochastic interpolants) and
:mod:`.edm` (Karras et al., 2022); :mod:`.base` has the :class:`Objective` interface and
:mod:`.likelihood` the probability-flow ODE likelihood. Samplers are in
:mod:`workshop_dist.models.samplers`.
"""

from __future__ import annotations

from typing import Any

from workshop_dist.config import ConfigError
from workshop_dist.models.objectives.base import ConditioningConfig, Network, Objective, Samples
from workshop_dist.models.objectives.edm import EDM, EDMConfig
from workshop_dist.models.objectives.flow_matching import FlowMatching, FlowMatchingConfig

OBJECTIVES: dict[str, type[Objective]] = {"flow_matching": FlowMatching, "edm": EDM}


def create_objective(name: str, config: dict[str, Any] | ConditioningConfig | None = None) -> Objective:
    """The objective registered as ``name`` with its validated config (a ConfigError names what is wrong)."""
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](config)


__all__ = [
    "EDM",
    "OBJECTIVES",
    "ConditioningConfig",
    "EDMConfig",
    "FlowMatching",
    "FlowMatchingConfig",
    "Network",
    "Objective",
    "Samples",
    "create_objective",
]
