"""workshop-launch local with real processes on 127.0.0.1: they join, their output is
prefixed, a failure stops the others, and signals reach every child."""

from __future__ import annotations

import os
import queue
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from workshop_dist import launcher

JOIN_SCRIPT = """
import sys
import numpy as np
from workshop_dist.distributed import DistributedConfiguration, initialize, is_primary, shutdown

assert initialize(DistributedConfiguration(heartbeat_timeout_seconds=5)), "expected multi-process"
import jax
from jax.experimental import multihost_utils

gathered = multihost_utils.process_allgather(np.array([jax.process_index() * 10]))
multihost_utils.sync_global_devices("joined")
print(f"count={jax.process_count()} local={jax.local_device_count()} global={jax.device_count()} "
      f"gathered={gathered.ravel().tolist()} primary={is_primary()} args={sys.argv[1:]}")
print("to stderr", file=sys.stderr)
shutdown()
"""

FAIL_SCRIPT = """
import os, signal, sys, time
if os.environ["JAX_PROCESS_ID"] == "1":
    time.sleep(0.5)
    sys.exit(3)
if os.environ.get("IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("waiting", flush=True)
time.sleep(300)  # far longer than the tests allow: only being stopped ends it in time
"""

TERM_SCRIPT = """
import os, signal, sys, time
from pathlib import Path

received = 0

def on_term(signum, frame):
    global received
    received += 1
    Path(sys.argv[1], "term-" + os.environ["JAX_PROCESS_ID"]).write_text(f"saved after {received} SIGTERM")
    if os.environ["JAX_PROCESS_ID"] == "1" and received == 1:
        time.sleep(1)  # still saving when process 0 exits: it must not get a second SIGTERM
    sys.exit(75)

signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
time.sleep(60)
"""


def _script(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return shlex.join([sys.executable, str(path)])


def _launch(program: str, *options: str, train_args: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "workshop_dist.launcher", "local", *options, "--program", program, "--", *train_args]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_", "JAX_PROCESS"))}
    return {**env, **extra}


@pytest.mark.slow
def test_two_processes_join_over_loopback_with_prefixed_output(tmp_path):
    program = _script(tmp_path, "join.py", JOIN_SCRIPT)
    command = _launch(program, "--processes", "2", "--devices-per-process", "2", train_args=("--config", "x.yaml"))
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=_env())
    assert result.returncode == 0, result.stdout + result.stderr
    for index in (0, 1):
        primary = index == 0
        expected = f"[p{index}] count=2 local=2 global=4 gathered=[0, 10] primary={primary} args=['--config', 'x.yaml']"
        assert expected in result.stdout.splitlines(), result.stdout
        assert f"[p{index}] to stderr" in result.stderr.splitlines()
    assert "exit code 0" in result.stderr


@pytest.mark.slow
def test_failing_process_stops_the_others_and_its_code_is_returned(tmp_path):
    program = _script(tmp_path, "fail.py", FAIL_SCRIPT)
    start = time.monotonic()
    result = subprocess.run(_launch(program, "-n", "2"), capture_output=True, text=True, timeout=120, env=_env())
    assert result.returncode == 3, result.stderr
    assert time.monotonic() - start < 60  # the other process sleeps 300 s; starting two on a loaded CI machine: ~10 s
    assert "process 1 exited with code 3: stopping the others" in result.stderr


@pytest.mark.slow
def test_process_ignoring_sigterm_is_killed_after_the_grace_period(tmp_path):
    program = _script(tmp_path, "fail.py", FAIL_SCRIPT)
    start = time.monotonic()
    result = subprocess.run(
        _launch(program, "-n", "2", "--grace-seconds", "1"),
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(IGNORE_TERM="1"),
    )
    assert result.returncode == 3
    assert time.monotonic() - start < 60  # it ignores SIGTERM and sleeps 300 s: only SIGKILL ends it in time
    assert "killing them" in result.stderr


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))


@pytest.mark.slow
def test_sigterm_reaches_every_process_and_their_exit_code_passes_through(tmp_path):
    program = _script(tmp_path, "term.py", TERM_SCRIPT)
    command = _launch(program, "-n", "2", train_args=(str(tmp_path),))
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env())
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    ready: set[str] = set()
    deadline = time.monotonic() + 20
    while ready != {"[p0] ready", "[p1] ready"}:
        ready.add(lines.get(timeout=max(0.1, deadline - time.monotonic())))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 75
    assert (tmp_path / "term-0").read_text() == "saved after 1 SIGTERM"
    assert (tmp_path / "term-1").read_text() == "saved after 1 SIGTERM"


def test_program_that_cannot_start_exits_127(tmp_path, capsys):
    code = launcher.main(["local", "-n", "2", "--program", str(tmp_path / "missing"), "--", "x"])
    assert code == launcher.EXIT_CANNOT_START
    assert "cannot start" in capsys.readouterr().err


def test_child_env_sets_the_contract_and_appends_xla_flags():
    base = {"XLA_FLAGS": "--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=8", "JAX_NUM_CPU_DEVICES": "8"}
    env = launcher.child_env(base, coordinator="127.0.0.1:555", num_processes=3, process_id=2, devices=4)
    assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:555"
    assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"], env["JAX_PLATFORMS"]) == ("3", "2", "cpu")
    assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=4"
    assert "JAX_NUM_CPU_DEVICES" not in env
    assert base["XLA_FLAGS"].endswith("=8")  # the caller's mapping is untouched


def test_arguments_after_double_dash_go_to_the_trainer_verbatim():
    args, train = launcher.parse_args(["local", "-n", "2", "--", "--config", "c.yaml", "--processes", "mesh.fsdp=-1"])
    assert (args.processes, args.devices_per_process) == (2, 1)
    assert train == ["--config", "c.yaml", "--processes", "mesh.fsdp=-1"]


@pytest.mark.parametrize(
    "argv",
    [["local"], ["local", "-n", "0"], ["local", "-n", "2", "-d", "0"], ["local", "-n", "2", "--config", "x"], []],
)
def test_bad_usage_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        launcher.parse_args(argv)
    assert exit_info.value.code == launcher.EXIT_USAGE
    assert "workshop-launch" in capsys.readouterr().err


def test_exit_code_follows_the_shell_convention():
    assert launcher.exit_code(0) == 0
    assert launcher.exit_code(3) == 3
    assert launcher.exit_code(-signal.SIGTERM) == 128 + signal.SIGTERM


def test_default_program_is_workshop_train_with_this_interpreter():
    assert launcher.default_program() == [sys.executable, "-m", "workshop_dist.cli"]
