"""Which JAX backends a run starts, so that an installed but idle libtpu stays silent.

With ``libtpu`` installed (``jax[tpu]``, the ``test`` and ``tpu-aot`` extras) and
``JAX_PLATFORMS`` unset, JAX tries every backend it knows when the devices are first used,
the TPU one too, even on a machine without TPU chips. libtpu then looks for the slice's
topology and prints, on every CPU or GPU run::

    Failed to find host bounds for accelerator type: WARNING: could not determine TPU accelerator type ...
    E0000 ... INVALID_ARGUMENT: Error: unexpected worker hostname 'WARNING: could not determine TPU
    worker hostnames or IP addresses' ...

before JAX quietly falls back to the other backends. It also takes ``/tmp/libtpu_lockfile``
for as long as the process lives (while another process holds it, libtpu says nothing, which
is why the noise seemed to come and go). :func:`skip_idle_tpu_backend` makes the
entry points ask for what JAX would have ended up with anyway (the visible GPUs' plugin and
the CPU) when this host has no TPU chip, so the TPU backend is never started. It changes
nothing when the user chose ``JAX_PLATFORMS`` (any value), when a TPU may be attached, when
libtpu is not installed, or when a JAX plugin of an unknown kind is installed (its platform
name cannot be known without importing it). Compiling for a TPU target on a CPU machine
(``--dry-run --target tpu:...``, :mod:`workshop_dist.aot`) does not need the TPU backend:
libtpu describes the slice through :mod:`jax.experimental.topologies`.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys
from collections.abc import Iterable, MutableMapping
from pathlib import Path

GOOGLE_PCI_VENDOR = "0x1ae0"
NETWORK_PCI_CLASS = "0x02"  # Google's gVNIC network card shares the vendor id


def tpu_may_be_attached(sys_root: str = "/", dev_root: str = "/dev") -> bool:
    """Whether this host may have a TPU chip (errs on the side of yes).

    TPU chips are PCI devices of Google's vendor id that are not network cards, and appear
    as ``/dev/accel*`` (v2-v5e) or ``/dev/vfio/<n>`` (v5p, v6e and later).
    """
    if glob.glob(f"{dev_root}/accel*") or glob.glob(f"{dev_root}/vfio/[0-9]*"):
        return True
    for vendor in glob.glob(os.path.join(sys_root, "sys/bus/pci/devices/*/vendor")):
        device = Path(vendor).parent
        try:
            if vendor_id(device) == GOOGLE_PCI_VENDOR and not (device / "class").read_text().startswith(NETWORK_PCI_CLASS):
                return True
        except OSError:
            continue
    return False


def vendor_id(device: Path) -> str:
    return (device / "vendor").read_text().strip().lower()


def jax_plugin_modules() -> list[str]:
    """Names of the installed JAX plugin modules (found as JAX finds them, without importing them)."""
    names = {entry.value for entry in importlib.metadata.entry_points(group="jax_plugins")}
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
        names |= {f"jax_plugins.{module.name}" for module in pkgutil.iter_modules(spec.submodule_search_locations)}
    return sorted(names)


def platforms_without_tpu(plugins: Iterable[str], dev_root: str = "/dev") -> str | None:
    """The ``JAX_PLATFORMS`` value JAX's own choice comes to on a host without TPU chips.

    None when a plugin's platform cannot be named (then JAX is left to choose).
    """
    platforms = []
    for plugin in plugins:
        name = plugin.rsplit(".", 1)[-1].lower()
        if "cuda" in name:
            nvidia = any(os.path.exists(f"{dev_root}/{d}") for d in ("nvidia0", "nvidiactl", "dxg"))
            if nvidia and "cuda" not in platforms:  # JAX skips CUDA itself without a visible GPU
                platforms.append("cuda")
        elif "rocm" in name:
            if os.path.exists(f"{dev_root}/kfd") and "rocm" not in platforms:
                platforms.append("rocm")
        else:
            return None
    return ",".join([*platforms, "cpu"])


def libtpu_installed(env: MutableMapping[str, str]) -> bool:
    return bool(env.get("TPU_LIBRARY_PATH")) or importlib.util.find_spec("libtpu") is not None


def skip_idle_tpu_backend(env: MutableMapping[str, str] | None = None) -> str | None:
    """Before JAX starts its backends: on a host without TPU chips, do not start libtpu's.

    Sets ``JAX_PLATFORMS`` (also for child processes such as data workers) and, when JAX is
    already imported, its ``jax_platforms`` option. Returns the value set, or None when it
    left the choice alone.
    """
    env = os.environ if env is None else env
    if "JAX_PLATFORMS" in env or "JAX_FORCE_TPU_INIT" in env or not libtpu_installed(env):
        return None
    jax = sys.modules.get("jax")
    if jax is not None and jax.config.jax_platforms:
        return None
    if tpu_may_be_attached():
        return None
    platforms = platforms_without_tpu(jax_plugin_modules())
    if platforms is None:
        return None
    env["JAX_PLATFORMS"] = platforms
    if jax is not None:
        jax.config.update("jax_platforms", platforms)
    return platforms
