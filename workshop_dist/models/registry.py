"""Model registry and factory: ``model_class`` is a short registered name or a dotted import path.

A model class is an ``nnx.Module`` built as ``cls(config: ModelConfiguration, *, rngs)``
following the contract in :mod:`workshop_dist.models.base`. A class may declare ``Parameters`` (a :class:`~workshop_dist.config.StrictConfig`) to validate
``config.parameters``.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Any, TypeVar

import pydantic
from flax import nnx

from workshop_dist.config import ConfigError, format_validation_error
from workshop_dist.models.config import ModelConfiguration

_REGISTRY: dict[str, type] = {}
_ADAPTERS: dict[str, Callable[[type | str], type]] = {}  # package -> wraps that package's model classes
C = TypeVar("C", bound=type)


def register_model(name: str) -> Callable[[C], C]:
    """Class decorator: make ``model_class: <name>`` build this class."""

    def add(cls: C) -> C:
        _REGISTRY[name] = cls
        return cls

    return add


def register_adapter(package: str, adapt: Callable[[type | str], type]) -> None:
    """For outside libraries whose models have their own constructors and objectives (avitai-artifex).

    ``model_class: package:Name`` or ``package.module.Name`` resolves to ``adapt(model_class)``; a
    class elsewhere that derives from the package's classes (and has no ``example_losses``)
    resolves to ``adapt(cls)``.
    """
    _ADAPTERS[package] = adapt


def registered_models() -> list[str]:
    return sorted(_REGISTRY)


def resolve_model_class(model_class: str) -> type:
    if model_class in _REGISTRY:
        return _REGISTRY[model_class]
    package = model_class.partition(":")[0].partition(".")[0]
    if package in _ADAPTERS and package != model_class:  # 'artifex:VAE' or 'artifex.generative_models....VAE'
        return _ADAPTERS[package](model_class)
    if "." not in model_class:
        close = difflib.get_close_matches(model_class, _REGISTRY, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(
            f"model.model_class '{model_class}' is not a registered model ({', '.join(registered_models())})"
            f" nor a dotted import path like 'package.module.Class'.{hint}"
        )
    module_name, _, attr = model_class.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"model.model_class '{model_class}': cannot import module '{module_name}' ({err}).") from None
    cls = getattr(module, attr, None)
    if not isinstance(cls, type):
        raise ConfigError(f"model.model_class '{model_class}': module '{module_name}' has no class '{attr}'.")
    if not hasattr(cls, "example_losses"):  # a user's subclass of an outside library's model
        for base in cls.__mro__:
            adapt = _ADAPTERS.get(base.__module__.partition(".")[0])
            if adapt is not None:
                return adapt(cls)
    return cls


def validate_parameters(cls: type, config: ModelConfiguration) -> Any:
    """The model's validated ``Parameters`` object (or the raw dict if it declares none)."""
    schema = getattr(cls, "Parameters", None)
    if schema is None:
        return dict(config.parameters)
    try:
        return schema.model_validate(config.parameters)
    except pydantic.ValidationError as err:
        raise ConfigError(format_validation_error(err, "model.parameters")) from None


def create_model(config: ModelConfiguration, *, rngs: nnx.Rngs | int = 0) -> nnx.Module:
    """Build the model ``config`` describes; ``rngs`` seeds its initialisation.

    The model's layers take their compute and storage dtypes (``config.dtype``, ``config.param_dtype``)
    when they are built (:func:`workshop_dist.models.layers.dtypes`); nothing is cast afterwards.
    """
    cls = resolve_model_class(config.model_class)
    select = getattr(cls, "select_class", None)  # a family whose parameters pick the class (objective)
    if select is not None:
        cls = select(config)
    if isinstance(rngs, int):
        rngs = nnx.Rngs(rngs)
    return cls(config, rngs=rngs)
