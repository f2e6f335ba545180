"""Ahead-of-time compilation for a TPU slice this machine does not have.

``workshop-train --dry-run --target tpu:v5p-128`` answers "does this config fit, and how fast
could it be?" before any TPU time is spent. libtpu (PyPI; ``workshop-dist[tpu-aot]``) is the TPU
compiler, :mod:`jax.experimental.topologies` describes the slice as compile-only devices, the
engine builds the state abstractly (no arrays) and XLA compiles one full training step for the
slice: its memory analysis gives bytes per chip, its cost analysis FLOPs per chip. A step that
does not fit makes the TPU compiler itself refuse (RESOURCE_EXHAUSTED).

Targets follow Cloud TPU accelerator types: ``tpu:<type>-<n>[x<slices>]`` where ``n``
counts TensorCores for v4 and v5p (two per chip: ``v5p-128`` is 64 chips) and chips for v5e
and v6e; ``x2`` asks for two such slices joined by the data-center network (multi-slice).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import math
import os
import re
import time
from collections.abc import Callable
from typing import Any

from workshop_dist import hardware
from workshop_dist._deps import PROJECT, DependencyError
from workshop_dist.config import ConfigError

# HBM per chip, GiB, from the Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/
# v4, /v5e, /v5p, /v6e: "HBM capacity per chip" 32, 16, 95 and 32). The TPU runtime keeps a
# little for itself (XLA reports 15.75 GiB usable on v5e); the compiler's own check is final.
HBM_GIB = {"v4": 32.0, "v5e": 16.0, "v5p": 95.0, "v6e": 32.0}
# Per generation: the libtpu topology prefix, whether the name counts cores (2 per chip, one
# megacore JAX device per chip) and the accelerator-type name Cloud TPU uses.
_GENERATIONS = {"v4": ("v4", True, "v4"), "v5p": ("v5", True, "v5p"), "v5e": ("v5e", False, "v5litepod"),
                "v6e": ("v6e", False, "v6e")}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}
_PLANAR_CHIPS = (1, 4, 8, 16, 32, 64, 128, 256)  # v5e / v6e slice sizes (2D torus, 256 chips a pod)
ASSUMED_MFU = 0.5  # MaxText reports 55-70% on v5e/v5p for large models; small ones get far less
EXAMPLES = "tpu:v5e-8, tpu:v5p-128, tpu:v4-32, tpu:v6e-256, tpu:v5e-256x2 (two slices)"
_TARGET = re.compile(r"tpu:(?P<type>[a-z0-9]+)-(?P<n>\d+)(?:x(?P<slices>[1-9]\d*))?")


@dataclasses.dataclass(frozen=True)
class Target:
    """One TPU slice type, times ``slices`` slices."""

    spec: str  # as the user wrote it
    generation: str  # v4, v5e, v5p, v6e
    chips_per_slice: int
    slices: int
    topology: str  # libtpu's name, e.g. "v5e:2x4" or "v5:4x4x4"

    @property
    def chips(self) -> int:
        return self.chips_per_slice * self.slices

    @property
    def hbm_bytes(self) -> int:
        return int(HBM_GIB[self.generation] * 2**30)

    @property
    def accelerator_type(self) -> str:
        """Cloud TPU's name of one slice, e.g. ``v5litepod-16`` or ``v5p-128``."""
        _, cores, cloud = _GENERATIONS[self.generation]
        return f"{cloud}-{self.chips_per_slice * (2 if cores else 1)}"


