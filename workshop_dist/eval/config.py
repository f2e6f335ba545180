"""The ``eval`` section: sample quality measured while a run trains (the FID hook).

``fid_every`` steps, ``fid_samples`` samples from the evaluation parameters (the EMA when
``training.ema.for_eval``) go through a feature network on the whole mesh, and ``val/fid`` (or
``val/fd`` for the digits classifier's Frechet distance) is logged. ``checkpoint.best_metric:
val/fid`` then keeps the checkpoint with the best score.
"""

from __future__ import annotations

from typing import Any, Literal

import pydantic

from workshop_dist.config import StrictConfig


class EvalConfiguration(StrictConfig):
    """When and how the FID hook measures samples (off while ``fid_every`` is null)."""

    fid_every: int | None = pydantic.Field(
        None, gt=0, description="Steps between sample-quality evaluations (also at the run's end); null: none."
    )
    fid_samples: int = pydantic.Field(
        10_000, gt=1, description="Samples per evaluation (FID is biased upwards for few: compare at one count)."
    )
    fid_batch_size: int | None = pydantic.Field(
        None, gt=0, description="Samples per sampling call (default: training.batch_size), split over the mesh."
    )
    features: Literal["auto", "inception", "digits"] = pydantic.Field(
        "auto",
        description="inception: FID with the standard InceptionV3 (needs inception_weights); digits: the built-in "
        "classifier's Frechet distance (val/fd, the digits quality benchmark's measure); auto: digits for the "
        "built-in digits data, else inception.",
    )
    inception_weights: str | None = pydantic.Field(
        None,
        description="The InceptionV3 weights as safetensors (workshop-data convert-weights inception "
        "pt_inception-2015-12-05-6726825d.pth OUT); nothing is downloaded.",
    )
    reference: str | None = pydantic.Field(
        None,
        description="Reference statistics (pytorch-fid's .npz with mu, sigma; workshop-data stats writes one). "
        "Default: computed once from the evaluation split (the digits: their test split).",
    )
    sampling: dict[str, Any] = pydantic.Field(
        default_factory=dict, description="Sampler options for these samples (e.g. {sampler: heun, sampling_steps: 32})."
    )
    seed: int = pydantic.Field(0, description="The samples' noise: the same at every evaluation, so scores compare.")

    @pydantic.model_validator(mode="after")
    def _weights_where_needed(self) -> EvalConfiguration:
        if self.fid_every is not None and self.features == "inception" and not self.inception_weights:
            raise ValueError(
                "eval.features=inception needs eval.inception_weights: convert pytorch-fid's "
                "pt_inception-2015-12-05-6726825d.pth with `workshop-data convert-weights inception PTH OUT`"
            )
        unused = [name for name in ("inception_weights", "reference") if getattr(self, name) and self.fid_every is None]
        if unused:
            raise ValueError(f"eval.{unused[0]} is set but eval.fid_every is null (no FID is computed): set both")
        return self

    def resolved_features(self, data_source: str) -> Literal["inception", "digits"]:
        """``features`` with ``auto`` decided by the data source."""
        if self.features != "auto":
            return self.features
        return "digits" if data_source == "digits" else "inception"
