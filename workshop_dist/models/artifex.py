"""Models from avitai-artifex (its VAEs, diffusion models and normalizing flows) behind the workshop_dist contract.

``model_class`` names them three ways: a registered name (``artifex_vae``, ``artifex_ddpm``,
``artifex_realnvp``), ``artifex:ClassName`` (a class exported by
``artifex.generative_models.models.vae`` / ``.diffusion`` / ``.flow``, e.g. ``artifex:BetaVAE``,
``artifex:DDIMModel``, ``artifex:MAF``) or the dotted path of an artifex class. The adapter builds
the artifex model as ``ArtifexClass(ArtifexConfig, rngs=rngs)``: the config class is the one its
constructor is annotated with, filled from ``ModelConfiguration`` (``input_dim``, ``hidden_dims``,
``output_dim``) and then from ``parameters``, which are fields of that config (nested sections
such as ``encoder``, ``backbone``, ``noise_schedule`` or ``coupling_network`` merge key by key).

Objectives and samplers stay artifex's: the VAE's ``loss_fn`` (scored one example at a time on
the batch's forward pass), the diffusion models' noise-prediction loss with their schedule,
``q_sample`` and loss type, the flows' ``log_prob`` (``loss`` is the negative log-density in nats);
``sample`` is the model's own ``sample``. artifex models draw their noise from their ``nnx.Rngs``:
the adapter reseeds those streams from the ``rng`` it is given, so a model is keyed per
(micro-)batch, not per example.

artifex is imported only when such a model is built (``pip install avitai-artifex`` or the
``artifex`` extra; Python >= 3.12).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import typing
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from workshop_dist.config import ConfigError, WorkshopError
from workshop_dist.models.base import Batch, GenerativeModel, Metrics
from workshop_dist.models.config import ModelConfiguration
from workshop_dist.models.registry import register_adapter, register_model

PACKAGE = "artifex"
MODELS = "artifex.generative_models.models"
INSTALL_HINT = 'pip install avitai-artifex (or "workshop-dist[artifex]"; it needs Python >= 3.12, jax >= 0.11.1, flax >= 0.12.9)'


def _import(module: str) -> Any:
    if importlib.util.find_spec(PACKAGE) is None:
        raise WorkshopError(f"Models from avitai-artifex need the package: {INSTALL_HINT}.")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is None or not err.name.startswith(PACKAGE):
            raise  # artifex is there but one of its own dependencies is missing: show that as is
        raise ConfigError(f"model.model_class: avitai-artifex has no module '{module}' ({err}).") from None


def _attribute(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(_import(module), name)


class ArtifexModel(GenerativeModel):
    """An artifex model as ``self.model``; subclasses say how to configure, score and sample one family."""

    family: ClassVar[str]  # the artifex base class this adapter serves, as a dotted path
    default_class: ClassVar[str]  # the artifex class built when model_class names the adapter itself
    artifex_class: ClassVar[type | None] = None  # set on the per-class adapters made by adapter_for
    options: ClassVar[dict[str, Any]] = {}  # adapter options read from parameters (not artifex config fields)

    def __init__(self, config: ModelConfiguration, *, rngs: nnx.Rngs):
        cls = self.artifex_class or _attribute(self.default_class)
        parameters = dict(config.parameters)
        self.settings = {name: parameters.pop(name, default) for name, default in self.options.items()}
        self.input_shape = tuple(config.input_dim)
        self.check(cls)  # before the (slow) construction of the artifex model
        config_class = _config_class(cls)
        data = _merge(self.defaults(config), parameters)
        try:
            artifex_config = config_class.from_dict(data)
        except Exception as err:  # artifex validates with ValueError/TypeError and dacite's own errors
            raise ConfigError(
                f"model.parameters: artifex's {config_class.__name__} (for {cls.__name__}) rejects them: "
                f"{type(err).__name__}: {err}. Parameters are fields of {config_class.__name__}; "
                f"nested sections merge key by key into these defaults: {data}"
            ) from None
        self.model = cls(artifex_config, rngs=rngs)

    def defaults(self, config: ModelConfiguration) -> dict[str, Any]:
        """The artifex config as a dict, before ``parameters`` are merged in."""
        raise NotImplementedError

    def check(self, cls: type) -> None:
        """Raise a ConfigError if this adapter cannot serve ``cls`` with ``self.settings``."""

    def reseed(self, rng: jax.Array) -> None:
        """Every ``nnx.Rngs`` stream of the artifex model restarts from ``rng`` (one key per stream name)."""
        key = rng if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(rng)
        tags = sorted({node.tag for _, node in nnx.iter_graph(self.model) if isinstance(node, nnx.RngStream)})
        nnx.reseed(self.model, **{tag: jax.random.fold_in(key, index) for index, tag in enumerate(tags)})

    def sample(self, rng: jax.Array, num_samples: int, *, labels: jax.Array | None = None, **options: Any) -> jax.Array:
        """The artifex model's own ``sample(num_samples, **options)``, shaped like the data."""
        if labels is not None:
            raise WorkshopError(
                f"{type(self.model).__name__} through the artifex adapter samples unconditionally: "
                "call generate_samples without labels"
            )
        self.reseed(rng)
        samples = self.model.sample(num_samples, **options)
        return self.to_data(samples.reshape(num_samples, *self.input_shape))

    def to_data(self, x: jax.Array) -> jax.Array:
        return x


