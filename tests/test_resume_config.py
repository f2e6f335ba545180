"""Config changes on resume: the diff, its classification, and learning-rate continuity."""

import numpy as np
import pytest

from workshop_dist.experiment import ExperimentConfiguration
from workshop_dist.optim import create_schedule
from workshop_dist.resume_config import MISSING, ConfigChange, config_diff, format_changes, schedule_changes
from workshop_dist.training import TrainingConfiguration

COSINE = ["training.scheduler={scheduler_type: cosine, warmup_steps: 5, min_lr_ratio: 0.1}"]


def resolved(*overrides: str) -> dict:
    return ExperimentConfiguration.from_dict({}, list(overrides)).model_dump(mode="json")


def test_identical_configs_have_no_changes():
    assert config_diff(resolved(*COSINE), resolved(*COSINE)) == []


def test_each_changed_leaf_is_named_with_old_and_new_and_classified():
    old = resolved(*COSINE, "training.length.max_steps=60")
    new = resolved(
        *COSINE,
        "training.length.max_steps=90",
        "training.cadence.log_every=5",
        "model.hidden_dims=[64, 32]",
        "model.parameters={beta: 0.5}",
        "training.optimizer.optimizer_type=sgd",
        "training.optimizer.beta1=0.9",  # the default: not a change
        "training.seed=3",
    )
    changes = {c.field: c for c in config_diff(old, new)}
    assert set(changes) == {
        "training.length.max_steps", "training.cadence.log_every", "model.hidden_dims", "model.parameters.beta",
        "training.optimizer.optimizer_type", "training.seed",
    }  # fmt: skip
    assert changes["training.length.max_steps"] == ("training.length.max_steps", 60, 90)  # a plain (field, old, new) tuple
    assert str(changes["model.hidden_dims"]) == "model.hidden_dims: [256, 128] -> [64, 32]"
    assert str(changes["model.parameters.beta"]) == "model.parameters.beta: (unset) -> 0.5"
    assert changes["model.parameters.beta"].old is MISSING
    kinds = {field: change.kind for field, change in changes.items()}
    assert kinds == {
        "training.length.max_steps": "schedule", "training.cadence.log_every": "harmless", "model.hidden_dims": "shape",
        "model.parameters.beta": "model", "training.optimizer.optimizer_type": "shape", "training.seed": "data",
    }  # fmt: skip
    text = format_changes(list(changes.values()))
    lines = text.splitlines()
    assert len(lines) == 6
    assert "  training.cadence.log_every: 100 -> 5" in lines  # harmless: no kind shown
    assert "  model.hidden_dims: [256, 128] -> [64, 32]  [shape]" in lines


@pytest.mark.parametrize(
    ("field", "old", "new", "kind"),
    [
        ("training.ema.decay", None, 0.99, "shape"),  # EMA state appears
        ("training.ema.decay", 0.99, 0.999, "harmless"),  # same arrays
        ("training.optimizer.gradient_clip_norm", None, 1.0, "shape"),  # one more link in the optax chain
        ("training.optimizer.gradient_clip_norm", 10.0, 1.0, "harmless"),
        ("training.optimizer.momentum", 0.0, 0.9, "shape"),
        ("training.optimizers.critic", MISSING, {"learning_rate": 0.1}, "shape"),
        ("training.optimizers.generator.learning_rate", 0.1, 0.2, "schedule"),
        ("training.scheduler", None, {"scheduler_type": "cosine"}, "schedule"),
        ("model.remat", "none", "full", "harmless"),
        ("model.param_dtype", "float32", "bfloat16", "shape"),
        ("mesh.data", -1, 4, "data"),
        ("training.checkpoint.max_to_keep", 5, 2, "harmless"),
        ("logging.trackers", ["jsonl"], ["jsonl", "tensorboard"], "harmless"),
    ],
)
def test_classification(field, old, new, kind):
    assert ConfigChange(field, old, new).kind == kind


