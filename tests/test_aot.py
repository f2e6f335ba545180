"""Ahead-of-time compilation for TPU slices on this CPU machine (``--dry-run --target``).

libtpu (the TPU compiler, in the test extra) compiles the real training step for compile-only
TPU devices, so these tests need no TPU. Compiles are the slow part (5-10 s each on 2 cores):
one per target below, plus one that the TPU compiler refuses.
"""

import importlib.metadata
import math
import platform
import sys

import pytest

from workshop_dist import aot, cli
from workshop_dist._deps import DependencyError
from workshop_dist.config import ConfigError


def _has_libtpu() -> bool:
    try:
        importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# libtpu ships for Linux x86_64; there it is part of ".[test]", so a missing one is a failure.
LIBTPU_PLATFORM = sys.platform == "linux" and platform.machine() == "x86_64"


@pytest.fixture
def libtpu() -> None:
    if not _has_libtpu():
        if LIBTPU_PLATFORM:
            pytest.fail('libtpu is not installed; it is in the test extra: pip install -e ".[test]"')
        pytest.skip(f"libtpu has no wheel for {sys.platform}/{platform.machine()}")


# ----------------------------------------------------------------------------- targets (no compiler)


@pytest.mark.parametrize(
    ("spec", "chips", "slices", "topology", "accelerator_type"),
    [
        ("tpu:v5e-8", 8, 1, "v5e:2x4", "v5litepod-8"),
        ("tpu:v5e-256", 256, 1, "v5e:16x16", "v5litepod-256"),
        ("tpu:v5litepod-16x2", 32, 2, "v5e:4x4", "v5litepod-16"),
        ("tpu:v6e-1", 1, 1, "v6e:1x1", "v6e-1"),
        ("tpu:v5p-8", 4, 1, "v5:2x2x1", "v5p-8"),  # v4 / v5p count TensorCores, 2 per chip
        ("tpu:v5p-128", 64, 1, "v5:4x4x4", "v5p-128"),
        ("tpu:v5p-384", 192, 1, "v5:4x4x12", "v5p-384"),
        ("tpu:v5p-768", 384, 1, "v5:4x8x12", "v5p-768"),
        ("TPU:V4-32x4", 64, 4, "v4:2x2x4", "v4-32"),
    ],
)
def test_targets_follow_cloud_tpu_names(spec, chips, slices, topology, accelerator_type):
    target = aot.parse_target(spec)
    assert (target.chips, target.slices, target.topology, target.accelerator_type) == (
        chips,
        slices,
        topology,
        accelerator_type,
    )


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("v5e-8", "is not a TPU target; use tpu:<type>-<size>[x<slices>], e.g. tpu:v5e-8, tpu:v5p-128"),
        ("gpu:h100-8", "is not a TPU target"),
        ("tpu:v5x-8", "unknown TPU type 'v5x'; known: v4, v5p, v5e, v6e"),
        ("tpu:v5p-12", "counts TensorCores (2 per chip)"),
        ("tpu:v5e-12", "counts chips: n is one of 1, 4, 8, 16, 32, 64, 128, 256"),
        ("tpu:v5e-8x0", "is not a TPU target"),
    ],
)
def test_bad_target_names_the_valid_forms(spec, says):
    with pytest.raises(ConfigError, match="--target") as info:
        aot.parse_target(spec)
    assert says in str(info.value)


def test_hbm_and_peak_tables_cover_every_type():
    for generation, kind in {
        "v4": "TPU v4",
        "v5e": "TPU v5 lite",
        "v5p": "TPU v5",
        "v6e": "TPU v6 lite",
    }.items():
        assert aot.HBM_GIB[generation] > 0
        assert any(name in kind for name, _ in aot.hardware.PEAK_BF16_FLOPS)


def test_missing_or_mismatched_libtpu_says_what_to_install(monkeypatch):
    real_version = importlib.metadata.version

    def version(name, installed):
        if name != "libtpu":
            return real_version(name)
        if installed is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed

    wanted = aot.libtpu_requirement()
    assert wanted and wanted.startswith("==0.0.")  # from jax's own [tpu] extra
    monkeypatch.setattr(importlib.metadata, "version", lambda name: version(name, None))
    with pytest.raises(DependencyError, match=r'pip install "workshop-dist\[tpu-aot\]"') as info:
        aot.check_libtpu()
    assert f"libtpu{wanted}" in str(info.value)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: version(name, "0.0.1"))
    with pytest.raises(DependencyError, match=r"libtpu 0\.0\.1 is installed, but jax"):
        aot.check_libtpu()


def test_target_needs_dry_run(capsys):
    assert cli.main(["--target", "tpu:v5e-8"]) == 2
    assert "use it with --dry-run" in capsys.readouterr().err