class ArtifexVAE(ArtifexModel):
    """artifex VAEs: ``loss`` is their ``loss_fn``'s ``total_loss`` (reconstruction + weighted KL) per example."""

    family = f"{MODELS}.vae.base.VAE"
    default_class = family

    def defaults(self, config: ModelConfiguration) -> dict[str, Any]:
        hidden = list(config.hidden_dims)
        shape = list(config.input_dim)
        return {
            "name": config.name,
            "encoder_type": "dense",
            "encoder": {"name": "encoder", "input_shape": shape, "latent_dim": config.output_dim,
                        "hidden_dims": hidden, "activation": "relu"},
            "decoder": {"name": "decoder", "output_shape": shape, "latent_dim": config.output_dim,
                        "hidden_dims": hidden[::-1], "activation": "relu"},
        }

    def example_losses(self, batch: Batch, rng: jax.Array, *, step: jax.Array | None = None, group: str | None = None) -> Metrics:
        self.reseed(rng)
        x = batch["image"]
        outputs = self.model(x)  # one forward pass over the whole batch (BatchNorm, one reparameterisation draw)
        kwargs = {} if step is None else {"step": step}
        size = x.shape[0]
        batched = {k: v for k, v in outputs.items() if getattr(v, "ndim", 0) and v.shape[0] == size}
        shared = {k: v for k, v in outputs.items() if k not in batched}

        def one(example: jax.Array, output: dict[str, jax.Array]) -> dict[str, jax.Array]:
            single = {**shared, **jax.tree.map(lambda v: v[None], output)}
            return self.model.loss_fn({"x": example[None]}, single, **kwargs)

        # loss_fn reduces over the batch; on one example it is that example's value (pure: no Rngs drawn)
        return _per_example(jax.vmap(one)(x, batched), "total_loss")


class ArtifexDiffusion(ArtifexModel):
    """artifex diffusion models (``DiffusionModel`` subclasses): their noise-prediction loss per example.

    The batch mean of ``loss`` is what their ``loss_fn`` returns for the same timestep and noise
    draws (tested); the adapter scores each example instead of the batch. Data in ``data_range``
    (default [0, 1]) is mapped to artifex's [-1, 1] and samples back.
    """

    family = f"{MODELS}.diffusion.base.DiffusionModel"
    default_class = f"{MODELS}.diffusion.ddpm.DDPMModel"
    options: ClassVar[dict[str, Any]] = {"data_range": (0.0, 1.0)}

    def check(self, cls: type) -> None:
        if cls.loss_fn is not _attribute(self.family).loss_fn:
            raise ConfigError(
                f"model.model_class: {cls.__name__} has its own loss_fn; the artifex diffusion "
                "adapter scores DiffusionModel's noise-prediction objective only (DDPMModel, DDIMModel, ...)."
            )
        value = self.settings["data_range"]
        try:
            low, high = (float(v) for v in value)
        except (TypeError, ValueError):
            low = high = 0.0
        if not high > low:
            raise ConfigError(f"model.parameters.data_range must be [low, high] with high > low, got {value!r}")
        self.data_range = (low, high)

    def defaults(self, config: ModelConfiguration) -> dict[str, Any]:
        channels = config.input_dim[-1]
        return {
            "name": config.name,
            "input_shape": list(config.input_dim),
            "backbone": {"name": "backbone", "backbone_type": "unet", "in_channels": channels,
                         "out_channels": channels, "hidden_dims": list(config.hidden_dims), "activation": "silu"},
            "noise_schedule": {"name": "noise_schedule"},
        }

    def example_losses(self, batch: Batch, rng: jax.Array, *, step: jax.Array | None = None, group: str | None = None) -> Metrics:
        losses = _attribute(f"{MODELS}.diffusion.base.DIFFUSION_LOSSES")
        prediction = _attribute("artifex.generative_models.training.utils.extract_model_prediction")
        self.reseed(rng)
        model = self.model
        low, high = self.data_range
        x = (batch["image"] - low) * (2.0 / (high - low)) - 1.0
        size = x.shape[0]
        # the draws of DiffusionModel.loss_fn, in its order: timesteps, then noise
        t = jax.random.randint(model.rngs.timestep(), (size,), 0, model.noise_schedule.num_timesteps)
        noise = jax.random.normal(model.rngs.noise(), x.shape)
        predicted = prediction(model(model.q_sample(x, t, noise=noise), t))
        per_example = losses[model.loss_type](predicted, noise, reduction="none").reshape(size, -1).mean(axis=1)
        return {"loss": per_example, f"{model.loss_type}_loss": per_example, "timestep": t.astype(jnp.float32)}

    def to_data(self, x: jax.Array) -> jax.Array:
        low, high = self.data_range
        return (x + 1.0) * ((high - low) / 2.0) + low


