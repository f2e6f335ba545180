"""``workshop-launch local``: a multi-process run on one machine, to rehearse a cluster.

Starts N copies of ``workshop-train ARGS`` that join over 127.0.0.1 exactly like hosts of
a pod slice, each on M simulated CPU devices::

    workshop-launch local --processes 2 --devices-per-process 4 -- --config cfg.yaml --workdir /tmp/run

Every child gets ``JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>``, ``JAX_NUM_PROCESSES=N``,
``JAX_PROCESS_ID=i``, ``JAX_PLATFORMS=cpu`` and
``XLA_FLAGS=... --xla_force_host_platform_device_count=M``; its output lines are prefixed
with ``[p<i>]``.

Supervision, like a cluster scheduler:

* SIGTERM / SIGINT to the launcher are forwarded to every child (a trainer saves and exits);
  children still running ``--grace-seconds`` later are killed, and so are they at once on
  a second signal.
* When a child exits non-zero, the others get SIGTERM, then SIGKILL after the grace period
  (not a second SIGTERM if they already got a forwarded one: they are saving).

Exit code: 0 when every child exited 0; otherwise the code of the first child to exit
non-zero (a child killed by signal S counts as 128+S, the shell convention). So the
trainer's "preempted, checkpoint saved" code (75,
:data:`workshop_dist.training.preemption.EXIT_PREEMPTED`) passes through.
2: bad usage; 127: the program could not be started.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import IO

EXIT_USAGE = 2
EXIT_CANNOT_START = 127
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
POLL_SECONDS = 0.05


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the coordinator binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def child_env(
    base: Mapping[str, str], *, coordinator: str, num_processes: int, process_id: int, devices: int
) -> dict[str, str]:
    """Environment of child ``process_id``: the distributed contract plus M CPU devices."""
    env = dict(base)
    xla_flags = re.sub(rf"{DEVICE_COUNT_FLAG}=\S*", "", env.get("XLA_FLAGS", "")).split()
    env.update(
        JAX_COORDINATOR_ADDRESS=coordinator,
        JAX_NUM_PROCESSES=str(num_processes),
        JAX_PROCESS_ID=str(process_id),
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=" ".join([*xla_flags, f"{DEVICE_COUNT_FLAG}={devices}"]),
        PYTHONUNBUFFERED="1",
    )
    env.pop("JAX_NUM_CPU_DEVICES", None)  # would override the XLA flag
    return env


def exit_code(returncode: int) -> int:
    """Shell convention: a child killed by signal S reports 128+S."""
    return 128 - returncode if returncode < 0 else returncode


def _pump(stream: IO[bytes], prefix: str, sink: IO[str], lock: threading.Lock) -> None:
    """Copy a child's output line by line, prefixed with its process id."""
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        with lock:
            sink.write(f"{prefix}{line}\n")
            sink.flush()
    stream.close()


class ProcessGroup:
    """N children started together, stopped together; remembers who failed first."""

    def __init__(
        self, commands: Sequence[Sequence[str]], envs: Sequence[Mapping[str, str]], grace_seconds: float
    ):
        self.commands = commands
        self.envs = envs
        self.grace_seconds = grace_seconds
        self.children: list[subprocess.Popen[bytes]] = []
        self.pumps: list[threading.Thread] = []
        self.first_failure: int | None = None
        self.kill_deadline: float | None = None
        self.signals_received = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        for index, (command, env) in enumerate(zip(self.commands, self.envs, strict=True)):
            child = subprocess.Popen(
                command,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # our signals only, not the terminal's; killpg reaches grandchildren
            )
            self.children.append(child)
            for stream, sink in ((child.stdout, sys.stdout), (child.stderr, sys.stderr)):
                assert stream is not None
                pump = threading.Thread(
                    target=_pump, args=(stream, f"[p{index}] ", sink, self._lock), daemon=True
                )
                pump.start()
                self.pumps.append(pump)

    def running(self) -> list[subprocess.Popen[bytes]]:
        return [child for child in self.children if child.poll() is None]

    def send(self, signum: int) -> None:
        """Signal each running child itself (its data workers follow it, not the signal)."""
        for child in self.running():
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    def kill_all(self) -> None:
        for child in self.children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM everyone still running; SIGKILL them after the grace period."""
        if self.kill_deadline is None:
            self.kill_deadline = time.monotonic() + self.grace_seconds
        self.send(signal.SIGTERM)

    def on_signal(self, signum: int, _frame: object = None) -> None:
        self.signals_received += 1
        if self.signals_received > 1:
            _note(f"second signal ({signal.Signals(signum).name}): killing all processes")
            self.kill_all()
            return
        _note(f"{signal.Signals(signum).name}: forwarding to {len(self.running())} processes")
        self.kill_deadline = time.monotonic() + self.grace_seconds
        self.send(signum)

    def wait(self) -> int:
        """Supervise until every child has exited; return the launcher's exit code."""
        reported: set[int] = set()
        while len(reported) < len(self.children):
            for index, child in enumerate(self.children):
                if index in reported or child.poll() is None:
                    continue
                reported.add(index)
                code = exit_code(child.returncode)
                if code != 0 and self.first_failure is None:
                    self.first_failure = code
                    if self.signals_received:  # the others already have the signal: no second SIGTERM
                        _note(f"process {index} exited with code {code}")
                    elif self.running():
                        _note(f"process {index} exited with code {code}: stopping the others")
                        self.stop()
            if self.kill_deadline is not None and time.monotonic() > self.kill_deadline and self.running():
                _note(f"processes still running {self.grace_seconds:g}s after SIGTERM: killing them")
                self.kill_all()
                self.kill_deadline = None
            time.sleep(POLL_SECONDS)
        for pump in self.pumps:
            pump.join(timeout=5)
        return self.first_failure or 0