def test_bool_and_int_are_not_confused():
    assert config_diff({"a": True}, {"a": 1}) == [("a", True, 1)]
    assert config_diff({"a": [1, 2]}, {"a": (1, 2)}) == []  # JSON round trips turn tuples into lists


def training(*overrides: str) -> dict:
    return resolved("training.num_epochs=100", *overrides)["training"]


def test_an_extended_cosine_run_is_named_and_kept_continuous():
    old, new = training(*COSINE, "training.length.max_steps=60"), training(*COSINE, "training.length.max_steps=90")
    (change,) = schedule_changes(old, new, step=50, steps_per_epoch=7)
    old_schedule = create_schedule(TrainingConfiguration(**old).scheduler, 1e-3, 60)
    new_schedule = create_schedule(TrainingConfiguration(**new).scheduler, 1e-3, 90)
    assert change.before == pytest.approx(float(old_schedule(50)))
    assert change.after == pytest.approx(float(new_schedule(50)))
    assert change.after > 2 * change.before  # re-stretched: the rate jumps back up
    assert change.overrides == {"training.scheduler.cycle_length": 60}
    assert change.continuous == pytest.approx(change.before)
    assert "learning rate at step 50" in str(change) and "cycle_length=60" in str(change)

    # With the override, the extended run follows the old schedule at every step, then its final rate.
    pinned = TrainingConfiguration(**new).model_copy(deep=True)
    pinned.scheduler.cycle_length = change.overrides["training.scheduler.cycle_length"]
    pinned_schedule = create_schedule(pinned.scheduler, 1e-3, 90)
    steps = np.arange(91)
    rates = np.array([float(pinned_schedule(s)) for s in steps])
    np.testing.assert_allclose(rates[:61], [float(old_schedule(s)) for s in steps[:61]], rtol=1e-6)
    np.testing.assert_allclose(rates[60:], 1e-4, rtol=1e-5)


def test_a_second_extension_keeps_the_pin_of_the_first():
    """The first extension saved its config with cycle_length=60; the same command again must not unpin it."""
    pinned = "training.scheduler={scheduler_type: cosine, warmup_steps: 5, min_lr_ratio: 0.1, cycle_length: 60}"
    old = training(pinned, "training.length.max_steps=90")
    for max_steps in (90, 120):  # started again as it was, then extended once more
        (change,) = schedule_changes(old, training(*COSINE, f"training.length.max_steps={max_steps}"), 90, 7)
        assert change.overrides == {"training.scheduler.cycle_length": 60}
        assert change.continuous == pytest.approx(change.before) == pytest.approx(1e-4)
    # Unchanged length and no pin before: nothing to say.
    assert schedule_changes(training(*COSINE, "training.length.max_steps=90"), training(*COSINE, "training.length.max_steps=90"), 50, 7) == []


def test_a_linear_schedule_pins_total_steps_and_groups_are_handled_each():
    linear = "training.scheduler={scheduler_type: linear, warmup_steps: 2}"
    groups = "training.optimizers={generator: {learning_rate: 0.01}, critic: {learning_rate: 0.02, scheduler: {scheduler_type: constant}}}"
    old, new = training(linear, groups, "training.num_epochs=2"), training(linear, groups, "training.num_epochs=4")
    changes = {c.group: c for c in schedule_changes(old, new, step=10, steps_per_epoch=7)}
    assert set(changes) == {"generator"}  # the critic's constant rate does not move
    assert changes["generator"].overrides == {"training.scheduler.total_steps": 14}
    assert changes["generator"].continuous == pytest.approx(changes["generator"].before)


