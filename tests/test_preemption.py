"""SIGTERM in one process, in-process and small: the watcher turns it into a checkpoint at the
next step boundary and ``Preempted``; the resumed run ends bit-identical to an uninterrupted one.
(The same across every family, and in real processes, is in the slow test_families/test_resume.)"""

import os
import signal

import jax
import numpy as np
import pytest
from flax import nnx

from tests.helpers import digits_images, tiny_model_config
from workshop_dist import Trainer, TrainingConfiguration, create_model
from workshop_dist.training.preemption import Preempted, PreemptionWatcher

TRAIN = digits_images("train")[:512]
STEPS, STOP = 6, 3


def make_trainer(workdir, **options):
    config = TrainingConfiguration(batch_size=64, length={"max_steps": STEPS}, cadence={"log_every": 1, "save_every": STEPS, "num_samples": 0})
    model = create_model(tiny_model_config(), rngs=nnx.Rngs(0))
    return Trainer(model, config, TRAIN, None, workdir, **options)


def leaves(trainer):
    return jax.tree.leaves(jax.device_get(trainer.state))


def test_sigterm_saves_at_a_step_boundary_and_the_resumed_run_is_bit_identical(tmp_path):
    full = make_trainer(tmp_path / "full")
    full.fit()
    full.close()

    before = signal.getsignal(signal.SIGTERM)
    watcher = PreemptionWatcher().install()
    try:

        def sigterm_at(step, metrics, prefix):
            if prefix == "train" and step >= STOP and watcher.signal_name is None:
                os.kill(os.getpid(), signal.SIGTERM)  # the real handler, as a scheduler's signal

        interrupted = make_trainer(tmp_path / "run", preemption=watcher, log_callback=sigterm_at)
        with pytest.raises(Preempted) as info:
            interrupted.fit()
        interrupted.close()
    finally:
        watcher.uninstall()
    assert info.value.signal_name == "SIGTERM" and STOP <= info.value.step < STEPS
    assert (tmp_path / "run" / "checkpoints" / str(info.value.step)).is_dir()
    assert signal.getsignal(signal.SIGTERM) == before  # uninstall gives the handler back

    resumed = make_trainer(tmp_path / "run")
    assert resumed.restore() == info.value.step
    resumed.fit()
    assert resumed.step == full.step == STEPS
    for a, b in zip(leaves(resumed), leaves(full), strict=True):
        np.testing.assert_array_equal(a, b)
    resumed.close()

