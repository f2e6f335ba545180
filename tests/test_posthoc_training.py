"""Post-hoc EMA and several EMA decays in a real run: the profiles live in the sharded, checkpointed
state, snapshots land in WORKDIR/posthoc_ema, and ``--posthoc-ema`` reconstructs a checkpoint that
``--restore`` takes (the maths alone: tests/test_posthoc_ema.py)."""

import jax
import numpy as np
import pytest

from tests.helpers import digits_images, tiny_model_config, training_config
from workshop_dist import Trainer, cli
from workshop_dist.training import posthoc_ema

TRAIN = digits_images()[:256]
POSTHOC = {"sigma_rels": [0.05, 0.1], "snapshot_every": 2}


def trainer_for(workdir, steps: int = 6, **ema) -> Trainer:
    config = training_config(batch_size=64, num_epochs=100, max_steps=steps, log_every=1, num_samples=0, ema=ema,
                             optimizer={"optimizer_type": "adam", "learning_rate": 3e-3})
    return Trainer(tiny_model_config(), config, TRAIN, None, workdir)


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree.leaves(jax.device_get(tree))]


def test_several_decays_are_tracked_and_the_chosen_one_is_evaluated(tmp_path):
    trainer = trainer_for(None, steps=1, decay=[0.9, 0.99], eval_decay=0.99)
    start = leaves(trainer.state.params)
    trainer.fit()
    after = leaves(trainer.state.params)
    assert set(trainer.state.ema_profiles) == {"decay_0p9"}
    for decay, tree in ((0.99, trainer.state.ema_params), (0.9, trainer.state.ema_profiles["decay_0p9"])):
        for got, p0, p1 in zip(leaves(tree), start, after, strict=True):
            np.testing.assert_allclose(got, decay * p0 + (1 - decay) * p1, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match=r"eval_decay 0\.5 is not one of the decays"):
        training_config(ema={"decay": [0.9, 0.99], "eval_decay": 0.5})


def test_profiles_are_snapshotted_and_a_tracked_width_reconstructs_to_itself(tmp_path):
    trainer = trainer_for(tmp_path, posthoc=POSTHOC)
    trainer.fit()
    found = posthoc_ema.snapshots(tmp_path / "posthoc_ema")
    assert [step for step, _, _ in found] == [2, 4, 6]
    assert found[0][2] == {"sigma_rel_0p05": 0.05, "sigma_rel_0p1": 0.1}
    [path] = posthoc_ema.write_reconstructions(trainer, [0.05])
    tracked = leaves(trainer.state.ema_profiles["sigma_rel_0p05"])
    restored = trainer_for(tmp_path / "other", posthoc=POSTHOC)
    restored.load_checkpoint(path)
    assert restored.step == 6
    for got, want in zip(leaves(restored.state.params), tracked, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    trainer.close()
    restored.close()


def test_the_profiles_resume_from_a_checkpoint(tmp_path):
    trainer = trainer_for(tmp_path, steps=4, posthoc=POSTHOC)
    trainer.fit()
    trainer.close()
    resumed = trainer_for(tmp_path, steps=4, posthoc=POSTHOC)
    assert resumed.restore() == 4
    for got, want in zip(leaves(resumed.state.ema_profiles), leaves(trainer.state.ema_profiles), strict=True):
        np.testing.assert_array_equal(got, want)
    resumed.close()


@pytest.mark.slow  # trains, then reconstructs through the CLI: over 10 s on 2 cores
def test_the_command_reconstructs_widths_and_explains_what_is_missing(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert cli.main(["--workdir", str(workdir), "--quiet", "training.num_epochs=1", "training.cadence.num_samples=0",
                     "training.ema.posthoc={sigma_rels: [0.05, 0.1], snapshot_every: 2}", "model.hidden_dims=[32]",
                     "training.scheduler.warmup_steps=1"]) == 0
    assert cli.main(["--posthoc-ema", str(workdir), "--sigma-rel", "0.03,0.08", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"sigma_rel=0.03: {workdir / 'posthoc_ema' / 'sigma_rel_0.03'}" in out
    assert (workdir / "posthoc_ema" / "sigma_rel_0.08" / "state").is_dir()
    assert cli.main(["--posthoc-ema", str(workdir)]) == 2
    assert "needs --sigma-rel" in capsys.readouterr().err
    with pytest.raises(ValueError, match="sigma_rels must be distinct widths"):
        training_config(ema={"posthoc": {"sigma_rels": [0.05, 0.5]}})
