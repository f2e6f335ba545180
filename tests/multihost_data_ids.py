"""Run under ``workshop-launch``: write the example ids of this process's first training epoch."""

import json
import sys
from pathlib import Path

import numpy as np


def main(out_dir: str) -> None:
    import jax

    from workshop_dist import distributed
    from workshop_dist.data import array_train_input

    distributed.initialize(distributed.DistributedConfiguration())
    examples = {"image": np.zeros((1000, 1), np.float32), "id": np.arange(1000)}
    train = array_train_input(examples, global_batch_size=100, seed=3)
    ids = [int(i) for _ in range(train.steps_per_epoch) for i in next(train)["id"]]
    path = Path(out_dir) / f"ids_{jax.process_index()}_of_{jax.process_count()}.json"
    path.write_text(json.dumps(ids))


if __name__ == "__main__":
    main(sys.argv[1])
