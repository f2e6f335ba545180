"""Every model family's config through the one engine: sharded training, SIGTERM resume, evaluation,
sampling, and the CLI's --dry-run. Each config runs as written, shortened to a few steps."""

import functools
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from tests.helpers import interrupt_then_resume
from workshop_dist import cli, data
from workshop_dist.experiment import ExperimentConfiguration
from workshop_dist.parallel import make_mesh
from workshop_dist.training import Trainer

pytestmark = pytest.mark.slow  # every test here starts processes or trains a whole family

REPO = Path(__file__).resolve().parents[1]


def _stands_alone(path: Path) -> bool:
    """Whether a config trains from the built-in data alone: the *_images configs need a folder the
    user names (trained small from a generated folder in tests/test_fid_training.py); the latent
    configs need an autoencoder run first (tests/test_latent_training.py, test_latent_onthefly.py)."""
    model = yaml.safe_load(path.read_text())["model"]
    return not path.stem.endswith("_images") and "decoder" not in model and model["model_class"] != "latent"


CONFIGS = sorted(path.stem for path in (REPO / "configs").glob("*.yaml") if _stands_alone(path))
STEPS, STOP = 8, 4
SHORT = [f"training.length.max_steps={STEPS}", "training.cadence.log_every=1", f"training.cadence.save_every={STEPS}",
         f"training.cadence.eval_every={STEPS}", "training.cadence.num_samples=0", "training.batch_size=64",
         "mesh.data=1", "mesh.fsdp=8"]


def overrides(name: str) -> list[str]:
    """SHORT, plus an EMA that starts within the few steps and one warm-up step for each schedule."""
    config = ExperimentConfiguration.load(REPO / "configs" / f"{name}.yaml", SHORT)
    extra = ["training.ema.start_step=2"] if config.training.ema.decay is not None else []
    if config.training.scheduler is not None:
        extra.append("training.scheduler.warmup_steps=1")
    for group, optimizer in (config.training.optimizers or {}).items():
        if optimizer.scheduler is not None:
            extra.append(f"training.optimizers.{group}.scheduler.warmup_steps=1")
    return [*SHORT, *extra]


def load(name: str) -> ExperimentConfiguration:
    return ExperimentConfiguration.load(REPO / "configs" / f"{name}.yaml", overrides(name))


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
    groups = config.training.optimizers or {}
    initial = {group: host(full.state.params[group]) for group in groups}
    before = None if groups else full.evaluate()["loss"]  # each example draws the same noise in every evaluation
    full.fit()
    largest = max(jax.tree.leaves(full.state.params), key=lambda leaf: leaf.size)
    assert "fsdp" in str(largest.sharding.spec), (name, largest.shape, largest.sharding.spec)
    assert largest.addressable_shards[0].data.size == largest.size // 8
    rows = full.train_metrics
    assert len(rows) == STEPS and all(np.isfinite(row["loss"]) for row in rows)
    if groups:  # a GAN: each group's params moved with its own optimizer
        for group in groups:
            moved = [not np.array_equal(a, b) for a, b in zip(initial[group], host(full.state.params[group]), strict=True)]
            assert any(moved), group
    else:  # the validation loss went down
        after = full.evaluate()["loss"]
        assert after < before, (name, before, after, [r["loss"] for r in rows])
    if config.training.ema.decay is not None:
        assert full.state.ema_params is not None

    # 2. SIGTERM (to this process, caught by the real watcher) mid-run, then resume: bit-identical.
    stopped, resumed = interrupt_then_resume(functools.partial(make_trainer, config), tmp_path / "run", STOP)
    assert STOP <= stopped < STEPS
    resumed.fit()
    assert resumed.step == full.step == STEPS
    for a, b in zip(host(resumed.state), host(full.state), strict=True):
        np.testing.assert_array_equal(a, b)

    # 3. Evaluation and samples (one row per class for conditional models).
    metrics = resumed.evaluate()
    assert metrics["num_examples"] == 350 and np.isfinite(metrics["loss"])
    classes = resumed.engine.num_classes
    labels = np.arange(2) if classes else None
    options = {"sampling_steps": 3} if "sampling_steps" in config.model.parameters else {}  # DDPM's 200: slow here
    samples = resumed.generate_samples(2, labels=labels, seed=0, **options)
    assert samples.shape[0] == 2 and np.all(np.isfinite(samples))
    for trainer in (full, resumed):
        trainer.close()


@pytest.mark.parametrize("name", CONFIGS)
def test_family_dry_run_compiles_one_step(name, capsys):
    # In this process, with the training test's settings: its step is already in the session's
    # compilation cache, so this checks the command, not XLA's speed.
    code = cli.main(["--config", str(REPO / "configs" / f"{name}.yaml"), "--dry-run", *overrides(name)])
    out, err = capsys.readouterr()
    assert code == 0, out[-2000:] + err[-2000:]
    assert "FLOPs per step" in out and "parameters" in out and "nothing trained or written" in out
