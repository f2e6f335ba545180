"""Shared set-up of the benchmark scripts."""

from __future__ import annotations

import os


def use_cpu_devices(count: int) -> None:
    """Simulate ``count`` CPU devices (0: leave JAX on the machine's real devices). Call first."""
    if count:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        import jax

        jax.config.update("jax_num_cpu_devices", count)


def digits_images():
    """The built-in digits' training images, float32 [1000, 8, 8, 1] in [0, 1]."""
    import numpy as np

    from workshop_dist.data.digits import load_digits_split

    return load_digits_split("train")["image"].astype(np.float32) / 16.0
