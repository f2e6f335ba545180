"""Multi-process start-up: join the other processes of a run, or stay single-process.

A run is one process per host (TPU VM worker, GPU node) or per GPU, all executing the same
program. :func:`initialize` connects them through JAX's coordination service before any
other JAX call, so ``jax.devices()`` then lists the devices of *all* processes. It decides
from, in this order:

1. **Explicit settings**: the ``distributed`` config section, else the environment
   variables ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0; JAX's own variable),
   ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (this project's; ``workshop-launch local``
   and the Slurm/GKE scripts in ``launch/`` set them). ``JAX_LOCAL_DEVICE_IDS`` (JAX's own,
   e.g. ``0`` or ``0,1``) restricts the GPUs a process uses.
2. **Cluster detection** (``cluster_detection: auto``): on a multi-worker Cloud TPU VM slice,
   a GKE TPU slice, a Slurm step with several tasks, an Open MPI job, or an indexed
   Kubernetes Job, ``jax.distributed.initialize()``'s own auto-detection finds the
   coordinator and process ids. We only call it when such a launcher's variables (or TPU
   chips) are really present, so a laptop run never waits for a coordinator, and a launcher
   that says it started one process stays single-process.
3. Otherwise the run is **single-process** and nothing is initialized.

Nothing here runs at import time: Grain's worker processes re-import modules.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import pydantic

from workshop_dist.config import ConfigError, StrictConfig

if TYPE_CHECKING:
    from jax.sharding import Mesh

logger = logging.getLogger(__name__)

ENV_COORDINATOR_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"

ClusterDetection = Literal["auto", "off", "slurm", "ompi", "gcetpu", "gketpu", "mpi4py"]


class DistributedConfiguration(StrictConfig):
    """How this process finds the others; all unset means environment or single-process."""

    coordinator_address: str | None = pydantic.Field(
        None, description="host:port of process 0 (else $JAX_COORDINATOR_ADDRESS, else detected)."
    )
    num_processes: int | None = pydantic.Field(
        None, ge=1, description="Number of processes in the run (else $JAX_NUM_PROCESSES, else detected)."
    )
    process_id: int | None = pydantic.Field(
        None, ge=0, description="This process's index, 0..num_processes-1 (else $JAX_PROCESS_ID)."
    )
    local_device_ids: list[int] | None = pydantic.Field(
        None, description="Accelerators this process uses (else $JAX_LOCAL_DEVICE_IDS, else all)."
    )
    cluster_detection: ClusterDetection = pydantic.Field(
        "auto",
        description="'auto': detect TPU VM/GKE/Slurm/MPI/K8s clusters; 'off': never; or one JAX method name.",
    )
    heartbeat_timeout_seconds: int = pydantic.Field(
        10, ge=1, description="A peer silent this long is declared dead and the run aborts."
    )
    initialization_timeout_seconds: int = pydantic.Field(
        300, ge=1, description="How long to wait for all processes to join."
    )
    shutdown_timeout_seconds: int = pydantic.Field(
        300,
        ge=1,
        description="How long shutdown waits for the other processes to finish (JAX's default: a process "
        "slowed down by a busy host reaches the end late, a dead one is caught by the heartbeat).",
    )
    cpu_collectives: Literal["gloo", "mpi"] = pydantic.Field(
        "gloo", description="Cross-process collectives on the CPU backend."
    )

    @pydantic.model_validator(mode="after")
    def _check_process_id(self) -> DistributedConfiguration:
        if self.num_processes is not None and self.process_id is not None:
            _check_rank(self.process_id, self.num_processes, "distributed.process_id")
        return self


@dataclasses.dataclass(frozen=True)
class ProcessSettings:
    """The explicit settings after merging the config with the environment."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def _check_rank(process_id: int, num_processes: int, name: str) -> None:
    if not 0 <= process_id < num_processes:
        raise ConfigError(
            f"{name}={process_id} is out of range for {num_processes} processes: "
            f"it must be between 0 and {num_processes - 1}."
        )


def _env_int(env: Mapping[str, str], name: str, minimum: int) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"Environment variable {name}={raw!r} must be an integer.") from None
    if value < minimum:
        raise ConfigError(f"Environment variable {name}={value} must be at least {minimum}.")
    return value


