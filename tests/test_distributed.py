"""distributed.py: single-process by default, explicit settings from config or environment,
cluster detection only where a cluster really is, clear errors for impossible combinations."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Any

import jax
import pytest

from workshop_dist import distributed
from workshop_dist.config import ConfigError
from workshop_dist.distributed import DistributedConfiguration, initialize, resolve_settings

CLUSTER_VARS = [
    "JAX_COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
    "JAX_LOCAL_DEVICE_IDS",
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_STEP_NUM_TASKS",
    "OMPI_MCA_orte_hnp_uri",
    "OMPI_COMM_WORLD_SIZE",
    "KUBERNETES_SERVICE_HOST",
    "JOB_COMPLETION_INDEX",
    "TPU_WORKER_HOSTNAMES",
    "TPU_PROCESS_ADDRESSES",
    "TPU_PROCESS_ADDRESSES_PATH",
]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A laptop: no cluster variables at all."""
    for name in CLUSTER_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "_tpu_chips_attached", lambda: False)
    return monkeypatch


@pytest.fixture
def fake_initialize(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record jax.distributed.initialize calls instead of joining anything."""
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    return calls


def test_single_process_by_default_does_nothing(clean_env, fake_initialize):
    assert initialize(DistributedConfiguration()) is False
    assert initialize() is False
    assert fake_initialize == []


def test_config_defaults_are_single_process_and_fail_fast():
    config = DistributedConfiguration()
    assert config.coordinator_address is None and config.num_processes is None
    assert config.cluster_detection == "auto"
    assert config.heartbeat_timeout_seconds <= 30
    assert config.cpu_collectives == "gloo"


def test_unknown_field_is_rejected():
    with pytest.raises(ConfigError, match="did you mean 'num_processes'"):
        DistributedConfiguration.from_dict({"num_process": 2})


def test_environment_variables_are_parsed():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    settings = resolve_settings(DistributedConfiguration(), env)
    assert (settings.coordinator_address, settings.num_processes, settings.process_id) == ("10.0.0.1:1234", 4, 3)


def test_config_wins_over_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    config = DistributedConfiguration(coordinator_address="host0:99", num_processes=2, process_id=1)
    settings = resolve_settings(config, env)
    assert (settings.coordinator_address, settings.num_processes, settings.process_id) == ("host0:99", 2, 1)


@pytest.mark.parametrize(
    ("config", "env", "message"),
    [
        ({}, {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "no coordinator address"),
        ({}, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "out of range"),
        ({}, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, "has no id"),
        ({}, {"JAX_PROCESS_ID": "1"}, "number of processes is not"),
        ({}, {"JAX_NUM_PROCESSES": "two"}, "must be an integer"),
        ({}, {"JAX_NUM_PROCESSES": "0"}, "at least 1"),
        ({"coordinator_address": "no-port"}, {}, "must be host:port"),
        ({"num_processes": 2, "process_id": 0}, {}, "no coordinator address"),
    ],
)
def test_invalid_combinations_give_clear_errors(config, env, message):
    with pytest.raises(ConfigError, match=message):
        resolve_settings(DistributedConfiguration(**config), env)


def test_process_id_out_of_range_in_config_is_a_config_error():
    with pytest.raises(ConfigError, match=r"process_id=2 is out of range for 2 processes"):
        DistributedConfiguration.from_dict({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2})


def test_coordinator_without_process_count_outside_a_cluster_is_an_error(clean_env, fake_initialize):
    clean_env.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    with pytest.raises(ConfigError, match="number of processes"):
        initialize(DistributedConfiguration())
    assert fake_initialize == []


def test_explicit_settings_initialize_without_cluster_detection(clean_env, fake_initialize):
    clean_env.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    clean_env.setenv("JAX_NUM_PROCESSES", "2")
    clean_env.setenv("JAX_PROCESS_ID", "1")
    assert initialize(DistributedConfiguration(heartbeat_timeout_seconds=7)) is True
    [call] = fake_initialize
    assert call["coordinator_address"] == "127.0.0.1:1234"
    assert (call["num_processes"], call["process_id"]) == (2, 1)
    assert call["cluster_detection_method"] == "deactivate"
    assert call["heartbeat_timeout_seconds"] == 7
    assert jax.config.jax_cpu_collectives_implementation == "gloo"


def test_one_explicit_process_stays_single_process(clean_env, fake_initialize):
    clean_env.setenv("JAX_NUM_PROCESSES", "1")
    assert initialize() is False
    assert fake_initialize == []


def _slurm(env: pytest.MonkeyPatch, ntasks: int) -> None:
    for name, value in {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_NODELIST": "gpu[001-002]",
        "SLURM_NTASKS": str(ntasks),
        "SLURM_PROCID": "1",
        "SLURM_LOCALID": "1",
    }.items():
        env.setenv(name, value)


def test_slurm_step_with_several_tasks_is_detected(clean_env, fake_initialize):
    _slurm(clean_env, ntasks=4)
    assert distributed.detect_cluster() == distributed.Cluster("Slurm", "slurm", 4)
    assert initialize() is True
    [call] = fake_initialize
    # JAX's own auto-detection: no method forced, no coordinator, count or id passed.
    assert call["cluster_detection_method"] is None
    assert call["coordinator_address"] is None  # JAX derives it from the node list
    assert "num_processes" not in call and "process_id" not in call


def test_forcing_a_present_cluster_type_names_it_to_jax(clean_env, fake_initialize):
    _slurm(clean_env, ntasks=2)
    assert initialize(DistributedConfiguration(cluster_detection="slurm")) is True
    [call] = fake_initialize
    assert call["cluster_detection_method"] == "slurm"


def test_slurm_with_one_task_stays_single_process(clean_env, fake_initialize):
    _slurm(clean_env, ntasks=1)
    assert initialize() is False
    assert fake_initialize == []


def test_detection_off_ignores_the_cluster(clean_env, fake_initialize):
    _slurm(clean_env, ntasks=4)
    assert initialize(DistributedConfiguration(cluster_detection="off")) is False
    assert fake_initialize == []


def test_forcing_an_absent_cluster_type_is_an_error(clean_env):
    with pytest.raises(ConfigError, match="not a slurm environment"):
        distributed.detect_cluster("slurm")


def test_kubernetes_pod_outside_an_indexed_job_is_not_a_cluster(clean_env, fake_initialize):
    clean_env.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    assert distributed.detect_cluster() is None
    assert initialize() is False
    assert fake_initialize == []


def _jax_finds_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """jax.distributed.initialize as it behaves when none of its detectors matches."""

    def initialize(**kwargs):
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", initialize)


def test_tpu_chips_without_a_slice_stay_single_process(clean_env, monkeypatch):
    monkeypatch.setattr(distributed, "_tpu_chips_attached", lambda: True)
    assert distributed.detect_cluster().method == "gcetpu"
    _jax_finds_nothing(monkeypatch)
    assert initialize() is False


def test_an_indexed_job_jax_cannot_join_is_a_clear_error(clean_env, monkeypatch):
    clean_env.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    clean_env.setenv("JOB_COMPLETION_INDEX", "0")
    _jax_finds_nothing(monkeypatch)
    with pytest.raises(ConfigError, match=r"(?s)Detected a Kubernetes indexed Job.*fix: set distributed\.coordinator_address"):
        initialize()


def test_detection_reads_only_the_given_environment(monkeypatch):
    monkeypatch.setattr(distributed, "_tpu_chips_attached", lambda: False)
    assert distributed.detect_cluster(env={}) is None
    ompi = {"OMPI_MCA_orte_hnp_uri": "1234.0;tcp://10.0.0.1:5000", "OMPI_COMM_WORLD_SIZE": "8"}
    assert distributed.detect_cluster(env=ompi) == distributed.Cluster("Open MPI", "ompi", 8)
    gke = {"TPU_WORKER_HOSTNAMES": "w0,w1", "KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    assert distributed.detect_cluster(env=gke) is None  # TPU variables without TPU chips (as aot.py sets them)
    monkeypatch.setattr(distributed, "_tpu_chips_attached", lambda: True)
    assert distributed.detect_cluster(env=gke).method == "gketpu"  # before the pod's own Kubernetes
    assert distributed.detect_cluster("off", env=ompi) is None


@pytest.fixture
def fake_shutdown(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(jax.distributed, "shutdown", lambda: calls.append("shutdown"))
    return calls


def test_shutdown_leaves_only_when_joined(monkeypatch, fake_shutdown):
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    distributed.shutdown()
    assert fake_shutdown == []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    distributed.shutdown()
    assert fake_shutdown == ["shutdown"]


def test_a_failing_shutdown_is_logged_not_raised(monkeypatch, caplog):
    def broken():
        raise RuntimeError("peer gone")

    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(jax.distributed, "shutdown", broken)
    with caplog.at_level("WARNING", logger="workshop_dist.distributed"):
        distributed.shutdown()
    assert "jax.distributed.shutdown failed: peer gone" in caplog.text


def test_topology_summary_is_one_line():
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    line = distributed.topology_summary(mesh, per_host_batch=16)
    assert "\n" not in line
    assert "process 0/1" in line
    assert "8 local, 8 global (cpu)" in line
    assert "{'data': 4, 'fsdp': 2}" in line
    assert "16 per host, 16 global" in line
    assert distributed.is_primary()


@pytest.mark.slow
def test_import_has_no_side_effects():
    code = (
        "import workshop_dist.distributed, sys; from jax._src import xla_bridge; "
        "sys.exit(1 if xla_bridge.backends_are_initialized() else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


SLURM_JOIN_SCRIPT = """
from workshop_dist.distributed import DistributedConfiguration, initialize
assert initialize(DistributedConfiguration(heartbeat_timeout_seconds=5))
import jax, numpy as np
from jax.experimental import multihost_utils
gathered = multihost_utils.process_allgather(np.array([jax.process_index()]))
print(jax.process_index(), jax.process_count(), jax.device_count(), gathered.ravel().tolist())
"""


@pytest.mark.slow
def test_two_slurm_tasks_join_by_cluster_detection_alone(tmp_path):
    """No JAX_* variables: JAX's Slurm detection finds the coordinator and the ranks."""
    script = tmp_path / "join.py"
    script.write_text(SLURM_JOIN_SCRIPT)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARS}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={
                **base,
                "JAX_PLATFORMS": "cpu",
                "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
                "SLURM_JOB_ID": "1",
                "SLURM_STEP_NODELIST": "localhost",
                "SLURM_NTASKS": "2",
                "SLURM_PROCID": str(rank),
                "SLURM_LOCALID": str(rank),
                "JAX_COORDINATOR_PORT": str(port),
            },
        )
        for rank in (0, 1)
    ]
    outputs = [proc.communicate(timeout=60)[0] for proc in procs]
    for rank, (proc, output) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, output
        assert f"{rank} 2 4 [0, 1]" in output.splitlines(), output
