"""Smoke test of benchmarks/digits_quality.py: the VAE family, a few steps, the whole pipeline
(train through the CLI, load the checkpoint, NLL, FD, grid, table)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_benchmark():
    spec = importlib.util.spec_from_file_location("digits_quality", ROOT / "benchmarks" / "digits_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_vae_run_prints_a_table_and_writes_a_grid(tmp_path, capsys):
    bench = load_benchmark()
    args = [
        "--families",
        "vae",
        "--quick",
        "--workdir",
        str(tmp_path / "runs"),
        "--grids",
        str(tmp_path / "grids"),
    ]
    args += ["--out", str(tmp_path / "table.md")]
    if not (ROOT / bench.FAMILIES["vae"][0]).exists():  # the discrete VAE's config is not written yet
        args += ["--config", "vae=configs/vae_digits.yaml"]
    assert bench.main(args) == 0
    table = (tmp_path / "table.md").read_text().strip().splitlines()
    assert table[0].startswith("| family |") and len(table) == 3
    cells = [cell.strip() for cell in table[2].strip("|").split("|")]
    assert cells[0] == "vae" and cells[2] == "3"  # three training steps
    assert float(cells[4]) > 0  # a test NLL in nats per image
    assert float(cells[5]) > 0 and float(cells[6]) > 0  # FD and FD / floor
    assert (tmp_path / "grids" / "vae.png").stat().st_size > 0
    assert "skip" not in capsys.readouterr().out


@pytest.mark.slow
def test_missing_configs_are_skipped_with_a_clear_line(tmp_path, capsys):
    bench = load_benchmark()
    assert (
        bench.main(["--families", "gan", "--config", "gan=configs/no_such.yaml", "--workdir", str(tmp_path)])
        == 0
    )
    out = capsys.readouterr().out
    assert "skip gan: configs/no_such.yaml does not exist yet" in out


def test_unknown_family_is_an_error():
    with pytest.raises(SystemExit):
        load_benchmark().main(["--families", "gpt"])
