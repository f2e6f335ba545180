"""Run under ``workshop-launch``: process 1 reaches a cross-process computation 35 s after process 0
(as a peer still compiling does), through :class:`~workshop_dist.parallel.CompiledTogether`; each
process writes what it computed and how many barriers it passed."""

import json
import sys
import time
from pathlib import Path

import numpy as np

LATE_SECONDS = 35  # more than the 30 s a CPU collective waits for a late peer


def main(out_dir: str) -> None:
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from workshop_dist import distributed, parallel

    distributed.initialize(distributed.DistributedConfiguration())
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    total = parallel.CompiledTogether(jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, P())), "total")

    def global_array(n: int) -> jax.Array:  # rows 0..n-1, split over the processes
        rows = np.arange(n, dtype=np.float32)
        return jax.make_array_from_callback((n,), NamedSharding(mesh, P("data")), lambda index: rows[index])

    if jax.process_index() == 1:
        time.sleep(LATE_SECONDS)
    sums = [float(total(global_array(n))) for n in (8, 8, 6)]  # one signature twice, then a new one
    barriers = next(parallel._barrier_numbers)  # the number the next barrier would get
    path = Path(out_dir) / f"process_{jax.process_index()}.json"
    path.write_text(json.dumps({"sums": sums, "barriers": barriers}))


if __name__ == "__main__":
    main(sys.argv[1])
