"""Import third-party modules with one clear error when they are missing or broken.

A broken dependency rarely says so: TensorFlow Datasets catches the exception of a failed
import (say protobuf generated code newer than the installed runtime), logs it, and leaves a
module without ``core``, so the user later sees ``AttributeError: module
'tensorflow_datasets' has no attribute 'core'``. :func:`require` imports the module, touches
the attributes the caller needs, and when anything fails re-imports the failing submodule to
find the root cause, then raises a :class:`DependencyError` naming the package, the
underlying exception and a pip command that fixes it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from workshop_dist.config import WorkshopError

PROJECT = "workshop-dist"


class DependencyError(WorkshopError, ImportError):
    """A third-party package is missing or fails to import; the message says how to fix it."""


def require(
    module: str, purpose: str, *, extra: str | None = None, attributes: Sequence[str] = ()
) -> ModuleType:
    """``importlib.import_module(module)``, or a :class:`DependencyError` explaining the failure.

    ``purpose`` completes "needed to ...". ``extra`` is the ``workshop-dist[extra]`` that
    installs the module, if it is optional. ``attributes`` are looked up after the import
    (submodules included), so a package that swallowed its own import error is caught here
    rather than at first use.
    """
    try:
        loaded = importlib.import_module(module)
        for name in attributes:
            getattr(loaded, name)
    except Exception as err:
        raise dependency_error(module, purpose, extra, _root_cause(module, attributes, err)) from err
    return loaded


def require_tfds(purpose: str) -> ModuleType:
    """``tensorflow_datasets``, checked: it swallows its own import errors and returns a
    module without ``core``; asking for ``core`` and ``data_source`` surfaces the cause."""
    return require("tensorflow_datasets", purpose, attributes=("core", "data_source"))


def _root_cause(module: str, attributes: Sequence[str], err: Exception) -> BaseException:
    """The exception behind ``err``: a missing attribute is retried as a submodule import."""
    if isinstance(err, AttributeError) and module in sys.modules:
        for name in attributes:
            if not hasattr(sys.modules[module], name):
                try:
                    importlib.import_module(f"{module}.{name}")
                except Exception as cause:
                    return cause
    return err


def dependency_error(module: str, purpose: str, extra: str | None, cause: BaseException) -> DependencyError:
    """The :class:`DependencyError` for ``module`` failing with ``cause``."""
    top = module.split(".")[0]
    distribution = _distribution(top) or top.replace("_", "-")
    # Missing: the module asked for, or a package above it (not a submodule an installed package lacks).
    absent = cause.name or "" if isinstance(cause, ModuleNotFoundError) else ""
    missing = bool(absent) and (module == absent or module.startswith(absent + "."))
    if missing:
        headline = f"'{module}' (package {distribution}) is not installed; it is needed to {purpose}."
        fix = f'pip install "{PROJECT}[{extra}]"' if extra else f"pip install {distribution}"
    else:
        culprit = _culprit(cause) or distribution
        headline = (
            f"'{module}' (package {_describe(distribution)}) fails to import, so workshop_dist cannot "
            f"{purpose}. The failure comes from package {_describe(culprit)}."
        )
        packages = " ".join(dict.fromkeys([distribution, culprit]))
        fix = f"pip install --upgrade {packages}  (then `pip check` lists remaining version conflicts)"
        if extra:
            fix += f', or reinstall with pip install --force-reinstall "{PROJECT}[{extra}]"'
    message = f"{headline}\n  cause: {type(cause).__name__}: {cause}\n  fix: {fix}"
    return DependencyError(message, name=module)


def _distribution(top_level: str) -> str | None:
    """The installed distribution that provides the top-level module ``top_level``."""
    names = importlib.metadata.packages_distributions().get(top_level, [])
    return names[0] if names else None


def _describe(distribution: str) -> str:
    """``name version`` when installed, else ``name``."""
    try:
        return f"{distribution} {importlib.metadata.version(distribution)}"
    except importlib.metadata.PackageNotFoundError:
        return distribution


def _culprit(cause: BaseException) -> str | None:
    """The distribution whose code raised ``cause`` (the innermost traceback frame in site-packages).

    A missing module names itself (``ModuleNotFoundError.name``); otherwise the deepest frame
    under a ``site-packages`` directory tells which package's code gave up.
    """
    if isinstance(cause, ModuleNotFoundError) and cause.name:
        top = cause.name.split(".")[0]
        return _distribution(top) or top
    for frame in reversed(traceback.extract_tb(cause.__traceback__)):
        parts = Path(frame.filename).parts
        for marker in ("site-packages", "dist-packages"):
            if marker in parts[:-1]:
                return _owner(Path(*parts[parts.index(marker) + 1 :]))
    return None


def _owner(relative: Path) -> str:
    """The distribution that installed ``relative`` (a path under site-packages).

    Several distributions can share a top-level package (``google`` holds protobuf and
    googleapis-common-protos), so the file lists decide.
    """
    top = Path(relative.parts[0]).stem
    candidates = importlib.metadata.packages_distributions().get(top, [])
    for name in candidates:
        files = importlib.metadata.files(name) or []
        if any(Path(file) == relative for file in files):
            return name
    return candidates[0] if candidates else top
