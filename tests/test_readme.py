"""The README is the front door: its Python example runs as written, and its Quickstart
commands are the ones CI really runs (read from ``bash .ci/run --plan``, not from fixed text)."""

import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def python_block(after_heading: str) -> str:
    section = README.split(after_heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow  # trains 5 epochs
def test_python_api_example_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(python_block("## Python API"), "README.md", "exec"), namespace)
    epochs = re.findall(r"epoch \d+: train ([\d.]+), val ([\d.]+)", capsys.readouterr().out)
    assert len(epochs) == 5
    assert float(epochs[-1][1]) < float(epochs[0][1])
    assert namespace["samples"].shape == (16, 8, 8, 1)
    assert (tmp_path / "experiments" / "vae" / "final.ckpt" / "state").is_dir()


def quickstart() -> tuple[str, list[list[str]]]:
    """The Quickstart's prose and its shell commands (each ``&&`` part as an argv list)."""
    section = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = [
        shlex.split(part)
        for line in block.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
        for part in line.split("&&")
    ]
    return section, commands


def ci_plan() -> dict[str, dict]:
    """What each CI leg installs and runs, as ``.ci/run`` itself reports it."""
    result = subprocess.run(["bash", str(REPO / ".ci" / "run"), "--plan"], capture_output=True, text=True, check=True)
    legs: dict[str, dict] = {}
    for line in result.stdout.splitlines():
        kind, _, rest = line.partition(" ")
        head, _, command = rest.partition(": ")
        if kind == "install":
            leg, python = head.split()
            legs[leg] = {"python": python.removeprefix("python"), "install": shlex.split(command), "tests": []}
        else:
            legs[head]["tests"].append(shlex.split(command))
    return legs


def without_constraints(install: list[str]) -> list[str]:
    """``pip install -c FILE X`` -> ``pip install X``: the same install, pinned to the lower bounds."""
    out, skip = [], False
    for token in install:
        if skip:
            skip = False
        elif token == "-c":
            skip = True
        else:
            out.append(token)
    return out


@pytest.mark.slow  # runs .ci/run --plan in bash
def test_the_quickstart_test_commands_are_what_ci_runs():
    _, commands = quickstart()
    legs = ci_plan()
    test_install = next(c for c in commands if c[:2] == ["pip", "install"] and any("[test]" in t for t in c))
    pytest_runs = [c for c in commands if c[:3] == ["python", "-m", "pytest"]]
    assert pytest_runs, "the Quickstart shows no test command"
    for run in pytest_runs:
        ran_by = [leg for leg, plan in legs.items() if run in plan["tests"]]
        assert ran_by, f"Quickstart runs {shlex.join(run)!r}, which no CI leg runs: {legs}"
        for leg in ran_by:  # installed as the README says (a leg may add packages, e.g. PyTorch for parity tests)
            ci_install = without_constraints(legs[leg]["install"])
            assert ci_install[: len(test_install)] == test_install, (leg, legs[leg]["install"])
    # The full suite is run on the newest releases, the fast set on the lowest ones.
    assert any(run[:4] == ["python", "-m", "pytest", "-q"] and "-m" not in run[4:] for run in legs["newest"]["tests"])
    assert ["python", "-m", "pytest", "-q", "-m", "not slow"] in legs["lowest"]["tests"]


@pytest.mark.slow  # runs .ci/run --plan in bash
def test_the_quickstart_python_is_the_oldest_one_supported_and_tested():
    prose, _ = quickstart()
    [claimed] = re.findall(r"Python (\d+\.\d+)\+", prose)
    requires = SpecifierSet(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"])
    assert requires.contains(claimed) and not requires.contains(f"{Version(claimed).major}.{Version(claimed).minor - 1}")
    assert min((plan["python"] for plan in ci_plan().values()), key=Version) == claimed


def test_the_quickstart_train_command_is_an_installed_entry_point():
    _, commands = quickstart()
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    trains = [c for c in commands if c and c[0] in scripts]
    assert trains, "the Quickstart runs none of the project's commands"
    from workshop_dist.cli import default_config_path

    assert default_config_path().is_file()  # `workshop-train` with no arguments has a config to run


def console_examples(section: str) -> list[tuple[list[str], str]]:
    """The ``$ workshop-train ...`` commands of a section's console blocks, each with the output shown under it."""
    body = README.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    examples = []
    for block in re.findall(r"```console\n(.*?)```", body, re.S):
        for chunk in re.split(r"^\$ ", block, flags=re.M)[1:]:
            command, _, output = chunk.partition("\n")
            examples.append((shlex.split(command), output))
    return examples


def test_the_configuration_error_example_is_what_workshop_train_prints(tmp_path, monkeypatch, capsys):
    from workshop_dist import cli

    [(command, shown)] = console_examples("Configuration")
    assert command[0] == "workshop-train"
    monkeypatch.chdir(tmp_path)  # the default ./workdir, if anything were written
    code = cli.main(command[1:])
    out, err = capsys.readouterr()
    assert code == 2 and out + err == shown
    assert list(tmp_path.iterdir()) == []  # writes nothing