class ArtifexFlow(ArtifexModel):
    """artifex normalizing flows: ``loss`` is ``-log_prob(x)`` in nats per example (their ``loss_fn``'s terms)."""

    family = f"{MODELS}.flow.base.NormalizingFlow"
    default_class = f"{MODELS}.flow.real_nvp.RealNVP"

    def defaults(self, config: ModelConfiguration) -> dict[str, Any]:
        return {
            "name": config.name,
            "input_dim": math.prod(config.input_dim),
            "coupling_network": {"name": "coupling_network", "hidden_dims": list(config.hidden_dims), "activation": "relu"},
        }

    def example_losses(self, batch: Batch, rng: jax.Array, *, step: jax.Array | None = None, group: str | None = None) -> Metrics:
        self.reseed(rng)
        x = batch["image"]
        log_prob = self.model.log_prob(x.reshape(x.shape[0], -1) if x.ndim > 2 else x)
        return {"loss": -log_prob, "nll_loss": -log_prob, "log_prob": log_prob}


ADAPTERS = (ArtifexVAE, ArtifexDiffusion, ArtifexFlow)
register_model("artifex_vae")(ArtifexVAE)
register_model("artifex_ddpm")(ArtifexDiffusion)
register_model("artifex_realnvp")(ArtifexFlow)


def adapter_for(target: type | str) -> type:
    """The adapter class for an artifex model class, ``artifex:ClassName`` or the class's dotted path."""
    if isinstance(target, str):
        target = _find(target.removeprefix(f"{PACKAGE}:")) if ":" in target else _class(target)
    return _adapter(target)


@functools.cache
def _adapter(cls: type) -> type:  # one adapter class per artifex class, however it was named
    for adapter in ADAPTERS:
        if issubclass(cls, _attribute(adapter.family)):
            return type(f"Artifex{cls.__name__}", (adapter,), {"artifex_class": cls, "__module__": __name__})
    families = ", ".join(adapter.family.rpartition(".")[2] for adapter in ADAPTERS)
    raise ConfigError(
        f"model.model_class: artifex's {cls.__module__}.{cls.__name__} is not a subclass of {families}: "
        "workshop_dist adapts artifex's VAEs, diffusion models and normalizing flows."
    )


def _class(path: str) -> type:
    try:
        cls = _attribute(path)
    except AttributeError:
        cls = None
    if not isinstance(cls, type):
        raise ConfigError(f"model.model_class '{path}': no such artifex class.")
    return cls


def _find(name: str) -> type:
    for family in ("vae", "diffusion", "flow"):
        cls = getattr(_import(f"{MODELS}.{family}"), name, None)
        if isinstance(cls, type):
            return cls
    raise ConfigError(
        f"model.model_class 'artifex:{name}': no class '{name}' in {MODELS}.vae, .diffusion or .flow "
        "(e.g. artifex:VAE, artifex:BetaVAE, artifex:DDPMModel, artifex:RealNVP, or give the dotted path)."
    )


register_adapter(PACKAGE, adapter_for)


def _config_class(cls: type) -> type:
    """The config class ``cls.__init__`` is annotated with (VAEConfig, DDPMConfig, RealNVPConfig, ...)."""
    try:
        hint = typing.get_type_hints(cls.__init__).get("config")
    except Exception:  # an annotation that does not resolve: say so below
        hint = None
    if not (isinstance(hint, type) and hasattr(hint, "from_dict")):
        raise ConfigError(f"model.model_class: cannot tell which artifex config class {cls.__name__} takes")
    return hint


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _per_example(terms: dict[str, jax.Array], total: str) -> Metrics:
    """artifex's loss terms (one row per example) as metrics: ``total`` becomes ``loss``."""
    values = {("loss" if name == total else name): jnp.asarray(value, jnp.float32) for name, value in terms.items()}
    return {name: value for name, value in values.items() if value.ndim == 1}
