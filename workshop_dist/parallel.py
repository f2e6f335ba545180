"""Mesh and sharding: where every array of the training state and of each batch lives.

The mesh has three axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism with
parameters and optimizer state sharded, ZeRO-3 style) and ``tensor`` (tensor parallelism).
Batches are split over ``data`` x ``fsdp``. Parameters carry *logical* axis names
(``nnx.with_partitioning``); :class:`MeshConfiguration.logical_axis_rules` maps them onto mesh
axes, and FSDP then shards the largest remaining axis of every large parameter, so no model
needs sharding code of its own.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import pydantic
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from workshop_dist.config import ConfigError, StrictConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

DEFAULT_LOGICAL_AXIS_RULES: dict[str, str | None] = {
    "batch": None,
    "embed": None,
    "mlp": "tensor",
    "heads": "tensor",
    "vocab": "tensor",
    "latent": None,
    "conv_in": None,
    "conv_out": "tensor",
    "spatial": None,
}


class MeshConfiguration(StrictConfig):
    """Axis sizes of the device mesh; one of them may be -1 to take the remaining devices."""

    data: int = pydantic.Field(-1, description="Data-parallel axis size (-1: all remaining devices).")
    fsdp: int = pydantic.Field(1, description="Fully-sharded data-parallel axis size.")
    tensor: int = pydantic.Field(1, description="Tensor-parallel axis size.")
    dcn_data: int = pydantic.Field(
        1, ge=1, description="Slices (multi-slice TPU): the data axis is split this many ways over DCN."
    )
    logical_axis_rules: dict[str, str | None] = pydantic.Field(
        default_factory=dict,
        description="Logical axis name -> mesh axis (or null); merged over the defaults.",
    )
    fsdp_min_size: int = pydantic.Field(
        1024, ge=1, description="Parameters with fewer elements stay replicated over fsdp."
    )

    @pydantic.model_validator(mode="after")
    def _check_sizes(self) -> MeshConfiguration:
        sizes = {name: getattr(self, name) for name in MESH_AXES}
        for name, size in sizes.items():
            if size == 0 or size < -1:
                raise ValueError(f"mesh.{name} must be a positive size or -1 (fill), got {size}")
        if list(sizes.values()).count(-1) > 1:
            raise ValueError("at most one mesh axis may be -1 (fill with the remaining devices)")
        for logical, mesh_axis in self.logical_axis_rules.items():
            if mesh_axis is not None and mesh_axis not in MESH_AXES:
                raise ValueError(
                    f"logical_axis_rules['{logical}'] = '{mesh_axis}' is not a mesh axis; use one of {MESH_AXES} or null"
                )
        return self

    @property
    def rules(self) -> dict[str, str | None]:
        return {**DEFAULT_LOGICAL_AXIS_RULES, **self.logical_axis_rules}

    @property
    def fixed_data_parallel_size(self) -> int | None:
        """data x fsdp when both are given explicitly, else None (known only with the devices)."""
        if self.data == -1 or self.fsdp == -1:
            return None
        return self.data * self.fsdp

    def axis_sizes(self, num_devices: int) -> dict[str, int]:
        """Resolve -1 against ``num_devices``; the product must use every device."""
        sizes = {name: getattr(self, name) for name in MESH_AXES}
        known = math.prod(size for size in sizes.values() if size != -1)
        for name, size in sizes.items():
            if size == -1:
                if num_devices % known:
                    raise ConfigError(
                        f"Cannot fill mesh.{name}: {num_devices} devices are not divisible by the "
                        f"other axes' product {known}. Choose mesh sizes whose product divides {num_devices}."
                    )
                sizes[name] = num_devices // known
        if math.prod(sizes.values()) != num_devices:
            raise ConfigError(
                f"Mesh data={sizes['data']} x fsdp={sizes['fsdp']} x tensor={sizes['tensor']} uses "
                f"{math.prod(sizes.values())} devices but {num_devices} are available. Set one axis to -1 "
                "to use all devices, or make the product equal the device count."
            )
        if sizes["data"] % self.dcn_data:
            raise ConfigError(f"mesh.data={sizes['data']} is not divisible by mesh.dcn_data={self.dcn_data}.")
        return sizes


def make_mesh(config: MeshConfiguration, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build the ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all, all hosts)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = config.axis_sizes(len(devices))
    shape = tuple(sizes[name] for name in MESH_AXES)
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if config.dcn_data > 1:
        from jax.experimental import mesh_utils

        # Granules joined by the data-center network: TPU slices, else hosts (e.g. GPU nodes).
        slices = {getattr(device, "slice_index", None) for device in devices}
        by_host = None in slices or len(slices) == 1
        granules = len({device.process_index for device in devices}) if by_host else len(slices)
        if granules % config.dcn_data:
            kind = "processes (hosts)" if by_host else "TPU slices"
            raise ConfigError(
                f"mesh.dcn_data={config.dcn_data} splits the data axis over the data-center network, but "
                f"the devices form {granules} {kind}; set mesh.dcn_data to a divisor of {granules}."
            )
        ici_shape = (sizes["data"] // config.dcn_data, sizes["fsdp"], sizes["tensor"])
        grid = mesh_utils.create_hybrid_device_mesh(
            ici_shape, (config.dcn_data, 1, 1), devices, process_is_granule=by_host
        )
        return Mesh(grid, MESH_AXES, axis_types=axis_types)
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (example) axis split over data x fsdp, everything else replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
    """Raise a ConfigError unless the batch splits evenly over devices and processes."""
    dp = data_parallel_size(mesh)
    if global_batch_size % dp:
        raise ConfigError(
            f"training.batch_size={global_batch_size} is not divisible by the data-parallel size "
            f"{dp} (mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}). Use a multiple of {dp}."
        )
    if global_batch_size % jax.process_count():
        raise ConfigError(
            f"training.batch_size={global_batch_size} is not divisible by the {jax.process_count()} processes."
        )


def host_batch_to_global(
    batch: Mapping[str, Any], mesh: Mesh, sharding: NamedSharding | None = None
) -> dict[str, jax.Array]:
    """Assemble each process's share of the batch into global arrays sharded over data x fsdp.

    ``batch`` holds this process's examples (global batch / process count of them); the
    result is one logical global batch, with each device holding its slice. ``sharding``
    overrides the default example-axis split (e.g. ``P(None, BATCH_AXES)`` for stacked batches).
    """
    sharding = sharding or batch_sharding(mesh)
    if jax.process_count() == 1:
        return {key: jax.device_put(np.asarray(value), sharding) for key, value in batch.items()}
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value)) for key, value in batch.items()
    }


def parameter_spec(
    shape: Sequence[int],
    logical_axes: Sequence[str | None] | None,
    mesh: Mesh,
    config: MeshConfiguration,
) -> P:
    """The mesh PartitionSpec of one parameter.

    1. Each logical axis name goes through the rules (e.g. ``mlp -> tensor``); a mesh axis is used
       only if it has more than one device and divides that dimension, and at most once.
    2. FSDP: if the parameter has at least ``fsdp_min_size`` elements, its largest still
       unsharded dimension that ``fsdp`` divides is sharded over ``fsdp``.
    """
    rules = config.rules
    logical_axes = tuple(logical_axes or ())
    if logical_axes and len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {logical_axes} do not match parameter shape {tuple(shape)}")
    spec: list[str | None] = [None] * len(shape)
    used: set[str] = set()
    for dim, name in enumerate(logical_axes):
        mesh_axis = rules.get(name) if name is not None else None
        size = mesh.shape.get(mesh_axis, 1) if mesh_axis else 1
        if mesh_axis and size > 1 and mesh_axis not in used and shape[dim] % size == 0:
            spec[dim] = mesh_axis
            used.add(mesh_axis)
    fsdp = mesh.shape["fsdp"]
    if fsdp > 1 and "fsdp" not in used and math.prod(shape) >= config.fsdp_min_size:
        free = [dim for dim in range(len(shape)) if spec[dim] is None and shape[dim] % fsdp == 0]
        if free:
            spec[max(free, key=lambda dim: shape[dim])] = "fsdp"
    return P(*spec)


def parameter_shardings(
    abstract_params: Any, logical_specs: Any, mesh: Mesh, config: MeshConfiguration
) -> Any:
    """NamedSharding for every parameter, from its shape and its logical axis names."""

    def one(param: Any, logical: P | None) -> NamedSharding:
        return NamedSharding(mesh, parameter_spec(param.shape, tuple(logical or ()), mesh, config))

    # logical_specs has a PartitionSpec (or None) where abstract_params has an array.
    return jax.tree.map(one, abstract_params, logical_specs)


def optimizer_state_shardings(tx: Any, opt_shapes: Any, param_shardings: Any, default: NamedSharding) -> Any:
    """Optimizer moments follow their parameter's sharding; counters and the like are replicated."""
    import optax

    return optax.tree_map_params(
        tx, lambda _, sharding: sharding, opt_shapes, param_shardings, transform_non_params=lambda _: default
    )


