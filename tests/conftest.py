"""Tests run on 8 simulated CPU devices, so sharding is real even without accelerators.

A persistent compilation cache for the test run lets the many small Trainers that compile the
same step share XLA's work (a fresh directory each run: nothing stale carries over).

The fast set (``python -m pytest -q -m "not slow"``, what a developer runs while working) must
stay under 4 minutes on 2 cores. Its rule, enforced here: a test that starts a process (a
subprocess, a multiprocessing worker) is marked ``@pytest.mark.slow``, and so is one that trains
more than a few steps or compiles a large model (several seconds on 2 cores); a module where
every test is such marks them all with ``pytestmark = pytest.mark.slow``.
"""

import logging
import multiprocessing.process
import os
import subprocess
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# XLA:CPU without LLVM's optimisations: most tests run a program a few times, so its optimised
# compilation costs more than it saves (the fast set: 237 s -> 184 s on 2 cores). Processes the
# tests start inherit it unless they set XLA_FLAGS themselves (most do, for their device count).
# Set WORKSHOP_TEST_XLA_OPT=3 to test with XLA's default optimisation level.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):  # pytest-xdist workers inherit it
    level = os.environ.get("WORKSHOP_TEST_XLA_OPT", "0")
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level={level}".strip()

import jax

jax.config.update("jax_num_cpu_devices", 8)
# One cache per test run, shared by pytest-xdist's workers (they inherit the variable from the
# controller). Processes the tests start use workshop-train's own cache (compilation.cache_dir).
CACHE = os.environ.setdefault("WORKSHOP_TEST_JAX_CACHE", tempfile.mkdtemp(prefix="workshop_dist_jax_cache_"))
jax.config.update("jax_compilation_cache_dir", CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# Libraries ask the system about itself through short-lived tools (ctypes.util.find_library
# runs ldconfig or gcc), tests bind-mount a read-only directory: short system tools, not the
# processes the rule is about.
SYSTEM_PROBES = {"ldconfig", "gcc", "cc", "ld", "objdump", "uname", "lsb_release", "mount", "umount"}


@pytest.fixture(autouse=True)
def _fast_tests_start_no_processes(request, monkeypatch):
    """Fails a test outside the slow set that starts a process: mark it slow instead."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    started: list[str] = []
    popen_init, process_start = subprocess.Popen.__init__, multiprocessing.process.BaseProcess.start

    def popen(self, args, *rest, **options):
        popen_init(self, args, *rest, **options)  # a program that cannot start raises here: no process
        command = [args] if isinstance(args, str | bytes | os.PathLike) else list(args)
        if os.path.basename(str(command[0]).split()[0]) not in SYSTEM_PROBES:
            started.append(" ".join(map(str, command))[:200])

    def start(self):
        started.append(f"multiprocessing {self.name}")
        process_start(self)

    monkeypatch.setattr(subprocess.Popen, "__init__", popen)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", start)
    yield
    if started:
        pytest.fail(
            f"{request.node.nodeid} starts a process ({started[0]}) but is not marked slow: add "
            "@pytest.mark.slow (see tests/conftest.py), or test it in-process",
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def _no_log_handlers_outlive_their_test():
    """A run's Logger binds a handler to the stderr of the test that made it (pytest's capture);
    left on the "workshop_dist" logger it would write into a closed stream in later tests."""
    yield
    logger = logging.getLogger("workshop_dist")
    for handler in list(logger.handlers):
        if getattr(handler, "_workshop_dist", False):
            logger.removeHandler(handler)
            handler.close()
