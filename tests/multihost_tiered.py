"""One process of the 2-process tiered-checkpoint test (tests/test_tiered_checkpoint.py).

``save DIR``: steps 1..4 to the local tier (keeps 2), step 2 also to the persistent tier.
``restore DIR``: restore the newest step every process can, print the step, the tier and
whether the arrays are exactly those saved at that step.
"""

import os
import sys

import jax

jax.distributed.initialize(  # the variables workshop-launch sets
    os.environ["JAX_COORDINATOR_ADDRESS"], int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
)

import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from workshop_dist.checkpoint import LocalCheckpointConfiguration  # noqa: E402
from workshop_dist.tiered_checkpoint import TieredCheckpointManager  # noqa: E402

phase, root = sys.argv[1], sys.argv[2]
mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
shardings = {"sharded": NamedSharding(mesh, P("data")), "replicated": NamedSharding(mesh, P())}
shapes = {"sharded": (64, 3), "replicated": (5,)}


def values(step: int, name: str) -> np.ndarray:
    return np.random.default_rng([step, len(name)]).standard_normal(shapes[name]).astype(np.float32)


def state_at(step: int) -> dict:
    return {
        name: jax.make_array_from_callback(shapes[name], shardings[name], lambda index, n=name: values(step, n)[index])
        for name in shapes
    }


# Synchronous saves: this checks which step both processes restore. (Under heavy load, an async local
# save's last step was once left as a tmp directory on one process at exit: see the closing note.)
manager = TieredCheckpointManager(
    f"{root}/persistent", LocalCheckpointConfiguration(directory=f"{root}/local", every=1), async_save=False
)
if phase == "save":
    for step in range(1, 5):
        manager.save(step, state_at(step), metadata={"step": step}, persistent=step == 2)
    manager.wait()
else:
    abstract = {name: jax.ShapeDtypeStruct(shapes[name], np.float32, sharding=shardings[name]) for name in shapes}
    state, metadata, step, _ = manager.restore(abstract)
    exact = all(
        np.array_equal(np.asarray(shard.data), values(step, name)[shard.index])
        for name, array in state.items()
        for shard in array.addressable_shards
    )
    print(f"RESTORED step={step} tier={manager.restored_tier} exact={exact}", flush=True)
manager.close()
jax.distributed.shutdown()
