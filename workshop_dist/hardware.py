"""Peak compute of accelerators, for model FLOPs utilization (MFU).

MFU = (FLOPs per step / step time) / (devices x peak FLOP/s per device). FLOPs per step come
from XLA's cost analysis of the compiled step. Peaks are the vendors' dense bf16 (matrix
unit) figures per chip: a float32 model therefore reports a low MFU by construction.
Devices not listed (CPUs included) report no MFU.

| device_kind contains | peak dense bf16 FLOP/s per device |
|---|---|
| TPU v2 | 45e12 (per chip) |
| TPU v3 | 123e12 (per chip) |
| TPU v4 | 275e12 |
| TPU v5 lite (v5e) | 197e12 |
| TPU v5 / v5p | 459e12 |
| TPU v6 lite (Trillium, v6e) | 918e12 |
| A100 | 312e12 |
| H100, H200 (SXM) | 989e12 |
| B200 | 2250e12 |
"""

from __future__ import annotations

import glob

import jax

# Checked in order: more specific names first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("TPU v6 lite", 918e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
    ("TPU v2", 45e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("B200", 2250e12),
)


def peak_flops(device: jax.Device | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of one ``device`` (default: the first), or None if unknown."""
    kind = (device or jax.devices()[0]).device_kind
    return next((peak for name, peak in PEAK_BF16_FLOPS if name in kind), None)


def tpu_chips_attached() -> bool:
    """Whether this machine has TPU chips: ``/dev/accel*`` (up to v4) or VFIO groups (v5e, v5p, v6e).

    Reads ``/dev`` only, so it is safe before any JAX backend starts.
    """
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))
