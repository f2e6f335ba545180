"""Schedules (values at chosen steps against hand-written formulas), optimizers, clipping,
weight decay, the one clip-norm setting and invalid combinations."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pydantic
import pytest

from workshop_dist.config import ConfigError
from workshop_dist.experiment import ExperimentConfiguration
from workshop_dist.optim import (
    OPTIMIZER_FIELD_USERS,
    SCHEDULER_FIELD_USERS,
    OptimizerConfiguration,
    SchedulerConfiguration,
    create_optimizer,
    create_schedule,
)
from workshop_dist.training import TrainingConfiguration

LR = 0.3


def values(schedule: optax.Schedule, steps: list[int]) -> np.ndarray:
    return np.array([float(schedule(step)) for step in steps])


def check(config: SchedulerConfiguration | None, expected: dict[int, float], total_steps: int | None = None):
    schedule = create_schedule(config, LR, total_steps)
    steps = list(expected)
    np.testing.assert_allclose(values(schedule, steps), [expected[s] for s in steps], rtol=1e-5, atol=1e-7)


# Hand-written references (plain Python, no optax).


def warmup_ref(step: int, warmup: int) -> float:
    return LR * step / warmup


def cosine_ref(step: int, warmup: int, length: int, ratio: float) -> float:
    if step < warmup:
        return warmup_ref(step, warmup)
    end = LR * ratio
    if step >= length:
        return end
    progress = (step - warmup) / (length - warmup)
    return end + (LR - end) * 0.5 * (1 + math.cos(math.pi * progress))


def linear_ref(step: int, warmup: int, total: int, ratio: float) -> float:
    if step < warmup:
        return warmup_ref(step, warmup)
    end = LR * ratio
    if step >= total:
        return end
    return LR + (end - LR) * (step - warmup) / (total - warmup)


# --------------------------------------------------------------------------- schedules


def test_no_scheduler_is_constant():
    check(None, {0: LR, 1: LR, 10_000: LR})


def test_constant_without_warmup():
    check(SchedulerConfiguration(scheduler_type="constant"), {0: LR, 7: LR, 1_000_000: LR})


def test_constant_with_warmup():
    config = SchedulerConfiguration(scheduler_type="constant", warmup_steps=10)
    check(config, {0: 0.0, 1: 0.1 * LR, 5: 0.5 * LR, 9: 0.9 * LR, 10: LR, 11: LR, 5000: LR})


def test_cosine_without_warmup():
    config = SchedulerConfiguration(scheduler_type="cosine", cycle_length=100, min_lr_ratio=0.1)
    expected = {
        0: LR,
        25: 0.1 * LR + 0.9 * LR * 0.5 * (1 + math.cos(math.pi / 4)),
        50: 0.1 * LR + 0.9 * LR * 0.5,  # halfway: the midpoint between peak and floor
        75: 0.1 * LR + 0.9 * LR * 0.5 * (1 + math.cos(3 * math.pi / 4)),
        100: 0.1 * LR,
        150: 0.1 * LR,
        10_000: 0.1 * LR,
    }
    check(config, expected)


def test_cosine_with_warmup_counts_warmup_in_cycle_length():
    config = SchedulerConfiguration(scheduler_type="cosine", warmup_steps=10, cycle_length=110)
    expected = {0: 0.0, 5: 0.5 * LR, 10: LR, 60: 0.5 * LR, 110: 0.0, 111: 0.0, 1000: 0.0}
    check(config, expected)
    check(config, {s: cosine_ref(s, 10, 110, 0.0) for s in (3, 17, 42, 85, 109)})


def test_cosine_with_warmup_and_floor_matches_formula():
    config = SchedulerConfiguration(
        scheduler_type="cosine", warmup_steps=20, cycle_length=220, min_lr_ratio=0.05
    )
    steps = (0, 1, 19, 20, 21, 70, 120, 170, 219, 220, 221, 10_000)
    check(config, {s: cosine_ref(s, 20, 220, 0.05) for s in steps})


def test_cosine_cycle_length_defaults_to_total_steps():
    config = SchedulerConfiguration(scheduler_type="cosine", warmup_steps=10, min_lr_ratio=0.2)
    expected = {10: LR, 105: 0.2 * LR + 0.8 * LR * 0.5, 200: 0.2 * LR, 300: 0.2 * LR}
    check(config, expected, total_steps=200)
    check(config, {s: cosine_ref(s, 10, 200, 0.2) for s in (4, 50, 150, 199)}, total_steps=200)


def test_cosine_explicit_cycle_length_wins_over_total_steps():
    config = SchedulerConfiguration(scheduler_type="cosine", cycle_length=50)
    check(config, {25: 0.5 * LR, 50: 0.0, 100: 0.0}, total_steps=1000)


def test_linear_without_warmup():
    config = SchedulerConfiguration(scheduler_type="linear", total_steps=100)
    check(config, {0: LR, 25: 0.75 * LR, 50: 0.5 * LR, 99: 0.01 * LR, 100: 0.0, 250: 0.0})


def test_linear_with_warmup_and_floor():
    config = SchedulerConfiguration(
        scheduler_type="linear", warmup_steps=20, total_steps=120, min_lr_ratio=0.5
    )
    expected = {0: 0.0, 10: 0.5 * LR, 20: LR, 70: 0.75 * LR, 120: 0.5 * LR, 1000: 0.5 * LR}
    check(config, expected)
    check(config, {s: linear_ref(s, 20, 120, 0.5) for s in (1, 19, 21, 33, 119)})


def test_linear_total_steps_defaults_to_run_length():
    config = SchedulerConfiguration(scheduler_type="linear", warmup_steps=10)
    check(config, {10: LR, 20: 0.8 * LR, 35: 0.5 * LR, 60: 0.0, 500: 0.0}, total_steps=60)


def test_exponential_without_warmup():
    config = SchedulerConfiguration(scheduler_type="exponential", decay_rate=0.5, decay_steps=10)
    expected = {0: LR, 5: LR * 0.5**0.5, 10: 0.5 * LR, 25: LR * 0.5**2.5, 100: LR * 0.5**10}
    check(config, expected)


def test_exponential_staircase():
    config = SchedulerConfiguration(
        scheduler_type="exponential", decay_rate=0.5, decay_steps=10, staircase=True
    )
    check(config, {0: LR, 9: LR, 10: 0.5 * LR, 19: 0.5 * LR, 25: 0.25 * LR, 100: LR * 0.5**10})


def test_exponential_decay_starts_after_warmup():
    config = SchedulerConfiguration(
        scheduler_type="exponential", warmup_steps=10, decay_rate=0.5, decay_steps=10
    )
    expected = {0: 0.0, 5: 0.5 * LR, 10: LR, 15: LR * 0.5**0.5, 20: 0.5 * LR, 40: LR * 0.5**3}
    check(config, expected)
    staircase = config.model_copy(update={"staircase": True})
    check(staircase, {10: LR, 19: LR, 20: 0.5 * LR, 29: 0.5 * LR, 30: 0.25 * LR})


def test_exponential_growth_rate_allowed():
    config = SchedulerConfiguration(scheduler_type="exponential", decay_rate=2.0, decay_steps=5)
    check(config, {0: LR, 5: 2 * LR, 15: 8 * LR})


def test_step_decays_every_step_size():
    config = SchedulerConfiguration(scheduler_type="step", step_size=10, gamma=0.5)
    check(config, {0: LR, 9: LR, 10: 0.5 * LR, 19: 0.5 * LR, 20: 0.25 * LR, 35: 0.125 * LR})


@pytest.mark.parametrize("gamma", [0.1, 0.5])
def test_step_has_no_cap_on_the_number_of_decays(gamma):
    schedule = create_schedule(SchedulerConfiguration(scheduler_type="step", step_size=7, gamma=gamma), LR)
    for k in (10, 20):
        got = float(schedule(k * 7))
        np.testing.assert_allclose(got, LR * gamma**k, rtol=1e-5, atol=0)
        np.testing.assert_allclose(float(schedule(k * 7 - 1)), LR * gamma ** (k - 1), rtol=1e-5, atol=0)


def test_step_with_warmup_keeps_absolute_steps():
    config = SchedulerConfiguration(scheduler_type="step", warmup_steps=5, step_size=10, gamma=0.5)
    check(config, {0: 0.0, 2: 0.4 * LR, 5: LR, 9: LR, 10: 0.5 * LR, 20: 0.25 * LR})
    longer = SchedulerConfiguration(scheduler_type="step", warmup_steps=15, step_size=10, gamma=0.5)
    check(longer, {10: 10 / 15 * LR, 15: 0.5 * LR, 20: 0.25 * LR})


def test_multistep_decays_at_each_milestone():
    config = SchedulerConfiguration(scheduler_type="multistep", milestones=[10, 30], gamma=0.1)
    check(config, {0: LR, 9: LR, 10: 0.1 * LR, 29: 0.1 * LR, 30: 0.01 * LR, 100_000: 0.01 * LR})


def test_multistep_with_warmup_keeps_absolute_milestones():
    config = SchedulerConfiguration(
        scheduler_type="multistep", warmup_steps=5, milestones=[10, 30], gamma=0.5
    )
    check(config, {0: 0.0, 4: 0.8 * LR, 5: LR, 9: LR, 10: 0.5 * LR, 30: 0.25 * LR})


@pytest.mark.parametrize(("kind", "field"), [("cosine", "cycle_length"), ("linear", "total_steps")])
def test_run_length_unknown_is_a_clear_config_error(kind, field):
    with pytest.raises(ConfigError) as info:
        create_schedule(SchedulerConfiguration(scheduler_type=kind, warmup_steps=5), LR)
    message = str(info.value)
    assert f"scheduler.{field} is not set" in message
    assert "steps_per_epoch" in message
    assert "max_steps" in message


@pytest.mark.parametrize(("kind", "field"), [("cosine", "cycle_length"), ("linear", "total_steps")])
def test_defaulted_run_length_must_exceed_warmup(kind, field):
    # The user set neither field: the message speaks of the run's length and how to fix it.
    with pytest.raises(ConfigError) as info:
        create_schedule(SchedulerConfiguration(scheduler_type=kind, warmup_steps=10), LR, total_steps=10)
    message = str(info.value)
    assert "The run has 10 steps, not more than scheduler.warmup_steps (10)" in message
    assert f"set scheduler.{field}" in message and "warmup_steps" in message


# --------------------------------------------------------------------------- optimizers


TARGET = jnp.array([1.0, 1.0, -1.0, 2.0])
START = jnp.array([3.0, -2.0, 1.5, 0.5])


def quadratic(w: jax.Array) -> jax.Array:
    return jnp.sum((w - TARGET) ** 2)


def run_quadratic(tx: optax.GradientTransformation, steps: int) -> jax.Array:
    def one(carry, _):
        w, state = carry
        updates, state = tx.update(jax.grad(quadratic)(w), state, w)
        return (optax.apply_updates(w, updates), state), None

    (w, _), _ = jax.lax.scan(one, (START, tx.init(START)), None, length=steps)
    return w


def build(**fields) -> optax.GradientTransformation:
    config = OptimizerConfiguration(**fields)
    return create_optimizer(config, create_schedule(None, config.learning_rate))


def first_update(tx: optax.GradientTransformation, grads, params):
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


@pytest.mark.parametrize(
    ("kind", "lr"),
    [("adam", 0.1), ("adamw", 0.1), ("sgd", 0.1), ("rmsprop", 0.05), ("adagrad", 0.5), ("lamb", 0.05)],
)
def test_every_optimizer_lowers_a_quadratic(kind, lr):
    initial = float(quadratic(START))
    final = float(quadratic(run_quadratic(build(optimizer_type=kind, learning_rate=lr), 200)))
    assert final < 0.1 * initial


def sgd_reference(lr: float, momentum: float, nesterov: bool, steps: int) -> np.ndarray:
    w = np.asarray(START, dtype=np.float64)
    target = np.asarray(TARGET, dtype=np.float64)
    trace = np.zeros_like(w)
    for _ in range(steps):
        g = 2 * (w - target)
        trace = g + momentum * trace
        direction = g + momentum * trace if nesterov else trace
        w = w - lr * direction
    return w


def test_sgd_momentum_and_nesterov_follow_their_formulas_and_differ():
    lr, steps = 0.05, 3
    plain = np.asarray(run_quadratic(build(optimizer_type="sgd", learning_rate=lr), steps))
    heavy = np.asarray(run_quadratic(build(optimizer_type="sgd", learning_rate=lr, momentum=0.9), steps))
    nesterov = np.asarray(
        run_quadratic(build(optimizer_type="sgd", learning_rate=lr, momentum=0.9, nesterov=True), steps)
    )
    np.testing.assert_allclose(plain, sgd_reference(lr, 0.0, False, steps), rtol=1e-5)
    np.testing.assert_allclose(heavy, sgd_reference(lr, 0.9, False, steps), rtol=1e-5)
    np.testing.assert_allclose(nesterov, sgd_reference(lr, 0.9, True, steps), rtol=1e-5)
    assert np.abs(plain - heavy).max() > 1e-2
    assert np.abs(plain - nesterov).max() > 1e-2
    assert np.abs(heavy - nesterov).max() > 1e-2


def test_rmsprop_nesterov_differs_from_plain_momentum():
    heavy = run_quadratic(build(optimizer_type="rmsprop", learning_rate=0.01, momentum=0.9), 3)
    nesterov = run_quadratic(
        build(optimizer_type="rmsprop", learning_rate=0.01, momentum=0.9, nesterov=True), 3
    )
    assert float(jnp.abs(heavy - nesterov).max()) > 1e-3


def test_optimizer_follows_the_schedule():
    schedule = create_schedule(
        SchedulerConfiguration(scheduler_type="multistep", milestones=[1], gamma=0.1), 0.5
    )
    tx = create_optimizer(OptimizerConfiguration(optimizer_type="sgd", learning_rate=0.5), schedule)
    params = jnp.zeros(2)
    grads = jnp.array([1.0, -2.0])
    state = tx.init(params)
    first, state = tx.update(grads, state, params)
    second, _ = tx.update(grads, state, params)
    np.testing.assert_allclose(first, [-0.5, 1.0], rtol=1e-6)
    np.testing.assert_allclose(second, [-0.05, 0.1], rtol=1e-6)


# --------------------------------------------------------------------------- clipping


BIG_GRADS = {"a": jnp.array([300.0, 400.0]), "b": jnp.array([1200.0])}  # global norm 1300


def global_norm(tree) -> float:
    return float(optax.tree.norm(tree))


def test_clip_by_global_norm_caps_the_update_norm():
    tx = build(optimizer_type="sgd", learning_rate=1.0, gradient_clip_norm=2.0)
    params = jax.tree.map(jnp.zeros_like, BIG_GRADS)
    updates = first_update(tx, BIG_GRADS, params)
    assert global_norm(updates) == pytest.approx(2.0, rel=1e-6)
    # Same direction, scaled by 2 / 1300.
    for key in BIG_GRADS:
        np.testing.assert_allclose(updates[key], -BIG_GRADS[key] * 2.0 / 1300.0, rtol=1e-6)


def test_clip_by_global_norm_leaves_small_gradients_alone():
    tx = build(optimizer_type="sgd", learning_rate=1.0, gradient_clip_norm=10.0)
    grads = jnp.array([3.0, 4.0])
    np.testing.assert_allclose(first_update(tx, grads, jnp.zeros(2)), [-3.0, -4.0], rtol=1e-6)


def test_clip_by_value_caps_each_element():
    tx = build(optimizer_type="sgd", learning_rate=1.0, gradient_clip_value=1.0)
    grads = jnp.array([5.0, -7.0, 0.25, -0.5])
    updates = first_update(tx, grads, jnp.zeros(4))
    np.testing.assert_allclose(updates, [-1.0, 1.0, -0.25, 0.5], rtol=1e-6)


def test_clip_norm_wins_when_both_are_set():
    tx = build(optimizer_type="sgd", learning_rate=1.0, gradient_clip_norm=2.0, gradient_clip_value=0.5)
    updates = first_update(tx, jnp.array([3.0, 4.0]), jnp.zeros(2))
    # Norm clipping gives [1.2, 1.6]; value clipping would have given [0.5, 0.5].
    np.testing.assert_allclose(updates, [-1.2, -1.6], rtol=1e-6)


def test_clipping_happens_before_the_optimizer():
    # Adam normalizes each coordinate, so only clipping *before* it changes nothing here;
    # clipping after it would cap the update at 0.01 instead of lr = 0.1.
    tx = build(optimizer_type="adam", learning_rate=0.1, gradient_clip_norm=0.01)
    updates = first_update(tx, jnp.array([30.0, -40.0]), jnp.zeros(2))
    np.testing.assert_allclose(updates, [-0.1, 0.1], rtol=1e-5)


# --------------------------------------------------------------------------- weight decay


def adam_reference(grads_fn, w0, lr, b1, b2, eps, l2, steps):
    """Plain numpy Adam on g + l2 * w (coupled L2); returns the updates."""
    w = np.asarray(w0, dtype=np.float64)
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    updates = []
    for t in range(1, steps + 1):
        g = grads_fn(w) + l2 * w
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        update = -lr * m_hat / (np.sqrt(v_hat) + eps)
        updates.append(update)
        w = w + update
    return updates


def test_adamw_decays_a_parameter_with_zero_gradient():
    params = jnp.array([1.0, -2.0, 3.0])
    tx = build(optimizer_type="adamw", learning_rate=0.01, weight_decay=0.1)
    np.testing.assert_allclose(first_update(tx, jnp.zeros(3), params), -0.01 * 0.1 * params, rtol=1e-6)
    no_decay = build(optimizer_type="adamw", learning_rate=0.01, weight_decay=0.0)
    np.testing.assert_allclose(first_update(no_decay, jnp.zeros(3), params), 0.0, atol=0)


def test_adam_weight_decay_is_a_coupled_l2_term():
    lr, wd = 0.01, 1.0
    params = jnp.array([1.0, 1.0, 2.0, -4.0])
    grads = jnp.array([1.0, -0.5, 0.0, 0.0])
    tx = build(optimizer_type="adam", learning_rate=lr, weight_decay=wd)
    updates = first_update(tx, grads, params)
    # First Adam step on g' = g + wd * w is -lr * g' / (|g'| + eps): g' = [2, 0.5, 2, -4].
    np.testing.assert_allclose(updates, [-lr, -lr, -lr, lr], rtol=1e-5)
    # Without the L2 term the second coordinate would move the other way and the last two not at all.
    plain = first_update(build(optimizer_type="adam", learning_rate=lr), grads, params)
    np.testing.assert_allclose(plain, [-lr, lr, 0.0, 0.0], rtol=1e-5, atol=1e-12)
    # Decoupled (adamw) is different: -lr * (g / (|g| + eps) + wd * w).
    decoupled = first_update(build(optimizer_type="adamw", learning_rate=lr, weight_decay=wd), grads, params)
    np.testing.assert_allclose(decoupled, [-2 * lr, 0.0, -2 * lr, 4 * lr], rtol=1e-5, atol=1e-6)


def test_adam_weight_decay_matches_reference_over_several_steps():
    lr, wd, b1, b2, eps = 0.05, 0.3, 0.8, 0.95, 1e-8
    target = np.asarray(TARGET, dtype=np.float64)
    tx = build(optimizer_type="adam", learning_rate=lr, weight_decay=wd, beta1=b1, beta2=b2, eps=eps)
    expected = adam_reference(lambda w: 2 * (w - target), START, lr, b1, b2, eps, wd, steps=4)
    w, state = START, tx.init(START)
    for want in expected:
        update, state = tx.update(jax.grad(quadratic)(w), state, w)
        np.testing.assert_allclose(update, want, rtol=1e-4, atol=1e-7)
        w = optax.apply_updates(w, update)


def test_sgd_weight_decay_is_coupled():
    params = jnp.array([2.0, -1.0])
    grads = jnp.array([0.5, 0.5])
    tx = build(optimizer_type="sgd", learning_rate=0.1, weight_decay=0.2)
    np.testing.assert_allclose(first_update(tx, grads, params), -0.1 * (grads + 0.2 * params), rtol=1e-6)


def test_lamb_weight_decay_is_decoupled():
    # Zero gradient: the Adam part is 0, the update direction is wd * w and the trust ratio
    # ||w|| / ||wd * w|| = 1 / wd, so the update is exactly -lr * w.
    params = jnp.array([1.0, -2.0, 3.0])
    tx = build(optimizer_type="lamb", learning_rate=0.01, weight_decay=0.1)
    np.testing.assert_allclose(first_update(tx, jnp.zeros(3), params), -0.01 * params, rtol=1e-5)
    no_decay = build(optimizer_type="lamb", learning_rate=0.01)
    np.testing.assert_allclose(first_update(no_decay, jnp.zeros(3), params), 0.0, atol=0)


# --------------------------------------------------------------------------- one clip-norm setting


def test_the_old_training_clip_norm_becomes_the_optimizers_with_a_warning():
    optimizer = OptimizerConfiguration(optimizer_type="sgd", learning_rate=1.0, momentum=0.5)
    with pytest.warns(DeprecationWarning, match=r"training.gradient_clip_norm .* use training.optimizer.gradient_clip_norm"):
        training = TrainingConfiguration(optimizer=optimizer, gradient_clip_norm=2.0)
    assert training.optimizer.gradient_clip_norm == 2.0
    assert training.optimizer.model_dump(exclude={"gradient_clip_norm"}) == optimizer.model_dump(exclude={"gradient_clip_norm"})
    assert "gradient_clip_norm" not in TrainingConfiguration.model_fields  # one setting, not two
    tx = create_optimizer(training.optimizer, create_schedule(None, 1.0))
    updates = first_update(tx, BIG_GRADS, jax.tree.map(jnp.zeros_like, BIG_GRADS))
    assert global_norm(updates) == pytest.approx(2.0, rel=1e-6)


def test_the_old_training_clip_norm_reaches_every_group_optimizer():
    groups = {"generator": {"learning_rate": 0.1}, "discriminator": {"learning_rate": 0.2, "gradient_clip_norm": 3.0}}
    with pytest.warns(DeprecationWarning):
        training = TrainingConfiguration(optimizers=groups, gradient_clip_norm=3.0)
    assert {g: o.gradient_clip_norm for g, o in training.optimizers.items()} == {"generator": 3.0, "discriminator": 3.0}


def test_equal_clip_norms_in_both_places_are_accepted():
    with pytest.warns(DeprecationWarning):
        training = TrainingConfiguration(optimizer=OptimizerConfiguration(gradient_clip_norm=3.0), gradient_clip_norm=3.0)
    assert training.optimizer.gradient_clip_norm == 3.0


def test_clip_norm_beats_clip_value():
    optimizer = OptimizerConfiguration(optimizer_type="sgd", learning_rate=1.0, gradient_clip_value=0.5, gradient_clip_norm=2.0)
    tx = create_optimizer(optimizer, create_schedule(None, 1.0))
    np.testing.assert_allclose(first_update(tx, jnp.array([3.0, 4.0]), jnp.zeros(2)), [-1.2, -1.6], rtol=1e-6)


def test_conflicting_clip_norms_are_rejected():
    with pytest.warns(DeprecationWarning), pytest.raises(pydantic.ValidationError, match=r"gradient_clip_norm is 2\.0 but optimizer"):
        TrainingConfiguration(optimizer=OptimizerConfiguration(gradient_clip_norm=1.0), gradient_clip_norm=2.0)
    with pytest.warns(DeprecationWarning), pytest.raises(ConfigError) as info:
        ExperimentConfiguration.from_dict({"training": {"gradient_clip_norm": 5.0, "optimizer": {"gradient_clip_norm": 1.0}}})
    assert "  training: gradient_clip_norm is 5.0 but optimizer.gradient_clip_norm is 1.0; set only optimizer.gradient_clip_norm" in str(info.value)


# --------------------------------------------------------------------------- invalid combinations


@pytest.mark.parametrize("kind", ["sgd", "rmsprop"])
def test_nesterov_without_momentum_is_rejected(kind):
    with pytest.raises(pydantic.ValidationError, match="nesterov=true needs momentum > 0"):
        OptimizerConfiguration(optimizer_type=kind, nesterov=True)
    assert OptimizerConfiguration(optimizer_type=kind, nesterov=True, momentum=0.9).nesterov


def test_nesterov_error_names_the_section():
    with pytest.raises(ConfigError) as info:
        ExperimentConfiguration.from_dict(
            {}, ["training.optimizer.optimizer_type=sgd", "training.optimizer.nesterov=true"]
        )
    assert "  training.optimizer: nesterov=true needs momentum > 0" in str(info.value)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"scheduler_type": "exponential", "decay_steps": 10},
            "'exponential' needs decay_rate and decay_steps",
        ),
        (
            {"scheduler_type": "exponential", "decay_rate": 0.5},
            "'exponential' needs decay_rate and decay_steps",
        ),
        ({"scheduler_type": "step"}, "'step' needs step_size"),
        ({"scheduler_type": "multistep"}, "'multistep' needs milestones"),
        ({"scheduler_type": "multistep", "milestones": [20, 10]}, "strictly increasing"),
        (
            {"scheduler_type": "cosine", "warmup_steps": 10, "cycle_length": 10},
            r"cycle_length \(10\) must exceed",
        ),
        (
            {"scheduler_type": "cosine", "warmup_steps": 10, "cycle_length": 5},
            r"cycle_length \(5\) must exceed",
        ),
        (
            {"scheduler_type": "linear", "warmup_steps": 10, "total_steps": 10},
            r"total_steps \(10\) must exceed",
        ),
    ],
)
def test_invalid_scheduler_combinations_are_rejected(fields, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        SchedulerConfiguration(**fields)


@pytest.mark.parametrize(
    ("cls", "fields", "field"),
    [
        (OptimizerConfiguration, {"optimizer_type": "adamax"}, "optimizer_type"),
        (OptimizerConfiguration, {"learning_rate": 0.0}, "learning_rate"),
        (OptimizerConfiguration, {"learning_rate": -0.1}, "learning_rate"),
        (OptimizerConfiguration, {"momentum": 1.0}, "momentum"),
        (OptimizerConfiguration, {"beta1": 1.0}, "beta1"),
        (OptimizerConfiguration, {"weight_decay": -0.1}, "weight_decay"),
        (OptimizerConfiguration, {"gradient_clip_norm": 0.0}, "gradient_clip_norm"),
        (OptimizerConfiguration, {"gradient_clip_value": -1.0}, "gradient_clip_value"),
        (SchedulerConfiguration, {"scheduler_type": "poly"}, "scheduler_type"),
        (SchedulerConfiguration, {"warmup_steps": -1}, "warmup_steps"),
        (SchedulerConfiguration, {"min_lr_ratio": 1.5}, "min_lr_ratio"),
        (SchedulerConfiguration, {"gamma": 0.0}, "gamma"),
        (SchedulerConfiguration, {"step_size": 0, "scheduler_type": "step"}, "step_size"),
    ],
)
def test_impossible_values_are_rejected_with_the_field_name(cls, fields, field):
    with pytest.raises(pydantic.ValidationError) as info:
        cls(**fields)
    assert [error["loc"] for error in info.value.errors()] == [(field,)]


# --------------------------------------------------------------------------- fields the type ignores


COMMON_OPTIMIZER_FIELDS = {"optimizer_type", "learning_rate", "weight_decay", "gradient_clip_norm", "gradient_clip_value"}
COMMON_SCHEDULER_FIELDS = {"scheduler_type", "warmup_steps"}
OPTIMIZER_TYPES = ["adam", "adamw", "sgd", "rmsprop", "adagrad", "lamb"]
SCHEDULER_TYPES = ["constant", "cosine", "linear", "exponential", "step", "multistep"]
# A value for each type-specific field that changes the result of every type that reads it.
CHANGED_OPTIMIZER_VALUES = {"beta1": 0.5, "beta2": 0.9, "eps": 0.1, "momentum": 0.9, "nesterov": True, "decay": 0.5}
CHANGED_SCHEDULER_VALUES = {
    "cycle_length": 20,
    "min_lr_ratio": 0.3,
    "total_steps": 25,
    "decay_rate": 0.8,
    "decay_steps": 3,
    "staircase": True,
    "step_size": 4,
    "gamma": 0.3,
    "milestones": [3, 8],
}


def test_every_field_is_either_common_or_in_the_users_table():
    assert set(OptimizerConfiguration.model_fields) == COMMON_OPTIMIZER_FIELDS | set(OPTIMIZER_FIELD_USERS)
    assert set(SchedulerConfiguration.model_fields) == COMMON_SCHEDULER_FIELDS | set(SCHEDULER_FIELD_USERS)
    assert set(CHANGED_OPTIMIZER_VALUES) == set(OPTIMIZER_FIELD_USERS)
    assert set(CHANGED_SCHEDULER_VALUES) == set(SCHEDULER_FIELD_USERS)


@pytest.mark.parametrize("field", sorted(OPTIMIZER_FIELD_USERS))
def test_optimizer_users_table_matches_what_create_optimizer_reads(field):
    # Built without validation: the table must say exactly which types react to the field.
    for kind in OPTIMIZER_TYPES:
        base = {"optimizer_type": kind, "learning_rate": 0.05, "momentum": 0.5 if field == "nesterov" else 0.0}
        plain = OptimizerConfiguration.model_construct(**base)
        changed = OptimizerConfiguration.model_construct(**{**base, field: CHANGED_OPTIMIZER_VALUES[field]})
        results = [run_quadratic(create_optimizer(c, optax.constant_schedule(0.05)), 5) for c in (plain, changed)]
        differs = not np.allclose(*results, rtol=0, atol=0)
        assert differs == (kind in OPTIMIZER_FIELD_USERS[field]), (field, kind)


@pytest.mark.parametrize("field", sorted(SCHEDULER_FIELD_USERS))
def test_scheduler_users_table_matches_what_create_schedule_reads(field):
    required = {"step_size": 7, "decay_rate": 0.5, "decay_steps": 5, "milestones": [5, 12]}
    for kind in SCHEDULER_TYPES:
        plain = SchedulerConfiguration.model_construct(scheduler_type=kind, **required)
        changed = SchedulerConfiguration.model_construct(
            scheduler_type=kind, **{**required, field: CHANGED_SCHEDULER_VALUES[field]}
        )
        steps = list(range(41))
        curves = [values(create_schedule(c, LR, total_steps=40), steps) for c in (plain, changed)]
        differs = not np.array_equal(*curves)
        assert differs == (kind in SCHEDULER_FIELD_USERS[field]), (field, kind)


@pytest.mark.parametrize(
    ("cls", "kind_field", "kind", "field", "users"),
    [
        (OptimizerConfiguration, "optimizer_type", "adam", "momentum", "sgd, rmsprop"),
        (OptimizerConfiguration, "optimizer_type", "sgd", "beta1", "adam, adamw, lamb"),
        (OptimizerConfiguration, "optimizer_type", "adagrad", "decay", "rmsprop"),
        (SchedulerConfiguration, "scheduler_type", "cosine", "milestones", "multistep"),
        (SchedulerConfiguration, "scheduler_type", "step", "decay_rate", "exponential"),
        (SchedulerConfiguration, "scheduler_type", "multistep", "min_lr_ratio", "cosine, linear"),
    ],
)
def test_a_set_field_the_type_ignores_is_an_error_naming_field_and_types(cls, kind_field, kind, field, users):
    required = {"step": {"step_size": 5}, "multistep": {"milestones": [5]}}.get(kind, {})
    value = (CHANGED_OPTIMIZER_VALUES | CHANGED_SCHEDULER_VALUES)[field]
    with pytest.raises(pydantic.ValidationError) as info:
        cls(**{kind_field: kind, field: value, **required})
    [error] = info.value.errors()
    assert error["loc"] == (field,)
    assert f"{field} is used only by {kind_field} {users}; with {kind_field} '{kind}' it would be ignored" in error["msg"]


def test_defaults_of_ignored_fields_never_trigger_the_check():
    # What a resolved config spells out: every field, most at their defaults.
    assert OptimizerConfiguration(optimizer_type="adam", momentum=0.0, nesterov=False, decay=0.9).momentum == 0.0
    assert SchedulerConfiguration(scheduler_type="cosine", milestones=[], gamma=0.1, step_size=None).milestones == []
    for kind in OPTIMIZER_TYPES:
        OptimizerConfiguration(optimizer_type=kind)


def test_changing_the_type_by_assignment_checks_the_fields_already_set():
    config = SchedulerConfiguration(scheduler_type="cosine", min_lr_ratio=0.1)
    with pytest.raises(pydantic.ValidationError, match="min_lr_ratio is used only by scheduler_type cosine, linear"):
        config.scheduler_type = "step"