def _note(message: str) -> None:
    print(f"[launcher] {message}", file=sys.stderr, flush=True)


def default_program() -> list[str]:
    """``workshop-train`` with this interpreter, so it works without the console script on PATH."""
    return [sys.executable, "-m", "workshop_dist.cli"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="workshop-launch",
        description="Launch multi-process workshop-train runs.",
        epilog="Exit code: 0 if all processes exit 0, else the first non-zero code (128+S if killed by signal S).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    local = commands.add_parser(
        "local",
        help="N processes on this machine, joined over 127.0.0.1 on simulated CPU devices.",
        description="Run N processes of `workshop-train ARGS` on this machine, like the hosts of a cluster.",
        usage="workshop-launch local --processes N [--devices-per-process M] [options] -- [workshop-train args]",
    )
    local.add_argument("--processes", "-n", type=int, required=True, help="Number of processes (N >= 1).")
    local.add_argument(
        "--devices-per-process",
        "-d",
        type=int,
        default=1,
        help="Simulated CPU devices per process (default 1).",
    )
    local.add_argument(
        "--port", type=int, default=0, help="Coordinator port on 127.0.0.1 (default: a free one)."
    )
    local.add_argument(
        "--grace-seconds",
        type=float,
        default=60.0,
        help="After SIGTERM, how long processes may take to save and exit before SIGKILL (default 60).",
    )
    local.add_argument("--program", help=argparse.SUPPRESS)  # command prefix replacing workshop-train (tests)
    return parser


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Launcher options before ``--``, trainer arguments after it."""
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = build_parser()
    args = parser.parse_args(argv[:split])
    if args.processes < 1:
        parser.error(f"--processes must be at least 1, got {args.processes}")
    if args.devices_per_process < 1:
        parser.error(f"--devices-per-process must be at least 1, got {args.devices_per_process}")
    if not 0 <= args.port < 65536:
        parser.error(f"--port must be between 0 and 65535, got {args.port}")
    return args, argv[split + 1 :]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``workshop-launch``; returns (and exits with) the run's exit code."""
    args, train_args = parse_args(sys.argv[1:] if argv is None else argv)
    program = shlex.split(args.program) if args.program else default_program()
    coordinator = f"127.0.0.1:{args.port or free_port()}"
    commands = [[*program, *train_args]] * args.processes
    envs = [
        child_env(
            os.environ,
            coordinator=coordinator,
            num_processes=args.processes,
            process_id=index,
            devices=args.devices_per_process,
        )
        for index in range(args.processes)
    ]
    group = ProcessGroup(commands, envs, grace_seconds=args.grace_seconds)
    _note(
        f"{args.processes} processes x {args.devices_per_process} CPU devices, coordinator {coordinator}: "
        f"{shlex.join(commands[0])}"
    )
    previous = {sig: signal.signal(sig, group.on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            group.start()
        except OSError as err:
            _note(f"cannot start {shlex.join(program)}: {err}")
            group.kill_all()
            return EXIT_CANNOT_START
        code = group.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _note(f"all processes exited; exit code {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