def parse_target(spec: str) -> Target:
    """``tpu:v5p-128`` -> Target; anything else is a ConfigError that lists valid examples."""
    match = _TARGET.fullmatch(spec.strip().lower())
    bad = f"--target {spec!r}"
    if not match:
        raise ConfigError(f"{bad} is not a TPU target; use tpu:<type>-<size>[x<slices>], e.g. {EXAMPLES}.")
    generation = _ALIASES.get(match["type"], match["type"])
    if generation not in _GENERATIONS:
        raise ConfigError(f"{bad}: unknown TPU type {match['type']!r}; known: {', '.join(_GENERATIONS)} (e.g. {EXAMPLES}).")
    prefix, cores, _ = _GENERATIONS[generation]
    n, slices = int(match["n"]), int(match["slices"] or 1)
    if cores:  # v4 / v5p: n TensorCores = n / 2 chips in a 3D torus
        chips = n // 2
        if n % 2 or not (chips in (4, 8, 16, 32) or (chips >= 64 and chips % 64 == 0)):
            raise ConfigError(
                f"{bad}: {generation}-<n> counts TensorCores (2 per chip): n is 8, 16, 32, 64 or a multiple "
                f"of 128 (whole 4x4x4 cubes), e.g. {generation}-8, {generation}-128, {generation}-384."
            )
        shape = _cube_shape(chips)
    else:  # v5e / v6e: n chips in a 2D torus
        chips = n
        if chips not in _PLANAR_CHIPS:
            raise ConfigError(f"{bad}: {generation}-<n> counts chips: n is one of {', '.join(map(str, _PLANAR_CHIPS))}.")
        k = chips.bit_length() - 1
        shape = (2 ** (k // 2), 2 ** (k - k // 2))
    return Target(spec, generation, chips, slices, f"{prefix}:{'x'.join(map(str, shape))}")


def _cube_shape(chips: int) -> tuple[int, int, int]:
    """The usual 3D slice shape: 2x2x1 doubled up to 2x4x4; beyond, the most even stack of 4x4x4 cubes."""
    if chips < 64:
        return {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4)}[chips]
    cubes = chips // 64
    stacks = [(a, b, cubes // (a * b)) for a in range(1, cubes + 1) for b in range(a, cubes + 1)
              if cubes % (a * b) == 0 and cubes // (a * b) >= b]
    a, b, c = min(stacks, key=lambda abc: (abc[2], abc[1]))  # the shortest longest side
    return (4 * a, 4 * b, 4 * c)


# ----------------------------------------------------------------------------- libtpu


def libtpu_requirement() -> str | None:
    """The libtpu version the installed jax was released with (its ``jax[tpu]`` extra), e.g. ``==0.0.42.*``."""
    for line in importlib.metadata.requires("jax") or []:
        if line.startswith("libtpu") and 'extra == "tpu"' in line:
            return line.split(";")[0].removeprefix("libtpu").strip()
    return None


def check_libtpu() -> str:
    """The installed libtpu version, or a DependencyError naming the one that matches jax."""
    import jax

    wanted = libtpu_requirement()
    pin = f'"libtpu{wanted}"' if wanted else "libtpu"
    fix = f'pip install "{PROJECT}[tpu-aot]" (installs jax[tpu] for jax {jax.__version__}: {pin})'
    try:
        version = importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        raise DependencyError(
            f"Compiling for a TPU target needs libtpu (the TPU compiler; no TPU needed), which is not installed.\n"
            f"  fix: {fix}"
        ) from None
    if wanted:
        from packaging.specifiers import SpecifierSet  # packaging comes with matplotlib and pip

        if version not in SpecifierSet(wanted):
            raise DependencyError(
                f"libtpu {version} is installed, but jax {jax.__version__} was built against libtpu{wanted}; "
                f"a mismatched TPU compiler fails or crashes.\n  fix: {fix}"
            )
    return version


def topology_devices(target: Target) -> list[Any]:
    """Compile-only JAX devices of ``target`` (one per chip; multi-slice ones carry ``slice_index``)."""
    import jax
    from jax.experimental import topologies

    _quiet_libtpu(target)
    options: dict[str, Any] = {"num_slices": target.slices} if target.slices > 1 else {}
    if _GENERATIONS[target.generation][1]:
        options["chip_config_name"] = "megacore"  # one JAX device per chip, as on a real v4/v5p VM
    try:
        return list(topologies.get_topology_desc(target.topology, "tpu", **options).devices)
    except (jax.errors.JaxRuntimeError, RuntimeError, ValueError) as err:
        raise ConfigError(f"libtpu cannot describe {target.spec} (topology {target.topology}): {err}") from err


def _quiet_libtpu(target: Target) -> None:
    """Off a TPU VM libtpu looks for the VM's workers and type (logging errors without them) and
    takes /tmp/libtpu_lockfile, which another process using libtpu may hold: give it this target's
    (nothing compiled changes) and skip the lock, as no chip is touched. JAX itself stays on CPU."""
    import jax

    if not hardware.tpu_chips_attached():
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", target.accelerator_type)
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if jax.config.jax_platforms is None:
        with contextlib.suppress(Exception):  # backends already initialised: their choice stands
            jax.config.update("jax_platforms", "cpu")


# ----------------------------------------------------------------------------- compile and report


@dataclasses.dataclass
class AotReport:
    """What one compiled training step needs on each chip of ``target``."""

    target: Target
    device_kind: str
    mesh_shape: dict[str, int]
    batch_size: int
    parameters: int
    state_bytes: int  # per chip: params, optimizer state, ... in their shardings
    batch_bytes: int  # per chip
    argument_bytes: int  # XLA: the step's inputs on one chip (state + batch, with TPU padding)
    output_bytes: int  # XLA: outputs not written in place of donated inputs
    temp_bytes: int  # XLA: activations, gradients, scratch
    code_bytes: int
    flops_per_chip: float | None
    compile_seconds: float
    libtpu_version: str
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes + self.temp_bytes + self.code_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.target.hbm_bytes

    @property
    def peak_flops(self) -> float | None:
        return next((peak for name, peak in hardware.PEAK_BF16_FLOPS if name in self.device_kind), None)

    def step_seconds(self, mfu: float = ASSUMED_MFU) -> float | None:
        """Compute-bound step time at ``mfu`` of the chip's peak bf16 FLOP/s."""
        peak = self.peak_flops
        return self.flops_per_chip / (peak * mfu) if self.flops_per_chip and peak else None

    def format(self) -> str:
        t, hbm = self.target, self.target.hbm_bytes
        slices = f"{t.slices} slices of {t.chips_per_slice}" if t.slices > 1 else "1 slice"
        per_chip = self.batch_size // max(1, math.prod(self.mesh_shape[a] for a in ("data", "fsdp")))
        lines = [
            f"target               {t.spec}: {t.chips} chips ({self.device_kind}, {slices}, topology {t.topology})",
            f"mesh                 {self.mesh_shape}; global batch {self.batch_size} ({per_chip} per data shard)",
            f"parameters           {self.parameters:,}",
            f"memory per chip      of {_size(hbm)} HBM",
            f"  arguments          {_size(self.argument_bytes):>10}  (state {_size(self.state_bytes)}, batch {_size(self.batch_bytes)})",
            f"  outputs            {_size(self.output_bytes):>10}  (not written in place of the donated state)",
            f"  temporaries        {_size(self.temp_bytes):>10}  (activations, gradients, scratch)",
            f"  program            {_size(self.code_bytes):>10}",
            f"  total              {_size(self.total_bytes):>10}  ({100 * self.total_bytes / hbm:.2g}% of HBM: "
            f"{'fits' if self.fits else 'does NOT fit'})",
        ]
        if self.flops_per_chip:
            flops = self.flops_per_chip
            lines.append(f"FLOPs per step       {flops:.4g} per chip, {flops * t.chips:.4g} in all (XLA cost analysis)")
        if (seconds := self.step_seconds()) is not None:
            lines.append(
                f"step time estimate   {_duration(seconds)} at {ASSUMED_MFU:.0%} MFU of {self.peak_flops / 1e12:.0f} "
                "TFLOP/s bf16 per chip (compute only; small models are bound by overheads instead)"
            )
        lines.append(f"compile time         {self.compile_seconds:.1f} s (libtpu {self.libtpu_version})")
        return "\n".join(["Ahead-of-time compile: one training step, nothing run.", *("  " + x for x in lines), *self.notes])


class DoesNotFitError(ConfigError):
    """The training step needs more memory per chip than the target has."""


def compile_for_target(config: Any, target: Target | str) -> AotReport:
    """Compile ``config``'s training step (an ExperimentConfiguration) for ``target``; report its needs.

    Raises :class:`DoesNotFitError` (naming the shortfall and what to change) when the step
    does not fit the chips' HBM.
    """
    import jax

    from workshop_dist import parallel
    from workshop_dist.training.engine import Engine
    from workshop_dist.training.plan import make_plan

    target = parse_target(target) if isinstance(target, str) else target
    libtpu_version = check_libtpu()
    devices = topology_devices(target)
    mesh_config, notes = config.mesh, []
    if target.slices > 1 and mesh_config.dcn_data == 1:
        mesh_config = mesh_config.model_copy(update={"dcn_data": target.slices})
        notes.append(f"note: mesh.dcn_data={target.slices}: the data axis spans the {target.slices} slices over DCN.")
    mesh = parallel.make_mesh(mesh_config, devices=devices)
    training = config.training
    parallel.check_batch_size(training.batch_size, mesh)
    parallel.check_batch_size(training.batch_size // training.performance.grad_accum_steps, mesh)

    example_spec, num_examples, note = _example_spec(config)
    notes += [note] if note else []
    steps_per_epoch = num_examples // training.batch_size if num_examples else None
    if steps_per_epoch == 0:
        notes.append(f"note: the training split has {num_examples} examples, fewer than one batch of {training.batch_size}.")
    # The schedule's length changes nothing compiled: without a real one, a notional long run.
    total_steps = training.total_steps(steps_per_epoch) if steps_per_epoch else training.length.max_steps or 100_000
    spec = {key: jax.ShapeDtypeStruct((training.batch_size, *s.shape), s.dtype) for key, s in example_spec.items()}
    engine = Engine(make_plan(config.model, training, total_steps), mesh, mesh_config, spec, abstract=True)
    batch = engine.batch_spec
    state_bytes, batch_bytes = _bytes_per_chip(engine.state_shapes), _bytes_per_chip(batch)
    parameters = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(engine.state_shapes.params))
    if "bfloat16" not in (training.performance.precision, config.model.dtype):
        notes.append("note: model.dtype=float32: TPU matmuls run slower in f32 than the bf16 peak assumed here.")

    start = time.perf_counter()
    try:
        compiled = engine.lower().compile()
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        raise DoesNotFitError(_shortfall(target, config, dict(mesh.shape), state_bytes, None, str(err))) from None
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    flops = float(cost["flops"]) if cost and cost.get("flops") else None
    report = AotReport(  # in field order
        target, devices[0].device_kind, {str(k): int(v) for k, v in mesh.shape.items()}, training.batch_size,
        parameters, state_bytes, batch_bytes, memory.argument_size_in_bytes,
        memory.output_size_in_bytes - memory.alias_size_in_bytes, memory.temp_size_in_bytes,
        memory.generated_code_size_in_bytes, flops, seconds, libtpu_version, notes,
    )
    if not report.fits:
        raise DoesNotFitError(_shortfall(target, config, report.mesh_shape, state_bytes, report.total_bytes, None))
    return report


def dry_run_target(config: Any, spec: str, echo: Callable[[str], None] = print) -> int:
    """The CLI's ``--dry-run --target``: print the report; exit code 0 when the step fits."""
    echo(compile_for_target(config, spec).format())
    return 0


def _example_spec(config: Any) -> tuple[dict[str, Any], int | None, str | None]:
    """Shapes of one training example, read from the data; else an ``image`` of ``model.input_dim``."""
    import jax
    import numpy as np

    from workshop_dist import data
    from workshop_dist.config import WorkshopError

    try:
        source = config.data.model_copy(update={"cache": False})  # one example, not the whole split
        train = data.make_train_input(source, global_batch_size=1, seed=0, process_index=0, process_count=1)
    except WorkshopError as err:
        image = jax.ShapeDtypeStruct(tuple(config.model.input_dim), np.dtype(np.float32))
        return {"image": image}, None, f"note: data not readable here ({err}); batch = float32 images of model.input_dim."
    spec = {key: jax.ShapeDtypeStruct(value.shape[1:], value.dtype) for key, value in train.element_spec.items()}
    return spec, train.num_examples, None


def _bytes_per_chip(tree: Any) -> int:
    import jax
    import numpy as np

    leaves = jax.tree.leaves(tree)
    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize for leaf in leaves)


def _shortfall(target: Target, config: Any, mesh: dict[str, int], state: int, total: int | None, compiler: str | None) -> str:
    """The message of a step that does not fit: how much is missing and what to change."""
    hbm = target.hbm_bytes
    needed, available = total, hbm
    if compiler is not None:  # e.g. "... required for HLO temporaries (32.09G) exceeds available HBM (15.75G)"
        sizes = [_parse_size(m) for m in re.findall(r"(\d+(?:\.\d+)?[KMGT])(?:i?B)?\b", compiler)]
        if len(sizes) >= 2:
            needed, available = max(sizes[:2]), min(sizes[:2])
    head = f"The training step does not fit on {target.spec} ({HBM_GIB[target.generation]:g} GiB HBM per chip)"
    if needed is not None:
        head += f": it needs {_size(needed)} per chip of {_size(available)} available, {_size(needed - available)} short"
    lines = [head + "."]
    if compiler is not None:
        lines.append(f"  compiler: {compiler.strip().splitlines()[0][:300]}")
    lines.append(f"  state per chip (params, optimizer state): {_size(state)}; mesh {mesh}")
    sharded = _size(state * mesh["fsdp"] // target.chips_per_slice)
    shard = (
        f"shard parameters and optimizer state over more chips: mesh.data={target.slices} mesh.fsdp=-1 "
        f"(now fsdp={mesh['fsdp']}; state per chip would be about {sharded})"
    ) if mesh["fsdp"] < target.chips_per_slice else None
    fsdp_first = shard is not None and state > hbm * 0.3
    accum = config.training.performance.grad_accum_steps
    others = [
        "model.remat=full (recompute block activations in the backward pass; models with repeated blocks)"
        if config.model.remat == "none" else None,
        f"training.performance.grad_accum_steps={accum * 2} (now {accum}: the same batch in smaller micro-batches)",
        f"a smaller training.batch_size (now {config.training.batch_size})",
    ]
    fixes = [shard, *others] if fsdp_first else [*others, shard]
    lines.append("  to fit, try: " + "; or ".join(fix for fix in fixes if fix) + "; or a target with more chips or HBM.")
    return "\n".join(lines)


def _parse_size(text: str) -> int:
    return int(float(text[:-1]) * 2 ** (10 * "KMGT".index(text[-1].upper()) + 10))


def _size(num_bytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(num_bytes) >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{int(num_bytes)} B"


def _duration(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"
