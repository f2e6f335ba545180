"""Run under ``workshop-launch``: train the digits quality classifier briefly in every process (as
the FID hook of a multi-process run does when it is not cached) and write its features of a few
test digits."""

import sys
from pathlib import Path

import numpy as np


def main(out_dir: str) -> None:
    import jax

    from workshop_dist import distributed, quality

    distributed.initialize(distributed.DistributedConfiguration())
    classifier = quality.train_classifier(seed=0, steps=3)
    images = quality.load_digits_split("test")["image"][:16]
    np.save(Path(out_dir) / f"features_{jax.process_index()}.npy", classifier.features(images))


if __name__ == "__main__":
    main(sys.argv[1])