def resolve_settings(
    config: DistributedConfiguration, env: Mapping[str, str] | None = None
) -> ProcessSettings:
    """Merge config and environment (config wins) and reject combinations that cannot work."""
    env = os.environ if env is None else env
    coordinator = config.coordinator_address or env.get(ENV_COORDINATOR_ADDRESS, "").strip() or None
    num_processes = config.num_processes
    if num_processes is None:
        num_processes = _env_int(env, ENV_NUM_PROCESSES, minimum=1)
    process_id = config.process_id
    if process_id is None:
        process_id = _env_int(env, ENV_PROCESS_ID, minimum=0)

    if coordinator is not None and (":" not in coordinator or not coordinator.rsplit(":", 1)[1].isdigit()):
        raise ConfigError(
            f"Coordinator address {coordinator!r} must be host:port, e.g. 10.0.0.1:1234 "
            f"(distributed.coordinator_address or ${ENV_COORDINATOR_ADDRESS})."
        )
    if num_processes is not None and num_processes > 1:
        if coordinator is None:
            raise ConfigError(
                f"{num_processes} processes requested but no coordinator address: set "
                f"distributed.coordinator_address or ${ENV_COORDINATOR_ADDRESS} to host:port of process 0."
            )
        if process_id is None:
            raise ConfigError(
                f"{num_processes} processes requested but this process has no id: set "
                f"distributed.process_id or ${ENV_PROCESS_ID} (0..{num_processes - 1})."
            )
    if num_processes is not None and process_id is not None:
        _check_rank(process_id, num_processes, "process_id")
    if num_processes is None and process_id is not None:
        raise ConfigError(
            f"process_id={process_id} is set but the number of processes is not: set "
            f"distributed.num_processes or ${ENV_NUM_PROCESSES}."
        )
    return ProcessSettings(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )


@dataclasses.dataclass(frozen=True)
class Cluster:
    """A launcher that started this process as one of several, as its own variables show."""

    name: str  # for the log line
    method: str  # JAX's name for its detector (``cluster_detection_method``)
    process_count: int | None  # None: only JAX can tell (it asks the cloud's metadata or API)


