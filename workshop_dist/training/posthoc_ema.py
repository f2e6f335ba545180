"""Post-hoc EMA (EDM2: Karras et al., 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", section 3 and appendix C): the maths, as pure functions.

A *power-function EMA* with exponent ``gamma`` averages the parameters seen so far with
weights growing like ``tau^gamma``: at step ``t`` its profile over training time is

    p_{t, gamma}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),   0 <= tau <= t,

whose width relative to ``t`` (standard deviation / t) is
``sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))`` (EDM2's eq. 123; ``gamma = 0``,
the plain running mean, is the widest: ``1 / sqrt(12)``). It is tracked with the per-step
update ``ema <- beta ema + (1 - beta) params``, ``beta_t = (1 - 1/t)^(gamma + 1)``. Time is counted
in optimizer steps (``t = 1`` after the first update); with a fixed batch size this is
EDM2's images-seen time up to a constant factor, which the profiles do not depend on.

The update is exact for the discrete trajectory: after ``t`` updates the EMA is
``sum_tau w_tau params_tau`` with ``w_tau = (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1)``, i.e.
the continuous profile applied to parameters held constant over each step. So the profile
of any other width is approximated by a least-squares combination of the tracked
profiles' snapshots (EDM2's Algorithm 3): solve ``A x = b`` with ``A`` the inner products
between snapshot profiles and ``b`` those with the target, then apply ``x`` to the
snapshots. Reconstructing a tracked profile at one of its snapshots returns that snapshot.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SIGMA_REL_MAX = 1.0 / math.sqrt(12.0)  # gamma = 0


# --- widths and exponents -----------------------------------------------------------------------------
def gamma_to_sigma_rel(gamma: Any) -> np.ndarray:
    """Relative width of the power-function profile with exponent ``gamma`` (>= 0)."""
    gamma = np.asarray(gamma, np.float64)
    if np.any(gamma < 0):
        raise ValueError(f"power-function EMA exponents must be >= 0, got {gamma}")
    return np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: Any) -> np.ndarray:
    """Exponent ``gamma >= 0`` of the profile with relative width ``sigma_rel`` in (0, 1/sqrt(12)].

    ``sigma_rel^-2 (gamma + 1) = (gamma + 2)^2 (gamma + 3)`` is the cubic
    ``gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0`` with ``s = sigma_rel^-2``; on
    ``gamma >= 0`` the width decreases strictly, so the root there is unique (the largest real one).
    """
    sigma_rel = np.asarray(sigma_rel, np.float64)
    if np.any(sigma_rel <= 0) or np.any(sigma_rel > SIGMA_REL_MAX * (1 + 1e-12)):
        raise ValueError(f"sigma_rel must lie in (0, {SIGMA_REL_MAX:.4f}] (0: no averaging), got {sigma_rel}")
    s = sigma_rel.reshape(-1) ** -2.0
    roots = [np.roots([1.0, 7.0, 16.0 - si, 12.0 - si]) for si in s]
    gamma = np.array([max(r.real[np.abs(r.imag) < 1e-9 * max(1.0, abs(r.real).max())]) for r in roots])
    return np.maximum(gamma, 0.0).reshape(sigma_rel.shape)


# --- tracking during training ---------------------------------------------------------------------------
def power_ema_beta(step: Any, gamma: float) -> jax.Array:
    """``beta_t = (1 - 1/t)^(gamma + 1)`` for the ``t``-th update (``t >= 1``; ``beta_1 = 0``: a copy)."""
    t = jnp.asarray(step, jnp.float32)
    return jnp.exp((gamma + 1.0) * jnp.log1p(-1.0 / t))


def power_ema_update(ema: Any, params: Any, step: Any, gamma: float) -> Any:
    """One tracked profile's update after the ``step``-th optimizer update (jit-able; ``step`` may be traced)."""
    beta = power_ema_beta(step, gamma)
    return jax.tree.map(lambda e, p: (e + (1.0 - beta) * (p.astype(e.dtype) - e)).astype(e.dtype), ema, params)