def place(tree: Any, shardings: Any) -> Any:
    """Copy values that are identical on every process onto the mesh with ``shardings``
    (a tree matching ``tree``, or one sharding for every leaf).

    Local values always go through a host copy: ``device_put`` may let a shard share the
    source buffer (even with ``may_alias=False``, for a replicated array on the source's
    device), and donating the result would then delete the caller's array, e.g. a parameter
    of the module a user handed to the Trainer.
    """

    def one(value: Any, sharding: NamedSharding) -> jax.Array:
        if isinstance(value, jax.Array) and not value.is_fully_addressable:
            return jax.device_put(value, sharding)  # already global: reshard
        host = np.array(value)  # a copy, never a view of a device buffer
        if jax.process_count() == 1:
            return jax.device_put(host, sharding)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    return jax.tree.map(one, tree, shardings)


# A peer still compiling is waited for this long (big programs take minutes to compile on TPUs);
# a dead peer is caught sooner, by the coordination service's heartbeat.
BARRIER_TIMEOUT_SECONDS = 1800
_barrier_numbers = itertools.count()


def barrier(name: str) -> None:
    """Wait until every process reaches this point: the coordination service's barrier, not a device
    collective (on CPU a collective gives up when a peer is 30 s late). No-op in one process."""
    if jax.process_count() == 1:
        return
    from orbax.checkpoint import multihost

    # Each barrier id is used once; processes pass their barriers in the same order, so they agree.
    multihost.sync_global_processes(
        f"workshop-{next(_barrier_numbers)}-{name}", timeout=BARRIER_TIMEOUT_SECONDS,
        processes=set(range(jax.process_count())),
    )


