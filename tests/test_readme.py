"""The README is the front door: its Python example runs as written and CI runs its commands."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def python_block(after_heading: str) -> str:
    section = README.split(after_heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_python_api_example_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(python_block("## Python API"), "README.md", "exec"), namespace)
    epochs = re.findall(r"epoch \d+: train ([\d.]+), val ([\d.]+)", capsys.readouterr().out)
    assert len(epochs) == 5
    assert float(epochs[-1][1]) < float(epochs[0][1])
    assert namespace["samples"].shape == (16, 8, 8, 1)
    assert (tmp_path / "experiments" / "vae" / "final.ckpt" / "state").is_dir()


def test_ci_runs_the_readme_install_and_test_commands():
    quickstart = README.split("## Quickstart", 1)[1].split("##", 1)[0]
    ci = (REPO / ".ci" / "run").read_text()
    assert 'pip install ".[test]" && python -m pytest -q' in quickstart
    assert 'pip install --quiet ".[test]"' in ci and "python -m pytest -q" in ci
    assert "pip install . && workshop-train" in quickstart
