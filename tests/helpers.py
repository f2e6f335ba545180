"""Small shared pieces for tests: data, tiny configs and models, subprocesses, checkpoint reading."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from workshop_dist.data.digits import load_digits_split
from workshop_dist.models import GenerativeModel, ModelConfiguration
from workshop_dist.training.config import TrainingConfiguration

STEPS_PER_EPOCH = 1000 // 128  # digits' training split at the default batch size


def resume_run_settings(epochs: int) -> list[str]:
    """``workshop-train`` overrides of the SIGTERM/SIGKILL resume tests: frequent saves and logs."""
    return [
        f"training.num_epochs={epochs}",
        "training.cadence.save_every=4",
        "training.cadence.log_every=1",
        "training.checkpoint.max_to_keep=3",
        "training.scheduler.warmup_steps=5",
        "training.cadence.num_samples=4",
    ]


SECTIONS = ("length", "cadence", "performance")


def training_config(**fields) -> TrainingConfiguration:
    """A TrainingConfiguration; the fields of its length, cadence and performance sections may be given
    by their own names (``log_every=5`` is ``cadence={"log_every": 5}``)."""
    sections: dict[str, dict] = {}
    for section in SECTIONS:
        names = TrainingConfiguration.model_fields[section].annotation.model_fields
        for name in [key for key in fields if key in names]:
            sections.setdefault(section, {})[name] = fields.pop(name)
    return TrainingConfiguration(**fields, **sections)


def digits_images(split: str = "train") -> np.ndarray:
    """Digits as float32 [N, 8, 8, 1] in [0, 1]."""
    return load_digits_split(split)["image"].astype(np.float32) / 16.0


def tiny_model_config(**overrides) -> ModelConfiguration:
    return ModelConfiguration(**{"hidden_dims": [64, 32], "output_dim": 8, **overrides})


class QuadraticModel(GenerativeModel):
    """loss = mean_i ||x_i - w||^2, no randomness: tests can compute exact expected values."""

    def __init__(self, config: ModelConfiguration, *, rngs: nnx.Rngs):
        self.shape = tuple(config.input_dim)
        self.w = nnx.Param(jnp.full(self.shape, 0.25))

    def example_losses(self, batch, rng, *, step=None, group=None):
        x = batch["image"]
        per_example = ((x - self.w[...]) ** 2).reshape(x.shape[0], -1).sum(-1)
        return {"loss": per_example, "squared_error": per_example}

    def sample(self, rng, num_samples, **options):
        return jnp.broadcast_to(self.w[...], (num_samples, *self.shape))


class LossOnlyModel(nnx.Module):
    """The older contract: only ``loss(batch, rng)`` (a batch mean) and ``sample``."""

    def __init__(self, config: ModelConfiguration, *, rngs: nnx.Rngs):
        self.shape = tuple(config.input_dim)
        self.w = nnx.Param(jnp.full(self.shape, 0.25))

    def loss(self, batch, rng):
        per_example = ((batch["image"] - self.w[...]) ** 2).reshape(batch["image"].shape[0], -1).sum(-1)
        return per_example.mean(), {"squared_error": per_example.mean()}

    def sample(self, rng, num_samples):
        return jnp.broadcast_to(self.w[...], (num_samples, *self.shape))


class StreamedProcess:
    """A subprocess whose combined output is collected line by line while it runs."""

    def __init__(self, command: list[str], *, env: dict[str, str], cwd: Path):
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    def wait_for(self, text: str, timeout: float = 240) -> None:
        """Until a line contains ``text``; fails if the process ends or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while not any(text in line for line in list(self.lines)):
            assert self.proc.poll() is None, f"exited before '{text}':\n{self.output[-4000:]}"
            assert time.monotonic() < deadline, f"no '{text}' within {timeout}s:\n{self.output[-4000:]}"
            time.sleep(0.01)

    def finish(self, timeout: float = 400) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    @property
    def output(self) -> str:
        """Everything printed but native stack frames and Gloo's connection lines, which would push the
        lines that say what went wrong out of an assertion message's tail."""
        noise = ("    @     0x", "[Gloo] Rank ")
        return "".join(line for line in self.lines if not any(part in line for part in noise))


def checkpoint_arrays(step_dir: Path) -> dict[str, np.ndarray]:
    """Every array of a checkpoint's training state as host numpy, by path, whatever devices wrote it."""
    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(step_dir / "state").item_metadata
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tree = checkpointer.restore(step_dir / "state", args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "2m"):
    """A ``size`` tmpfs mounted at ``path`` (a full disk for tests); skips the test unless root can mount."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    path.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True, capture_output=True)
    except (subprocess.CalledProcessError, FileNotFoundError) as err:
        pytest.skip(f"cannot mount a tmpfs here: {err}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False, capture_output=True)


def interrupt_then_resume(make_trainer, workdir: Path, stop: int):
    """A run SIGTERMed (to this process, caught by the real watcher) once it logs step ``stop``,
    then a new Trainer restored from its checkpoint: ``(interrupted_step, resumed)``, not yet fitted.

    ``make_trainer(workdir, preemption=None, log_callback=None)`` builds the run's Trainer."""
    from workshop_dist.training.preemption import Preempted, PreemptionWatcher

    watcher = PreemptionWatcher().install()
    try:
        def sigterm_at(step, metrics, prefix):
            if prefix == "train" and step >= stop and watcher.signal_name is None:
                os.kill(os.getpid(), signal.SIGTERM)

        interrupted = make_trainer(workdir, watcher, sigterm_at)
        with pytest.raises(Preempted):
            interrupted.fit()
        interrupted.close()
    finally:
        watcher.uninstall()
    resumed = make_trainer(workdir)
    assert resumed.restore() == interrupted.step
    return interrupted.step, resumed
