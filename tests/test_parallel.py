"""Mesh construction, parameter/batch placement, and SPMD equivalence with one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from tests.helpers import digits_images, tiny_model_config, training_config
from workshop_dist import parallel
from workshop_dist.config import ConfigError
from workshop_dist.models import create_model
from workshop_dist.parallel import MeshConfiguration
from workshop_dist.training import Trainer


def test_mesh_fills_remaining_devices():
    mesh = parallel.make_mesh(MeshConfiguration(data=-1, fsdp=4))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize(
    ("sizes", "message"),
    [({"data": 3, "fsdp": 1}, "uses 3 devices but 8"), ({"data": -1, "fsdp": 3}, "not divisible")],
)
def test_impossible_mesh_is_a_clear_error(sizes, message):
    with pytest.raises(ConfigError, match=message):
        parallel.make_mesh(MeshConfiguration(**sizes))


def test_dcn_data_needs_slices_or_hosts_to_split_over():
    with pytest.raises(ConfigError, match=r"dcn_data=2 .* devices form 1 processes \(hosts\)"):
        parallel.make_mesh(MeshConfiguration(data=2, fsdp=4, dcn_data=2))
    assert dict(parallel.make_mesh(MeshConfiguration(data=2, fsdp=4, dcn_data=1)).shape)["data"] == 2


def test_batch_not_divisible_by_data_parallel_size():
    mesh = parallel.make_mesh(MeshConfiguration(data=2, fsdp=4))
    with pytest.raises(ConfigError, match="not divisible by the data-parallel size 8"):
        parallel.check_batch_size(60, mesh)


def test_parameter_spec_rules_and_fsdp():
    mesh = parallel.make_mesh(MeshConfiguration(data=1, fsdp=4, tensor=2))
    config = MeshConfiguration(data=1, fsdp=4, tensor=2)
    # 'mlp' goes to tensor by rule; fsdp takes the largest remaining divisible axis.
    assert parallel.parameter_spec((256, 128), ("embed", "mlp"), mesh, config) == P("fsdp", "tensor")
    # small parameters stay replicated over fsdp
    assert parallel.parameter_spec((8,), ("mlp",), mesh, config) == P("tensor")
    # an axis the mesh axis does not divide stays unsharded
    assert parallel.parameter_spec((255, 3), ("embed", "mlp"), mesh, config) == P(None, None)
    custom = MeshConfiguration(data=1, fsdp=4, tensor=2, logical_axis_rules={"mlp": None, "embed": "tensor"})
    assert parallel.parameter_spec((256, 128), ("embed", "mlp"), mesh, custom) == P("tensor", "fsdp")


def _trainer(mesh_config=None, batch_size=64, mesh=None, **training):
    model = create_model(tiny_model_config(hidden_dims=[256, 128]), rngs=nnx.Rngs(0))
    config = training_config(batch_size=batch_size, num_epochs=1, log_every=1000, **training)
    return Trainer(model, config, workdir=None, mesh_config=mesh_config, mesh=mesh)


def test_state_is_really_split_over_fsdp():
    trainer = _trainer(MeshConfiguration(data=2, fsdp=4))
    kernel = trainer.state.params["encoder"][0]["kernel"]  # 64 x 256
    assert kernel.shape == (64, 256)
    assert kernel.sharding.spec == P(None, "fsdp")
    assert {shard.data.shape for shard in kernel.addressable_shards} == {(64, 64)}
    assert len({shard.device for shard in kernel.addressable_shards}) == 8
    # Adam moments follow their parameter; counters are replicated.
    adam_state = trainer.state.opt_state[0]  # optax.adam = (ScaleByAdamState, ScaleByScheduleState)
    assert adam_state.mu["encoder"][0]["kernel"].sharding.spec == P(None, "fsdp")
    assert adam_state.count.sharding.spec == P()
    assert trainer.state.step.sharding.is_fully_replicated


def test_batch_is_split_over_data_and_fsdp():
    mesh = parallel.make_mesh(MeshConfiguration(data=2, fsdp=4))
    batch = parallel.host_batch_to_global({"image": np.zeros((64, 8, 8, 1), np.float32)}, mesh)
    image = batch["image"]
    assert image.shape == (64, 8, 8, 1)
    assert image.sharding.spec == P(("data", "fsdp"))
    assert {shard.data.shape for shard in image.addressable_shards} == {(8, 8, 8, 1)}


def test_sharded_step_matches_single_device_step():
    images = digits_images()[:64]
    batch_host = {"image": images}
    single = _trainer(mesh=parallel.make_mesh(MeshConfiguration(data=1), devices=jax.devices()[:1]))
    sharded = _trainer(MeshConfiguration(data=2, fsdp=4))
    results = []
    for trainer in (single, sharded):
        batch = parallel.host_batch_to_global(batch_host, trainer.mesh)
        for _ in range(3):
            trainer.state, metrics = trainer.train_step_fn(trainer.state, batch)
        results.append((jax.device_get(metrics), jax.device_get(trainer.state.params)))
    (m1, p1), (m2, p2) = results
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # float sums reorder across shards
    assert len(single.state.params["encoder"][0]["kernel"].sharding.device_set) == 1


def test_compiled_together_is_the_jitted_function_in_one_process():
    """One process: the same results as jit, no barrier, no compilation ahead; ``lower`` passes through."""
    jitted = jax.jit(lambda x, k: x * k, static_argnums=1)
    together = parallel.CompiledTogether(jitted, "scale")
    before = next(parallel._barrier_numbers)
    x = jnp.arange(4.0)
    np.testing.assert_array_equal(together(x, 3), jitted(x, 3))
    assert next(parallel._barrier_numbers) == before + 1  # only the two next() calls here moved it
    assert together.lower(x, 3).as_text() == jitted.lower(x, 3).as_text()


def test_signatures_tell_apart_what_jit_compiles_separately():
    x = jnp.zeros((2, 3))
    same = parallel._signature((x, 1))
    assert parallel._signature((jnp.ones((2, 3)), 1)) == same  # values of arrays do not matter
    for other in ((jnp.zeros((3, 2)), 1), (x.astype(jnp.int32), 1), (x, 2), ({"a": x}, 1)):
        assert parallel._signature(other) != same