def power_ema_weights(step: int, gamma: float) -> np.ndarray:
    """The weights ``w_1..w_t`` that :func:`power_ema_update` puts on ``params_1..params_t`` after ``t`` steps."""
    tau = np.arange(step + 1, dtype=np.float64) / step
    cumulative = tau ** (gamma + 1.0)
    return np.diff(cumulative)


# --- reconstruction ---------------------------------------------------------------------------------------
def profile_inner_products(t_a: Any, gamma_a: Any, t_b: Any, gamma_b: Any) -> np.ndarray:
    """``<p_{t_a, gamma_a}, p_{t_b, gamma_b}>`` (integral of the product over time), broadcast.

    With ``m = min(t_a, t_b)``: ``(g_a + 1)(g_b + 1) / (g_a + g_b + 1) * m^(g_a + g_b + 1) /
    (t_a^(g_a + 1) t_b^(g_b + 1))``, evaluated in log space.
    """
    t_a, g_a, t_b, g_b = (np.asarray(v, np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    m = np.minimum(t_a, t_b)
    log = (
        np.log(g_a + 1) + np.log(g_b + 1) - np.log(g_a + g_b + 1)
        + (g_a + g_b + 1) * np.log(m) - (g_a + 1) * np.log(t_a) - (g_b + 1) * np.log(t_b)
    )
    return np.exp(log)


def reconstruction_weights(
    snapshot_steps: Sequence[int], snapshot_sigma_rels: Sequence[float], target_sigma_rels: float | Sequence[float],
    target_step: int | None = None,
) -> np.ndarray:
    """Least-squares weights ``[num_snapshots, num_targets]`` (a column per target ``sigma_rel``).

    Snapshot ``i`` is the EMA of width ``snapshot_sigma_rels[i]`` saved after ``snapshot_steps[i]``
    updates; the target is the EMA at ``target_step`` (default: the last snapshot). Snapshots
    after ``target_step`` get weight 0. Each column is normalised to sum to 1 (as EDM2 does),
    so constant parameters stay constant; for a reachable target the sum is already 1.
    """
    steps = np.asarray(snapshot_steps, np.float64)
    widths = np.asarray(snapshot_sigma_rels, np.float64)
    if steps.shape != widths.shape or steps.ndim != 1 or steps.size == 0:
        raise ValueError("give one step and one sigma_rel per snapshot (non-empty, same length)")
    if np.any(steps < 1):
        raise ValueError(f"snapshot steps must be >= 1 (the profiles start at step 0), got {steps.min():g}")
    target_step = float(steps.max() if target_step is None else target_step)
    used = steps <= target_step
    if not np.any(used):
        raise ValueError(f"no snapshot at or before step {target_step:g}")
    targets = np.atleast_1d(np.asarray(target_sigma_rels, np.float64))
    gamma_in, gamma_out = sigma_rel_to_gamma(widths[used]), sigma_rel_to_gamma(targets)
    t_in = steps[used]
    a = profile_inner_products(t_in[:, None], gamma_in[:, None], t_in[None, :], gamma_in[None, :])
    b = profile_inner_products(t_in[:, None], gamma_in[:, None], target_step, gamma_out[None, :])
    try:
        x = np.linalg.solve(a, b)
    except np.linalg.LinAlgError:  # repeated snapshots make A singular: take the minimum-norm fit
        x = np.linalg.lstsq(a, b, rcond=None)[0]
    x = x / np.sum(x, axis=0, keepdims=True)
    weights = np.zeros((steps.size, targets.size))
    weights[used] = x
    return weights


def reconstruct(snapshots: Iterable[Any], weights: Any) -> Any:
    """``sum_i weights[i] * snapshots[i]`` over pytrees, accumulated in float64 one snapshot at a time.

    ``snapshots`` may be a lazy iterable (each loaded when needed, so memory holds one snapshot
    plus the sums). ``weights`` of shape ``[n]`` gives one pytree, ``[n, k]`` a list of ``k``.
    Leaves come back as numpy arrays in the snapshots' dtypes.
    """
    weights = np.asarray(weights, np.float64)
    single = weights.ndim == 1
    weights = weights[:, None] if single else weights
    sums: list[Any] | None = None
    dtypes: Any = None
    count = 0
    for i, snapshot in enumerate(snapshots):
        if i >= weights.shape[0]:
            raise ValueError(f"more snapshots than the {weights.shape[0]} weights")
        leaves = jax.tree.map(lambda a: np.asarray(a, np.float64), snapshot)
        if sums is None:
            dtypes = jax.tree.map(lambda a: np.asarray(a).dtype, snapshot)
            sums = [jax.tree.map(lambda a: np.zeros_like(a), leaves) for _ in range(weights.shape[1])]
        sums = [jax.tree.map(lambda s, a, w=w: s + w * a, s, leaves) for s, w in zip(sums, weights[i], strict=True)]
        count = i + 1
    if sums is None or count != weights.shape[0]:
        raise ValueError(f"got {count} snapshots for {weights.shape[0]} weights")
    out = [jax.tree.map(lambda s, d: s.astype(d), s, dtypes) for s in sums]
    return out[0] if single else out


# --- a run's snapshots -> checkpoints ------------------------------------------------------------------
def snapshots(directory: Any) -> list[tuple[int, Any, dict[str, float]]]:
    """``(step, path, {profile name: sigma_rel})`` of every snapshot under ``directory``, by step."""
    from workshop_dist import checkpoint, storage

    directory = storage.as_path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        if path.name.isdigit() and (path / checkpoint.STATE).is_dir():
            metadata = json.loads((path / "metadata" / "metadata").read_text())
            found.append((int(path.name), path, {k: float(v) for k, v in metadata["sigma_rels"].items()}))
    return sorted(found, key=lambda item: item[0])


def write_reconstructions(trainer: Any, sigma_rels: Sequence[float], out: Any = None) -> list[Any]:
    """For each target width, the EMA reconstructed from ``trainer``'s run's snapshots (at the last one)
    as a checkpoint directory ``OUT/sigma_rel_<w>`` (default ``OUT``: ``WORKDIR/posthoc_ema``): the
    restored run's state with its params (and EMA params) replaced, so ``--restore``, evaluation and
    sampling take it like any checkpoint. ``trainer`` has restored the run's latest checkpoint."""
    from workshop_dist import checkpoint, storage
    from workshop_dist.config import WorkshopError

    directory = trainer.workdir / "posthoc_ema"
    found = snapshots(directory)
    if not found:
        raise WorkshopError(
            f"No post-hoc EMA snapshots in {directory}: train with training.ema.posthoc set "
            "(e.g. training.ema.posthoc={sigma_rels: [0.05, 0.1], snapshot_every: 1000})."
        )
    steps = [step for step, _, profiles in found for _ in profiles]
    widths = [width for _, _, profiles in found for width in profiles.values()]
    weights = reconstruction_weights(steps, widths, list(sigma_rels))
    shapes = trainer.engine.state_shapes.params

    def profiles_in_order() -> Any:  # each snapshot read once, in the order of ``weights``' rows
        for _, path, profiles in found:
            saved = checkpoint.load_checkpoint_dir(path, {name: shapes for name in profiles})[0]
            yield from (saved[name] for name in profiles)

    averages = reconstruct(profiles_in_order(), weights)
    out = storage.as_path(out) if out is not None else directory
    written = []
    for width, average in zip(sigma_rels, averages, strict=True):
        placed = jax.device_put(average, trainer.engine.state_shardings.params)
        state = trainer.state
        trainer.state = state.replace(params=placed, ema_params=placed if state.ema_params is not None else None)
        written.append(trainer.save_checkpoint(out / f"sigma_rel_{width:g}"))
        trainer.state = state
    return written
