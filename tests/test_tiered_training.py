"""The local checkpoint tier in training: a crash between persistent saves resumes from the newer
local step, bit-identically, the run log names the tier, and the final save still reaches the workdir."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from tests.helpers import digits_images, tiny_model_config, training_config
from workshop_dist.runlog import read_events
from workshop_dist.training import Trainer


class Crash(Exception):
    pass


def make(workdir, local_dir, **extra) -> Trainer:
    checkpoint = {"local": {"directory": str(local_dir), "every": 1, "max_to_keep": 2}, "async_save": False}
    config = training_config(batch_size=32, max_steps=6, save_every=4, log_every=1, checkpoint=checkpoint, **extra)
    return Trainer(tiny_model_config(), config, digits_images()[:320], None, workdir)


def host(tree) -> list[np.ndarray]:
    return jax.tree.leaves(jax.device_get(tree))


@pytest.mark.slow  # three short trainings on 8 devices
def test_a_crash_resumes_from_the_local_tier_bit_identically(tmp_path):
    full = make(tmp_path / "full", tmp_path / "local_full")
    full.fit()
    full.close()

    crashing = make(tmp_path / "run", tmp_path / "local")

    def crash(info):  # a user hook runs before the checkpoint hook: step 6 is never saved
        raise Crash()

    crashing.add_hook(crash, every=6)
    with pytest.raises(Crash):
        crashing.fit()
    crashing.close()
    persistent = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert persistent == [4]  # the workdir's latest is step 4; the local tier has 4 and 5

    resumed = make(tmp_path / "run", tmp_path / "local")
    assert resumed.restore() == 5 and resumed._checkpoints.restored_tier == "local"  # one step redone, not two
    resumed.fit()
    resumed.close()
    assert resumed.step == full.step == 6
    for a, b in zip(host(resumed.state), host(full.state), strict=True):
        np.testing.assert_array_equal(a, b)
    persistent = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert persistent[-1] == 6  # the end of the run is in the workdir, not only on the local disk
    tiers = [e.get("tier") for e in read_events(tmp_path / "run") if e.get("kind") == "restore"]
    assert tiers == ["local"]
