"""The frozen first stage of latent diffusion: an autoencoder loaded once, from weights or from a run.

Why here, at the training level: an autoencoder trained by ``workshop-train`` lives in the run's
Orbax checkpoint, and reading it takes what resuming and sampling already use, the engine's
abstract state and :func:`workshop_dist.training.checkpointing.restore`; ``models/`` must not
import that. :func:`load_first_stage` takes either

* a safetensors file written by ``workshop-data convert-weights sd-vae`` (Stable Diffusion's VAE;
  :func:`workshop_dist.models.autoencoder_weights.load_autoencoder`'s format), or
* an ``autoencoder`` run: its workdir (the latest complete checkpoint), its ``checkpoints`` folder,
  or one checkpoint directory (``checkpoints/<step>``, a post-hoc EMA reconstruction). The
  parameters evaluation uses are taken: the EMA when the run keeps one and evaluates with it.

The result is a :class:`FirstStage`: the module's graph and its parameters (placed replicated
on the mesh), the latent scale factor, and pure ``encode``/``decode`` functions to jit inside
other programs (the FID hook) or to call directly. Nothing of it is trained or checkpointed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from workshop_dist import parallel, storage
from workshop_dist.config import ConfigError
from workshop_dist.models import ModelConfiguration, create_model
from workshop_dist.models.autoencoder import Autoencoder
from workshop_dist.models.config import DataSpec
from workshop_dist.parallel import MeshConfiguration

_LONG_RUN = 10**9  # a run length for the schedules of the restored run's optimizer: they shape nothing restored


class FirstStageError(ConfigError):
    """The named autoencoder is missing, unreadable, or does not fit the data or the model."""


@dataclasses.dataclass(frozen=True)
class FirstStage:
    """A frozen autoencoder: ``graphdef`` + ``params`` (replicated), its latent scale and pixel range.

    Latents seen by diffusion are ``scale_factor * z`` (z the autoencoder's own latent); ``decode``
    takes those scaled latents and returns data-space images (``[0, max_value]``, rounded when
    ``levels``), clipped as samples are.
    """

    graphdef: nnx.GraphDef
    params: Any
    scale_factor: float
    factor: int  # images shrink by this in height and width
    image_channels: int
    latent_channels: int
    max_value: float
    levels: bool
    source: str

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, int, int]:
        """The latent shape of images ``(H, W, C)``; a FirstStageError when they do not fit."""
        shape = tuple(int(d) for d in image_shape)
        if len(shape) != 3 or shape[-1] != self.image_channels or shape[0] % self.factor or shape[1] % self.factor:
            raise FirstStageError(
                f"the autoencoder {self.source} takes {self.image_channels}-channel images whose height and width "
                f"divide by {self.factor}; these are {list(shape)}"
            )
        return shape[0] // self.factor, shape[1] // self.factor, self.latent_channels

    def image_shape(self, latent_shape: Sequence[int]) -> tuple[int, int, int]:
        """The image shape decoded from latents ``(h, w, c)``; a FirstStageError when ``c`` does not fit."""
        shape = tuple(int(d) for d in latent_shape)
        if len(shape) != 3 or shape[-1] != self.latent_channels:
            raise FirstStageError(
                f"the autoencoder {self.source} decodes {self.latent_channels}-channel latents; the model's "
                f"input_dim is {list(shape)}"
            )
        return shape[0] * self.factor, shape[1] * self.factor, self.image_channels

    # --- pure functions of (params, inputs): jit them, or embed them in bigger programs -----------
    def encode_fn(self, params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Data-space images -> the posterior's unscaled ``(mean, logvar)``, float32."""
        model = nnx.merge(self.graphdef, params)
        mean, logvar = model.moments(model.to_network(images))
        return mean.astype(jnp.float32), logvar.astype(jnp.float32)

    def decode_fn(self, params: Any, latents: jax.Array) -> jax.Array:
        """Scaled latents -> data-space images, clipped (and rounded for level data) like samples."""
        model = nnx.merge(self.graphdef, params)
        images = jnp.clip(model.decode(latents.astype(jnp.float32) / self.scale_factor), 0.0, self.max_value)
        return jnp.round(images) if self.levels else images

    @functools.cached_property
    def _decode(self) -> Any:
        return jax.jit(self.decode_fn)

    def decode_on_mesh(self, latents: Any) -> jax.Array:
        """Scaled latents (numpy: placed replicated beside the parameters; or already on the mesh) -> images there."""
        if not isinstance(latents, jax.Array) or (latents.is_fully_addressable and len(latents.devices()) == 1):
            latents = jax.device_put(np.asarray(latents), jax.tree.leaves(self.params)[0].sharding)
        return self._decode(self.params, latents)

    def decode(self, latents: Any) -> np.ndarray:
        """Scaled latents -> data-space images as numpy."""
        return np.asarray(jax.device_get(self.decode_on_mesh(latents)))

    def placed(self, mesh: jax.sharding.Mesh) -> FirstStage:
        """This first stage with its parameters replicated on ``mesh``."""
        params = parallel.place(jax.device_get(self.params), parallel.replicated(mesh))
        return dataclasses.replace(self, params=params)


def load_first_stage(
    path: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None, image_channels: int | None = None
) -> FirstStage:
    """The autoencoder at ``path`` (weights file or run; see the module docstring), its parameters
    replicated on ``mesh`` (default: all devices). ``image_channels`` is checked against it when given."""
    mesh = mesh if mesh is not None else parallel.make_mesh(MeshConfiguration())
    text = os.fspath(path)
    target = storage.as_path(text)
    if not target.exists():
        raise FirstStageError(f"no autoencoder at {text}: give converted weights (.safetensors) or an autoencoder run's workdir")
    stage = _from_run(target, mesh) if target.is_dir() else _from_weights(Path(text), mesh)
    if image_channels is not None and image_channels != stage.image_channels:
        raise FirstStageError(
            f"the autoencoder {text} takes {stage.image_channels}-channel images, the data has {image_channels}"
        )
    return stage


def decoder_for(model: Any, mesh: jax.sharding.Mesh) -> FirstStage | None:
    """The frozen decoder ``model.decoder`` names (None without one), checked against the model's latents."""
    path = getattr(model, "decoder", None) if isinstance(model, ModelConfiguration) else None
    if not path:
        return None
    stage = load_first_stage(path, mesh=mesh)
    stage.image_shape(model.input_dim)  # one message when the model's samples are not its latents
    return stage


def _stage(model: Autoencoder, params: Any, source: str) -> FirstStage:
    p = model.params_config
    return FirstStage(
        graphdef=nnx.graphdef(model), params=params, scale_factor=float(model.scaling_factor), factor=int(model.factor),
        image_channels=int(model.image_shape[-1]), latent_channels=int(p.latent_channels),
        max_value=float(model.max_value), levels=bool(model.levels), source=source,
    )


def _from_weights(path: Path, mesh: jax.sharding.Mesh) -> FirstStage:
    from workshop_dist.models import autoencoder_weights
    from workshop_dist.weights import WeightsError, read_safetensors

    try:
        _, metadata = read_safetensors(path)
        if metadata.get("format") != autoencoder_weights.FORMAT:
            raise WeightsError(
                f"{path} holds no autoencoder weights (format {metadata.get('format')!r}): convert a diffusers "
                "AutoencoderKL with `workshop-data convert-weights sd-vae SRC OUT`, or give an autoencoder run"
            )
        parameters = json.loads(metadata["parameters"])
        factor = 2 ** (len(parameters["block_out_channels"]) - 1)
        model = autoencoder_weights.load_autoencoder(path, (factor, factor, int(metadata["channels"])))
    except WeightsError as err:
        raise FirstStageError(str(err)) from None
    _, params = nnx.split(model)
    return _stage(model, parallel.place(params, parallel.replicated(mesh)), str(path))


def checkpoint_of(path: storage.AnyPath) -> tuple[storage.AnyPath, dict[str, Any]]:
    """``(checkpoint directory, its run config)`` of a workdir, a checkpoints folder or one checkpoint."""
    from workshop_dist import checkpoint as ckpt
    from workshop_dist.resume_config import saved_config

    if (path / ckpt.STATE).is_dir():
        saved = saved_config(path.parent, int(path.name)) if path.name.isdigit() else None
        config = saved[1] if saved else _read_config(path)
        return path, config
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    saved = saved_config(folder)
    if saved is None:
        raise FirstStageError(f"{path} holds no complete checkpoint with its config: not an autoencoder run")
    return folder / str(saved[0]), saved[1]


def _read_config(step_dir: storage.AnyPath) -> dict[str, Any]:
    import orbax.checkpoint as ocp

    from workshop_dist import checkpoint as ckpt

    if not (step_dir / ckpt.CONFIG).exists():
        raise FirstStageError(f"checkpoint {step_dir} was saved without its config: cannot tell which autoencoder it holds")
    checkpointer = ocp.Checkpointer(ocp.JsonCheckpointHandler())
    try:
        return dict(checkpointer.restore(step_dir / ckpt.CONFIG, args=ocp.args.JsonRestore()))
    finally:
        checkpointer.close()


def run_model_config(config: dict[str, Any]) -> ModelConfiguration:
    """The run's model section with what the model knows of its data (as ExperimentConfiguration fills it)."""
    from workshop_dist.data import DataConfiguration

    data = DataConfiguration.model_validate(config.get("data") or {})
    model = dict(config.get("model") or {})
    return ModelConfiguration.model_validate({**model, "data": DataSpec(num_levels=data.num_levels, normalize=data.normalize)})


def _from_run(path: storage.AnyPath, mesh: jax.sharding.Mesh) -> FirstStage:
    from workshop_dist.training import checkpointing
    from workshop_dist.training.config import TrainingConfiguration
    from workshop_dist.training.engine import Engine
    from workshop_dist.training.plan import make_plan

    step_dir, config = checkpoint_of(path)
    model_config = run_model_config(config)
    model = nnx.eval_shape(lambda: create_model(model_config, rngs=nnx.Rngs(0)))
    if not isinstance(model, Autoencoder):
        raise FirstStageError(
            f"{path} is a run of model_class {model_config.model_class!r} ({type(model).__name__}), not an autoencoder"
        )
    training = TrainingConfiguration.model_validate(config.get("training") or {})
    # the run's whole state, abstract, as resuming restores it (EMA and optimizer state included), replicated here
    engine = Engine(make_plan(model_config, training, _LONG_RUN), mesh, MeshConfiguration(), None, abstract=True)
    restored = checkpointing.restore(step_dir, engine.state_shapes, data_iterator=None)
    params = engine.eval_params(restored.state)
    module = engine.calls.merge(params, restored.state.model_state, training=False)
    _, weights = nnx.split(module)
    return _stage(module, weights, str(step_dir))
