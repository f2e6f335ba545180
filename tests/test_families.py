"""Every model family's config through the one engine: sharded training, SIGTERM resume, evaluation,
sampling, and the CLI's --dry-run. Each config runs as written, shortened to a few steps."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from workshop_dist import data
from workshop_dist.experiment import ExperimentConfiguration
from workshop_dist.parallel import make_mesh
from workshop_dist.training import Trainer
from workshop_dist.training.preemption import Preempted, PreemptionWatcher

pytestmark = pytest.mark.slow  # every test here starts processes or trains a whole family

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(path.stem for path in (REPO / "configs").glob("*.yaml"))
STEPS, STOP = 8, 4
SHORT = [f"training.length.max_steps={STEPS}", "training.cadence.log_every=1", f"training.cadence.save_every={STEPS}",
         f"training.cadence.eval_every={STEPS}", "training.cadence.num_samples=0", "training.batch_size=64",
         "mesh.data=1", "mesh.fsdp=8"]


def load(name: str) -> ExperimentConfiguration:
    config = ExperimentConfiguration.load(REPO / "configs" / f"{name}.yaml", SHORT)
    if config.training.ema.decay is not None:  # exercise the EMA within the few steps
        config.training.ema.start_step = 2
    schedules = [config.training.scheduler, *(o.scheduler for o in (config.training.optimizers or {}).values())]
    for schedule in filter(None, schedules):
        schedule.warmup_steps = 1
    return config


def make_trainer(config: ExperimentConfiguration, workdir: Path, preemption=None, log_callback=None) -> Trainer:
    training = config.training
    mesh = make_mesh(config.mesh)
    train = data.make_train_input(config.data, global_batch_size=training.batch_size, seed=training.seed)
    val = data.make_eval_input(config.data, global_batch_size=training.batch_size)
    return Trainer(config.model, training, train, val, workdir, mesh=mesh, mesh_config=config.mesh,
                   preemption=preemption, log_callback=log_callback)


def host(tree):
    return jax.tree.leaves(jax.device_get(tree))


@pytest.mark.parametrize("name", CONFIGS)
def test_family_trains_sharded_resumes_after_sigterm_and_samples(name, tmp_path):
    config = load(name)

    # 1. Uninterrupted: FSDP really shards the large params; the loss goes down.
    full = make_trainer(config, tmp_path / "full")
    full.fit()
    largest = max(jax.tree.leaves(full.state.params), key=lambda leaf: leaf.size)
    assert "fsdp" in str(largest.sharding.spec), (name, largest.shape, largest.sharding.spec)
    assert largest.addressable_shards[0].data.size == largest.size // 8
    rows = full.train_metrics
    assert len(rows) == STEPS and all(np.isfinite(row["loss"]) for row in rows)
    start = make_trainer(config, None)
    if config.training.optimizers:  # a GAN: each group's params moved with its own optimizer
        for group in config.training.optimizers:
            before, after = host(start.state.params[group]), host(full.state.params[group])
            assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True)), group
    else:  # the validation loss went down: each example draws the same noise in both evaluations
        before, after = start.evaluate()["loss"], full.evaluate()["loss"]
        assert after < before, (name, before, after, [r["loss"] for r in rows])
    if config.training.ema.decay is not None:
        assert full.state.ema_params is not None

    # 2. SIGTERM (to this process, caught by the real watcher) mid-run, then resume: bit-identical.
    watcher = PreemptionWatcher().install()
    try:
        def sigterm_at(step, metrics, prefix):
            if prefix == "train" and step >= STOP and watcher.signal_name is None:
                os.kill(os.getpid(), signal.SIGTERM)

        interrupted = make_trainer(config, tmp_path / "run", watcher, sigterm_at)
        with pytest.raises(Preempted):
            interrupted.fit()
        interrupted.close()
    finally:
        watcher.uninstall()
    assert STOP <= interrupted.step < STEPS
    resumed = make_trainer(config, tmp_path / "run")
    assert resumed.restore() == interrupted.step
    resumed.fit()
    assert resumed.step == full.step == STEPS
    for a, b in zip(host(resumed.state), host(full.state), strict=True):
        np.testing.assert_array_equal(a, b)

    # 3. Evaluation and samples (one row per class for conditional models).
    metrics = resumed.evaluate()
    assert metrics["num_examples"] == 350 and np.isfinite(metrics["loss"])
    classes = resumed.engine.num_classes
    labels = np.arange(2) if classes else None
    samples = resumed.generate_samples(2, labels=labels, seed=0)
    assert samples.shape[0] == 2 and np.all(np.isfinite(samples))
    for trainer in (full, resumed):
        trainer.close()


@pytest.mark.parametrize("name", CONFIGS)
def test_family_dry_run_compiles_one_step(name):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run(
        [sys.executable, "-m", "workshop_dist.cli", "--config", str(REPO / "configs" / f"{name}.yaml"), "--dry-run",
         "mesh.data=1", "mesh.fsdp=8", "training.batch_size=64"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "FLOPs per step" in result.stdout and "parameters" in result.stdout
