"""Tensor parallelism: the DiT's attention heads and MLP hidden units split over ``mesh.tensor``."""

import jax
import numpy as np
import pytest
from flax import nnx

from tests.helpers import training_config
from workshop_dist import ModelConfiguration, Trainer, create_model
from workshop_dist.data.digits import load_digits_split
from workshop_dist.parallel import MeshConfiguration

DATA = load_digits_split("train")
LEVELS = {"image": DATA["image"][:256].astype(np.float32), "label": DATA["label"][:256].astype(np.int32)}
DIT = ModelConfiguration(
    model_class="dit",
    input_dim=(8, 8, 1),
    parameters={"hidden_size": 64, "depth": 2, "num_heads": 4, "patch_size": 2, "num_classes": 10},
)


def one_step(mesh_config: MeshConfiguration, devices: list) -> Trainer:
    from workshop_dist import parallel

    config = training_config(batch_size=32, max_steps=1, num_samples=0, log_every=1,
                             optimizer={"optimizer_type": "adam", "learning_rate": 1e-3})
    mesh = parallel.make_mesh(mesh_config, devices=devices)
    trainer = Trainer(create_model(DIT, rngs=nnx.Rngs(0)), config, LEVELS, None, None, mesh=mesh, mesh_config=mesh_config)
    trainer.train_epoch()
    return trainer


@pytest.mark.slow
def test_dit_params_are_split_over_tensor_and_a_step_matches_one_device():
    sharded = one_step(MeshConfiguration(data=1, fsdp=2, tensor=4), jax.devices()[:8])
    params = sharded.state.params["network"]["blocks"][0]
    for name, dim in (("query", 1), ("key", 1), ("value", 1), ("attn_out", 0), ("mlp_in", 1), ("mlp_out", 0)):
        kernel = params[name]["kernel"]
        spec = kernel.sharding.spec
        assert spec[dim] == "tensor", (name, spec)
        shard = kernel.addressable_shards[0].data.shape
        assert shard[dim] == kernel.shape[dim] // 4, (name, shard)  # really split four ways
    single = one_step(MeshConfiguration(data=1), jax.devices()[:1])
    assert sharded.train_metrics[0]["loss"] == pytest.approx(single.train_metrics[0]["loss"], rel=1e-5)
    for a, b in zip(jax.tree.leaves(jax.device_get(sharded.state.params)), jax.tree.leaves(jax.device_get(single.state.params)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