def test_bad_target_on_the_command_line(capsys):
    assert cli.main(["--dry-run", "--target", "tpu:v9-8"]) == 2
    err = capsys.readouterr().err
    assert "unknown TPU type 'v9'" in err and "tpu:v5e-256x2" in err


# ----------------------------------------------------------------------------- compiled for TPU


def test_fsdp_on_v5e_8_fits_with_plausible_numbers(libtpu):
    """One slice, state sharded 8 ways: per-chip arguments are the sharded state plus the batch."""
    config = cli.load_config(None, ["model.hidden_dims=[1024,1024]", "mesh.data=1", "mesh.fsdp=-1"])
    report = aot.compile_for_target(config, "tpu:v5e-8")

    assert report.fits and report.device_kind == "TPU v5 lite" and report.mesh_shape["fsdp"] == 8
    # params + Adam's two moments, float32; FSDP shards every large parameter over 8 chips
    full_state = 3 * 4 * report.parameters
    assert full_state / 8 <= report.state_bytes < 1.05 * full_state / 8
    assert (
        report.state_bytes + report.batch_bytes
        <= report.argument_bytes
        < 1.1 * (report.state_bytes + report.batch_bytes)
    )
    assert (
        report.total_bytes
        == report.argument_bytes + report.output_bytes + report.temp_bytes + report.code_bytes
    )
    assert report.temp_bytes > 0 and report.total_bytes < report.target.hbm_bytes == 16 * 2**30
    # forward + backward = ~6 FLOPs per parameter and example; 16 examples per chip
    assert 0.8 < report.flops_per_chip / (6 * report.parameters * 128 / 8) < 1.5
    assert report.step_seconds() == pytest.approx(report.flops_per_chip / (197e12 * 0.5))
    text = report.format()
    for line in (
        "8 chips (TPU v5 lite, 1 slice, topology v5e:2x4)",
        "of 16.00 GiB HBM",
        "arguments",
        "temporaries",
        "fits)",
        "per chip",
        "at 50% MFU of 197 TFLOP/s",
    ):
        assert line in text


def test_two_v5p_slices_over_dcn_from_the_command_line(libtpu, capsys):
    """Two slices: the data axis spans them (dcn_data), the default VAE fits with room to spare,
    also with a global batch larger than the 1000 training images (shapes need no real epoch)."""
    assert cli.main(["--dry-run", "--target", "tpu:v5p-16x2", "training.batch_size=2048"]) == 0
    out = capsys.readouterr().out
    assert "16 chips (TPU v5, 2 slices of 8, topology v5:2x2x2)" in out
    assert "mesh.dcn_data=2" in out and "'data': 16" in out and "global batch 2048 (128 per data shard)" in out
    assert "of 95.00 GiB HBM" in out and "fits)" in out
    assert "has 1000 examples, fewer than one batch of 2048" in out
    flops = float(out.split("FLOPs per step")[1].split()[0])
    parameters = int(out.split("parameters")[1].split()[0].replace(",", ""))
    assert 0.8 < flops / (6 * parameters * 128) < 1.5  # forward + backward of 128 examples per chip


def test_too_big_for_the_chip_names_the_shortfall_and_the_fixes(libtpu, capsys):
    """A 2-billion-parameter VAE replicated on every 16 GiB chip: the TPU compiler refuses it."""
    code = cli.main(["--dry-run", "--target", "tpu:v5e-8", "model.hidden_dims=[32768,32768]"])
    err = capsys.readouterr().err
    assert code == 2
    assert "does not fit on tpu:v5e-8 (16 GiB HBM per chip)" in err
    short = float(err.split(" short")[0].split(", ")[-1].split()[0])
    assert short > 1 and "GiB" in err.split(" short")[0]
    assert "state per chip (params, optimizer state): 24." in err  # 2.15e9 params x 12 bytes
    # the state dominates, so sharding it comes first, with the mesh that does it
    assert (
        err.index("mesh.data=1 mesh.fsdp=-1")
        < err.index("training.performance.grad_accum_steps=2")
        < err.index("training.batch_size")
    )
    assert "model.remat=full" in err
    assert math.isfinite(short)


def test_batch_shapes_come_from_the_data_or_else_from_the_model(tmp_path):
    """One example of the digits (image and label); a data set not readable here falls back to
    float32 images of model.input_dim, with a note saying so."""
    spec, num_examples, note = aot._example_spec(cli.load_config(None, []))
    assert {k: (v.shape, str(v.dtype)) for k, v in spec.items()} == {"image": ((8, 8, 1), "float32"), "label": ((), "int32")}
    assert num_examples == 1000 and note is None
    config = cli.load_config(None, ["data.source=tfds:not_here", f"data.data_dir={tmp_path}", "model.input_dim=[32,32,3]"])
    spec, num_examples, note = aot._example_spec(config)
    assert {k: v.shape for k, v in spec.items()} == {"image": (32, 32, 3)} and num_examples is None
    assert note.startswith("note: data not readable here (")
