"""Dependencies: a missing or broken package is named with its root cause and a fix, and
TensorBoard event files need no TensorFlow."""

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from workshop_dist._deps import DependencyError, require, require_tfds
from workshop_dist.config import WorkshopError


def test_missing_module_names_the_package_and_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)  # what an uninstalled module looks like to import
    with pytest.raises(DependencyError) as info:
        require("yaml", "read YAML configs", extra="yamlstuff")
    message = str(info.value)
    assert "'yaml' (package PyYAML) is not installed; it is needed to read YAML configs." in message
    assert 'pip install "workshop-dist[yamlstuff]"' in message
    # One error type for the CLI (WorkshopError: a message, no traceback) and for callers
    # that treat optional imports as ImportError.
    assert isinstance(info.value, WorkshopError) and isinstance(info.value, ImportError)
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_swallowed_import_error_is_found_with_its_culprit_package(tmp_path, monkeypatch):
    """A package that hides its failure (as TFDS does) and a protobuf gencode/runtime mismatch."""
    package = tmp_path / "hidingpkg"
    package.mkdir()
    (package / "__init__.py").write_text(
        "try:\n    from hidingpkg import core\nexcept Exception:\n    pass  # like tensorflow_datasets\n"
    )
    (package / "core.py").write_text(
        textwrap.dedent(
            """
            from google.protobuf import runtime_version
            # What generated code does first: made by a protobuf far newer than the runtime.
            runtime_version.ValidateProtobufRuntimeVersion(runtime_version.Domain.PUBLIC, 99, 0, 0, "", "x.proto")
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "hidingpkg", raising=False)
    monkeypatch.delitem(sys.modules, "hidingpkg.core", raising=False)

    with pytest.raises(DependencyError) as info:
        require("hidingpkg", "do things", attributes=("core",))
    message = str(info.value)
    assert "'hidingpkg' (package hidingpkg) fails to import" in message
    assert "The failure comes from package protobuf " in message  # with its version
    assert "cause: VersionError: " in message and "99.0.0" in message
    assert "fix: pip install --upgrade hidingpkg protobuf" in message
    assert "has no attribute" not in message


@pytest.mark.slow
def test_broken_tfds_surfaces_the_root_cause_not_an_attribute_error():
    """The reported failure: TFDS importing with a broken dependency, then ``tfds.core``.

    In a fresh interpreter (TFDS's modules must load from scratch): one module TFDS needs
    fails to import, TFDS logs and swallows that, and opening a TFDS source must say so.
    """
    script = textwrap.dedent(
        """
        import sys
        sys.modules["tensorflow_metadata.proto.v0.schema_pb2"] = None  # a broken install
        from workshop_dist.config import WorkshopError
        from workshop_dist.data.config import DataConfiguration
        from workshop_dist.data.sources import open_source
        try:
            open_source(DataConfiguration(source="tfds:mnist"), "train")
        except WorkshopError as err:
            print(err)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'tensorflow_datasets' (package tensorflow-datasets " in result.stdout
    assert "workshop_dist cannot read TFDS datasets" in result.stdout
    assert "tensorflow_metadata.proto.v0.schema_pb2" in result.stdout  # the underlying exception
    assert "fix: pip install --upgrade tensorflow-datasets tensorflow-metadata" in result.stdout
    assert "has no attribute 'core'" not in result.stdout


def test_working_dependency_is_the_module_and_missing_attributes_are_caught():
    import json

    import tensorflow_datasets

    assert require_tfds("read TFDS datasets") is tensorflow_datasets
    assert require("json", "parse JSON", attributes=("loads",)) is json
    with pytest.raises(DependencyError, match=r"'json' \(package json\) fails to import"):
        require("json", "parse JSON", attributes=("no_such_function",))  # as a half-imported package looks


@pytest.mark.slow
def test_event_files_need_no_tensorflow(tmp_path):
    """With TensorFlow unimportable, metrics still reach event files TensorBoard can read."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["tensorflow"] = None  # as if not installed, even where it is
        import numpy as np
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        from tensorboard.util import tensor_util
        from workshop_dist.metrics import MetricsLogger

        logger = MetricsLogger({str(tmp_path)!r}, enabled=True)
        logger.log_hparams({{"lr": 0.1, "name": "x"}})
        for step in (1, 2):
            logger.log_metrics(step, {{"loss": 1.5 / step}})
        logger.log_images(2, {{"samples": np.linspace(0, 1, 2 * 4 * 4).reshape(2, 4, 4, 1)}})
        logger.close()
        events = EventAccumulator({str(tmp_path)!r}, size_guidance={{"tensors": 0}})
        events.Reload()
        print([(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in events.Tensors("train/loss")])
        image = tensor_util.make_ndarray(events.Tensors("samples")[0].tensor_proto)
        print(image[:2].tolist(), len(image), image[2][:4])
        print("_hparams_/session_start_info" in events.PluginTagToContent("hparams"))
        print("tensorflow" in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None])
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [
        "[(1, 1.5), (2, 0.75)]",
        "[b'4', b'4'] 4 b'\\x89PNG'",
        "True",
        "False",
    ]


def test_lower_bounds_file_pins_every_lower_bound():
    """.ci/lower-bounds.txt (the Python 3.11 CI leg) pins exactly pyproject's ``>=`` bounds."""
    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    bounds = {}
    for line in [*project["dependencies"], *project["optional-dependencies"]["test"]]:
        requirement = Requirement(line)
        [minimum] = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        bounds[canonicalize_name(requirement.name)] = Version(minimum)
    pins = {}
    for line in (root / ".ci" / "lower-bounds.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = Version(version)
    pins.pop("jaxlib")  # jax's own dependency, pinned beside it
    assert pins == bounds


@pytest.mark.slow
def test_deprecations_in_our_code_fail_the_tests(tmp_path):
    """pyproject's filterwarnings: a deprecated flax call made from a workshop_dist module errors,
    the same call made from elsewhere only warns."""
    (tmp_path / "test_probe.py").write_text(
        textwrap.dedent(
            """
            import types
            import jax.numpy as jnp
            from flax import nnx

            CALL = "def read(p):\\n    return p.value\\n"  # '.value' is deprecated in flax 0.12

            def caller(name):
                module = types.ModuleType(name)
                exec(CALL, module.__dict__)
                return module.read

            def test_from_workshop_dist():
                caller("workshop_dist.some_module")(nnx.Param(jnp.ones(2)))

            def test_from_elsewhere():
                caller("someone_else")(nnx.Param(jnp.ones(2)))
            """
        )
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(root / "pyproject.toml"),
         "--rootdir", str(tmp_path), str(tmp_path / "test_probe.py")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout[-3000:]
    assert "FAILED test_probe.py::test_from_workshop_dist - DeprecationWarning" in result.stdout
    assert "1 failed, 1 passed, 1 warning" in result.stdout  # the other call still warns