def _count(env: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        raw = env.get(name, "").strip()
        if raw.isdigit():
            return int(raw)
    return None


def _tpu_chips_attached() -> bool:
    from workshop_dist.hardware import tpu_chips_attached

    return tpu_chips_attached()


# The launchers JAX's detectors serve, recognised by the variables each launcher documents (a
# Kubernetes pod counts only as part of an indexed Job). This only decides *whether* to ask
# JAX: ``jax.distributed.initialize()`` itself then finds the coordinator and the ranks.
_LAUNCHERS: dict[str, Callable[[Mapping[str, str]], Cluster | None]] = {
    "ompi": lambda env: Cluster("Open MPI", "ompi", _count(env, "OMPI_COMM_WORLD_SIZE"))
    if "OMPI_MCA_orte_hnp_uri" in env or "OMPI_COMM_WORLD_SIZE" in env
    else None,
    "slurm": lambda env: Cluster("Slurm", "slurm", _count(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"))
    if "SLURM_JOB_ID" in env and "SLURM_NTASKS" in env
    else None,
    # TPU variables alone are not a slice: compiling for a TPU target off a TPU VM sets them too.
    "gketpu": lambda env: Cluster("a GKE TPU slice", "gketpu", None)
    if any(name in env for name in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_PROCESS_ADDRESSES_PATH"))
    and _tpu_chips_attached()
    else None,
    "gcetpu": lambda env: Cluster("a Cloud TPU VM", "gcetpu", None) if _tpu_chips_attached() else None,
    "k8s": lambda env: Cluster("a Kubernetes indexed Job", "k8s", None)
    if "KUBERNETES_SERVICE_HOST" in env and "JOB_COMPLETION_INDEX" in env
    else None,
    "mpi4py": lambda env: Cluster("mpi4py", "mpi4py", None),  # opt-in only: JAX asks MPI itself
}


def detect_cluster(method: ClusterDetection = "auto", env: Mapping[str, str] | None = None) -> Cluster | None:
    """The multi-process launcher this process runs under, or None (a laptop, a CI box).

    Reads environment variables only (and ``/dev`` for TPU chips), never the network.
    """
    env = os.environ if env is None else env
    if method == "off":
        return None
    if method != "auto":
        found = _LAUNCHERS[method](env)
        if found is None:
            raise ConfigError(
                f"distributed.cluster_detection={method!r} but this is not a {method} environment; "
                "use 'auto', 'off', or set the coordinator, process count and id explicitly."
            )
        return found
    for name, recognise in _LAUNCHERS.items():
        if name != "mpi4py" and (found := recognise(env)) is not None:
            return found
    return None


def initialize(config: DistributedConfiguration | None = None) -> bool:
    """Join the other processes of this run; return True if running multi-process.

    Call it first, before anything that touches a JAX backend (``jax.devices()``, creating
    arrays): JAX cannot add processes to a running backend. Safe to call twice.
    """
    import jax

    config = config or DistributedConfiguration()
    if jax.distributed.is_initialized():
        return True
    settings = resolve_settings(config)
    options: dict[str, Any] = {
        "local_device_ids": config.local_device_ids,
        "initialization_timeout": config.initialization_timeout_seconds,
        "heartbeat_timeout_seconds": config.heartbeat_timeout_seconds,
        "shutdown_timeout_seconds": config.shutdown_timeout_seconds,
    }
    if settings.num_processes is not None:
        if settings.num_processes == 1:
            logger.info("One process requested: running single-process.")
            return False
        _enable_cpu_collectives(config)
        logger.info(
            "Joining %d processes as process %d via %s",
            settings.num_processes,
            settings.process_id,
            settings.coordinator_address,
        )
        jax.distributed.initialize(
            coordinator_address=settings.coordinator_address,
            num_processes=settings.num_processes,
            process_id=settings.process_id,
            cluster_detection_method="deactivate",
            **options,
        )
        return True

    cluster = detect_cluster(config.cluster_detection)
    if cluster is None:
        if settings.coordinator_address is not None:
            raise ConfigError(
                f"A coordinator address is set ({settings.coordinator_address}) but the number of processes "
                f"is not, and no cluster was detected: set distributed.num_processes or ${ENV_NUM_PROCESSES}, "
                f"and distributed.process_id or ${ENV_PROCESS_ID}."
            )
        return False
    if cluster.process_count == 1:
        logger.info("Detected %s with a single process: running single-process.", cluster.name)
        return False
    _enable_cpu_collectives(config)
    logger.info("Detected %s: joining its processes.", cluster.name)
    try:
        # JAX's own auto-detection finds the coordinator, the process count and this process's id.
        jax.distributed.initialize(
            coordinator_address=settings.coordinator_address,
            cluster_detection_method=None if config.cluster_detection == "auto" else cluster.method,
            **options,
        )
    except ValueError as err:
        if cluster.method != "gcetpu" or jax.distributed.is_initialized():
            raise ConfigError(
                f"Detected {cluster.name}, but jax.distributed.initialize() could not join its processes: {err}\n"
                f"  fix: set distributed.coordinator_address, num_processes and process_id (or ${ENV_COORDINATOR_ADDRESS}, "
                f"${ENV_NUM_PROCESSES}, ${ENV_PROCESS_ID}), or distributed.cluster_detection: off for one process."
            ) from err
        # TPU chips but no slice in the VM's metadata: one host on its own.
        logger.info("JAX found no TPU slice to join (%s): running single-process.", err)
        return False
    return True


def _enable_cpu_collectives(config: DistributedConfiguration) -> None:
    """Cross-process computations on the CPU backend need a collectives library; GPUs/TPUs ignore it."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", config.cpu_collectives)


def shutdown() -> None:
    """Leave the coordination service cleanly (waits for the others); no-op when single-process."""
    import jax

    if not jax.distributed.is_initialized():
        return
    try:
        jax.distributed.shutdown()
    except Exception as err:  # never mask the error that ended the run
        logger.warning("jax.distributed.shutdown failed: %s", err)


def is_primary() -> bool:
    """True on process 0, the only one that writes logs, metrics and images.

    Call after :func:`initialize`: it starts the JAX backend.
    """
    import jax

    return jax.process_index() == 0


def topology_summary(mesh: Mesh, per_host_batch: int) -> str:
    """One log line describing who runs where: processes, devices, platform, mesh, batch."""
    import jax

    processes = jax.process_count()
    local = jax.local_device_count()
    total = jax.device_count()
    platform = jax.devices()[0].platform
    shape = {str(name): int(size) for name, size in mesh.shape.items()}
    return (
        f"process {jax.process_index()}/{processes} | devices: {local} local, {total} global ({platform}) | "
        f"mesh {shape} | batch: {per_host_batch} per host, {per_host_batch * processes} global"
    )