def test_deliberate_changes_are_named_without_overrides():
    old = training(*COSINE, "training.length.max_steps=60")
    new_rate = training(*COSINE, "training.length.max_steps=60", "training.optimizer.learning_rate=5e-4")
    (change,) = schedule_changes(old, new_rate, step=30, steps_per_epoch=7)
    assert change.overrides == {} and change.after == pytest.approx(change.before / 2)
    explicit = "training.scheduler={scheduler_type: cosine, warmup_steps: 5, min_lr_ratio: 0.1, cycle_length: 60}"
    # The length is set explicitly: a longer run does not move the schedule at all.
    assert schedule_changes(training(explicit, "training.length.max_steps=60"), training(explicit, "training.length.max_steps=90"), 40, 7) == []
    # A constant schedule does not depend on the run length.
    assert schedule_changes(training("training.length.max_steps=60"), training("training.length.max_steps=90"), 40, 7) == []


def test_the_checkpoints_config_is_read_before_anything_is_built(tmp_path):
    from workshop_dist.checkpoint import CheckpointManager
    from workshop_dist.resume_config import saved_config

    assert saved_config(tmp_path / "none") is None
    manager = CheckpointManager(tmp_path)
    old, new = resolved(*COSINE, "training.length.max_steps=60"), resolved(*COSINE, "training.length.max_steps=90")
    manager.save(4, {"w": np.arange(3.0)}, metadata={"step": 4}, config=old)
    manager.save(8, {"w": np.arange(3.0)}, metadata={"step": 8})  # no config item
    manager.close()
    (tmp_path / "12.orbax-checkpoint-tmp").mkdir()  # a killed save
    step, config = saved_config(tmp_path)
    assert step == 4 and config == old
    assert [str(c) for c in config_diff(config, new)] == ["training.length.max_steps: 60 -> 90"]


def test_a_checkpoint_of_an_older_version_shows_only_real_changes(tmp_path):
    """Fields this version added (their defaults) and deprecated names are not changes; a pin is applied."""
    from workshop_dist import resume
    from workshop_dist.checkpoint import CheckpointManager

    old = resolved(*COSINE, "training.num_epochs=100", "training.length.max_steps=60")
    del old["eval"], old["training"]["on_config_change"]  # an older version's config had neither
    old["training"]["max_steps"] = old["training"].pop("length")["max_steps"]  # nor the sections
    manager = CheckpointManager(tmp_path / "checkpoints")
    manager.save(50, {"w": np.arange(3.0)}, metadata={"step": 50}, config=old)
    manager.close()
    config = ExperimentConfiguration.from_dict({}, [*COSINE, "training.num_epochs=100", "training.length.max_steps=90"])
    plan = resume.plan(config, tmp_path, steps_per_epoch=7)
    assert plan.step == 50 and not plan.finished
    assert [str(c) for c in plan.changes] == [
        "training.scheduler.cycle_length: null -> 60", "training.length.max_steps: 60 -> 90"
    ]
    assert plan.config.training.scheduler.cycle_length == 60 and plan.total_steps == 90
    assert [s.overrides for s in plan.schedules] == [{"training.scheduler.cycle_length": 60}]
    same = ExperimentConfiguration.from_dict({}, [*COSINE, "training.num_epochs=100", "training.length.max_steps=60"])
    assert resume.plan(same, tmp_path, steps_per_epoch=7).changes == []


def test_the_finished_message_names_the_field_that_set_the_length():
    from workshop_dist.resume import ResumePlan

    by_steps = ExperimentConfiguration.from_dict({}, ["training.num_epochs=100", "training.length.max_steps=60"])
    assert ResumePlan(by_steps, 60, [], [], 60).finished_message() == (
        "Run already finished at step 60 (training.length.max_steps=60); nothing to do. "
        "Raise training.length.max_steps to train on."
    )
    by_epochs = ExperimentConfiguration.from_dict({}, ["training.num_epochs=2", "training.length.max_steps=60"])
    plan = ResumePlan(by_epochs, 14, [], [], by_epochs.training.total_steps(7))
    assert plan.finished and "(training.num_epochs=2); nothing to do. Raise training.num_epochs to train on." in (
        plan.finished_message()
    )
    assert not ResumePlan(by_epochs, 13, [], [], 14).finished and not ResumePlan(by_epochs, None, [], [], 14).finished
