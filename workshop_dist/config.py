"""Configuration base: strict Pydantic models, YAML/JSON I/O and ``key.sub=value`` overrides.

Every subsystem declares its own ``Configuration`` class next to the code it configures
(``optim.py``, ``models/``, ``parallel.py``, ``data/`` ...) by subclassing
:class:`StrictConfig`; :mod:`workshop_dist.experiment` composes them into one root.
This module knows nothing about any subsystem, so everything may import it.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

from workshop_dist import storage  # imported early: it picks epath's Cloud Storage backend

T = TypeVar("T", bound="StrictConfig")


class WorkshopError(Exception):
    """A problem the user can fix (bad input, missing files, ...): shown as one message, no traceback."""

    exit_code = 1


class ConfigError(WorkshopError, ValueError):
    """A configuration problem; its message says what is wrong and how to fix it."""

    exit_code = 2


class StrictConfig(pydantic.BaseModel):
    """Base of every configuration section: unknown fields are errors with a suggestion."""

    model_config = pydantic.ConfigDict(extra="forbid", validate_assignment=True)

    @pydantic.model_validator(mode="before")
    @classmethod
    def _reject_unknown_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = set(cls.model_fields)
            for key in data:
                if isinstance(key, str) and key not in known:
                    raise ValueError(unknown_field_message(key, sorted(known)))
        return data

    def to_yaml(self) -> str:
        return yaml.dump(self.model_dump(mode="json"), Dumper=_Dumper, sort_keys=False)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2)

    def save(self, path: str | Path) -> None:
        """Write YAML (``.yaml``/``.yml``) or JSON (anything else) that :meth:`load` reads back."""
        suffix = storage.as_path(path).suffix
        storage.write_text(path, self.to_yaml() if suffix in (".yaml", ".yml") else self.to_json())

    @classmethod
    def load(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
        """Read a YAML or JSON file, apply ``section.field=value`` overrides, validate."""
        data = read_config_file(path)
        return cls.from_dict(data, overrides)

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any], overrides: list[str] | None = None) -> T:
        data = apply_overrides(data, overrides or [])
        try:
            return cls.model_validate(data)
        except pydantic.ValidationError as err:
            raise ConfigError(format_validation_error(err, cls.__name__)) from None


def ignored_fields(*names: str) -> Any:
    """A before-validator accepting ``names`` and dropping them (no state is kept for them).

    For fields the original design's API passes that nothing reads (e.g. ``name=``).
    Assign it to a class attribute: ``_ignore_name = ignored_fields("name")``.
    """

    def drop(cls: type, data: Any) -> Any:
        if isinstance(data, dict) and any(name in data for name in names):
            data = {key: value for key, value in data.items() if key not in names}
        return data

    return pydantic.model_validator(mode="before")(classmethod(drop))


def unknown_field_message(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown field '{key}'{hint} (valid fields: {', '.join(known)})"


def format_validation_error(err: pydantic.ValidationError, title: str = "configuration") -> str:
    """One readable paragraph: each problem with its dotted location."""
    lines = []
    for problem in err.errors():
        where = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        message = problem["msg"].removeprefix("Value error, ")
        given = problem.get("input")
        shown = "" if isinstance(given, dict) or given is None else f" (got {given!r})"
        lines.append(f"  {where}: {message}{shown}")
    count = len(lines)
    return f"Invalid {title} ({count} problem{'s' if count > 1 else ''}):\n" + "\n".join(lines)


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes strings like ``"1e3"`` the loader would read as floats."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
        list("-+0123456789."),
    )


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = storage.as_path(path, absolute=False)  # messages show the path as given
    if not path.is_file():
        raise ConfigError(f"Config file not found: {path}. Pass an existing YAML or JSON file.")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else parse_yaml(text)
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise ConfigError(f"Config file {path} is not valid YAML/JSON: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of sections, not {type(data).__name__}.")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``a.b.c=value`` set; values are parsed as YAML."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"Override '{item}' is not of the form section.field=value.")
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"Override '{item}': '{part}' is a value, not a section.")
            node = child
        try:
            node[parts[-1]] = parse_yaml(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"Override '{item}': the value is not valid YAML ({err}).") from None
    return data