class CompiledTogether:
    """A jitted function that, in a multi-process run, compiles each new input signature on every
    process before any process runs it.

    A computation's first cross-process collective waits only 30 s for a late peer on CPU (XLA's Gloo
    contexts), and a peer still compiling is late: under load, or when the persistent compilation
    cache answers one process and not the other. So the first call of each signature is compiled
    ahead (``lower(...).compile()``, which jit then reuses) and followed by a :func:`barrier`. In one
    process it is the jitted function itself, at no cost. Everything else (``lower``, ...) passes through.
    """

    def __init__(self, jitted: Callable[..., Any], name: str):
        self._jitted, self._name = jitted, name
        self._signatures: set[tuple] = set()
        self._together: bool | None = None  # known at the first call (after jax.distributed.initialize)

    def __call__(self, *args: Any) -> Any:
        if self._together is None:
            self._together = jax.process_count() > 1
        if self._together:  # the signature costs tens of microseconds: multi-process runs only
            signature = _signature(args)
            if signature not in self._signatures:
                self._jitted.lower(*args).compile()
                barrier(f"compiled-{self._name}")
                self._signatures.add(signature)
        return self._jitted(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._jitted, name)


def _signature(args: Any) -> tuple:
    """What jit compiles for: each array's shape, dtype and sharding, and every other argument's value."""
    leaves, structure = jax.tree.flatten(args)
    return structure, tuple(
        (leaf.shape, leaf.dtype, getattr(leaf, "sharding", None)) if hasattr(leaf, "shape") else leaf for leaf in leaves
    )
