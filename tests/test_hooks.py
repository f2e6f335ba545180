"""The loop and its hooks: user hooks run at exactly the steps they ask for (also with several steps
per call), see every metric up to their step, and their time stays out of step time."""

import time

import jax
import numpy as np
import pytest

from tests.helpers import digits_images, training_config
from workshop_dist import ModelConfiguration, Trainer, create_model
from workshop_dist.training.clock import Clock

TRAIN = digits_images("train")


def quadratic_trainer(**training):
    model = create_model(ModelConfiguration(model_class="tests.helpers.QuadraticModel"), rngs=0)
    settings = {"batch_size": 64, "num_epochs": 1, "steps_per_epoch": 12, "log_every": 100, "num_samples": 0, **training}
    return Trainer(model, training_config(**settings), TRAIN, None, None)


class AtSteps:
    """A hook object: runs at the given steps; records what it saw."""

    kind = "test"

    def __init__(self, steps):
        self.steps, self.seen = sorted(steps), []

    def next_step(self, step):
        return next((s for s in self.steps if s > step), None)

    def __call__(self, info):
        rows_read = [row["step"] for interval in info.metrics for row in interval.rows]
        self.seen.append((info.step, int(jax.device_get(info.state.step)), rows_read[-1] if rows_read else None))


@pytest.mark.parametrize("steps_per_call", [1, 4])
def test_user_hooks_run_at_exactly_their_steps_and_change_nothing(steps_per_call):
    plain = quadratic_trainer(steps_per_call=steps_per_call)
    plain.train_epoch()
    trainer = quadratic_trainer(steps_per_call=steps_per_call)
    every = []
    trainer.add_hook(lambda info: every.append(info.step), every=5)
    odd = trainer.add_hook(AtSteps([2, 3, 7, 11, 40]))
    trainer.train_epoch()
    assert every == [5, 10]
    # at its step, the state is that step's and every metric up to it has been read
    assert odd.seen == [(2, 2, 2), (3, 3, 3), (7, 7, 7), (11, 11, 11)]
    assert trainer.step == 12 and [row["step"] for row in trainer.train_metrics] == list(range(1, 13))
    np.testing.assert_array_equal(jax.device_get(trainer.state.params["w"]), jax.device_get(plain.state.params["w"]))


def test_a_hook_answering_its_current_step_runs_before_the_next_step():
    trainer = quadratic_trainer(steps_per_call=4)
    ran = []

    class Urgent:
        def next_step(self, step):
            return step if step >= 5 and not ran else None  # e.g. a notice that arrived during a call

        def __call__(self, info):
            ran.append(info.step)

    trainer.add_hook(Urgent())
    trainer.train_epoch()
    assert ran == [8]  # asked after the call that ended at 8 (steps 5-8): runs there, once


def test_hook_time_is_kept_out_of_step_time():
    seen = []
    trainer = quadratic_trainer(log_every=4, steps_per_epoch=8, num_epochs=2)
    trainer.log_callback = lambda step, metrics, prefix: seen.append(metrics)
    trainer.add_hook(lambda info: time.sleep(0.3), every=2)
    trainer.train_epoch()  # compiles
    seen.clear()
    trainer.train_epoch()
    assert len(seen) == 2  # steps 9-12 and 13-16; the hook ran at 10, 12, 14 and 16
    # a hook's time counts in the interval it ran in: 10 in the first; 12 (after that interval was read) and 14 in the second
    assert [metrics["hook_time"] for metrics in seen] == pytest.approx([0.3, 0.6], abs=0.08)
    assert all(metrics["step_time"] < 0.1 for metrics in seen)


def test_a_hook_needs_next_step_and_call():
    trainer = quadratic_trainer()
    with pytest.raises(TypeError, match="add_hook"):
        trainer.add_hook(lambda info: None)
    with pytest.raises(ValueError, match="positive"):
        trainer.add_hook(lambda info: None, every=0)


def test_the_clock_keeps_phases_out_of_training_time():
    clock = Clock()
    clock.restart()
    time.sleep(0.05)
    with clock.phase("eval", step=3):
        time.sleep(0.2)
    clock.add("data_wait", 0.01)
    lap = clock.lap()
    assert 0.04 < lap.train_seconds < 0.15
    assert lap.phases["eval"] == pytest.approx(0.2, abs=0.05)
    assert lap.waits["data_wait"] == 0.01
    [span] = clock.spans
    assert (span.kind, span.step) == ("eval", 3) and span.seconds == lap.phases["eval"]
    assert clock.lap().phases == {}  # the next lap starts after the last


def test_the_readme_hook_example_runs_as_written(capsys):
    from tests.test_readme import python_block

    trainer = quadratic_trainer(steps_per_epoch=200, steps_per_call=8)
    exec(compile(python_block("## Hooks"), "README.md", "exec"), {"trainer": trainer})
    trainer.train_epoch()
    printed = capsys.readouterr().out.split()
    assert printed[0::3] == ["100", "200"] and printed[2::3] == ["100", "200"]  # both forms, at their steps
    losses = {row["step"]: row["loss"] for row in trainer.train_metrics}
    assert [float(value) for value in printed[1::3]] == pytest.approx([losses[100], losses[200]])
