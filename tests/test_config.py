"""Configuration: strict fields with suggestions, validation messages, YAML/JSON round trips,
``section.field=value`` overrides and config-file errors."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import pydantic
import pytest

from workshop_dist.compilation import CompilationConfiguration
from workshop_dist.config import ConfigError, WorkshopError, apply_overrides, read_config_file
from workshop_dist.data import DataConfiguration
from workshop_dist.distributed import DistributedConfiguration
from workshop_dist.eval.config import EvalConfiguration
from workshop_dist.experiment import ExperimentConfiguration
from workshop_dist.logging_config import LoggingConfiguration, WandbConfiguration
from workshop_dist.models import ModelConfiguration
from workshop_dist.optim import (
    OPTIMIZER_FIELD_USERS,
    SCHEDULER_FIELD_USERS,
    OptimizerConfiguration,
    SchedulerConfiguration,
)
from workshop_dist.parallel import MeshConfiguration
from workshop_dist.training import TrainingConfiguration
from workshop_dist.training.config import (
    CadenceConfiguration,
    EMAConfiguration,
    GroupOptimizerConfiguration,
    LengthConfiguration,
    PerformanceConfiguration,
    TrainingCheckpointConfiguration,
)


def packaged_default_path() -> Path:
    return Path(str(resources.files("workshop_dist") / "configs" / "vae_digits.yaml"))


# Each type's own fields set to non-default values (a field the type ignores is an error).
FULL_OPTIMIZER_FIELDS: dict[str, dict[str, Any]] = {
    "sgd": {"momentum": 0.9, "nesterov": True},
    "rmsprop": {"decay": 0.95, "eps": 1e-6, "momentum": 0.5, "nesterov": True},
    "adamw": {"beta1": 0.8, "beta2": 0.99, "eps": 1e-6},
}
FULL_SCHEDULER_FIELDS: dict[str, dict[str, Any]] = {
    "multistep": {"gamma": 0.5, "milestones": [50, 150]},
    "cosine": {"cycle_length": 100, "min_lr_ratio": 0.01},
    "linear": {"total_steps": 200, "min_lr_ratio": 0.01},
    "exponential": {"decay_rate": 0.9, "decay_steps": 20, "staircase": True},
    "step": {"step_size": 10, "gamma": 0.5},
}
FULL_VARIANTS = [("sgd", "multistep"), ("rmsprop", "exponential"), ("adamw", "cosine"), ("sgd", "linear"), ("adamw", "step")]


def full_config(optimizer: str = "sgd", scheduler: str = "multistep") -> ExperimentConfiguration:
    """Every optional field that ``optimizer``/``scheduler`` use set to a non-default, non-null value."""
    return ExperimentConfiguration(
        model=ModelConfiguration(
            name="full_model",
            model_class="conv_vae",
            input_dim=(28, 28, 1),
            hidden_dims=[32, 64],
            output_dim=8,
            parameters={"beta": 0.5, "kernel": [3, 3], "note": "text", "nested": {"a": 1, "b": False}},
            dtype="bfloat16",
            param_dtype="bfloat16",
            remat="dots_saveable",
            decoder="runs/autoencoder",  # a latent model's frozen autoencoder (only read when a Trainer is built)
        ),
        training=TrainingConfiguration(
            batch_size=64,
            num_epochs=3,
            seed=3,
            nan_policy="skip",
            optimizer=OptimizerConfiguration(
                optimizer_type=optimizer,
                learning_rate=3e-4,
                weight_decay=1e-5,
                gradient_clip_norm=1.5,
                gradient_clip_value=0.25,
                **FULL_OPTIMIZER_FIELDS[optimizer],
            ),
            scheduler=SchedulerConfiguration(scheduler_type=scheduler, warmup_steps=5, **FULL_SCHEDULER_FIELDS[scheduler]),
            length=LengthConfiguration(max_steps=300, steps_per_epoch=40),
            cadence=CadenceConfiguration(log_every=5, eval_every=25, save_every=50, num_samples=9, profile_steps=(3, 4)),
            checkpoint=TrainingCheckpointConfiguration(
                directory="/tmp/checkpoints", max_to_keep=2, async_save=False, replica_parallel=True, resume=False,
                restore_from="/tmp/elsewhere/7", on_error="continue", save_retries=1, lock_timeout=30,
                best_metric="val/fid", best_mode="max",
                local={"directory": "/tmp/local", "every": 10, "max_to_keep": 1},
            ),
            optimizers={
                "generator": GroupOptimizerConfiguration(
                    optimizer_type=optimizer,
                    learning_rate=1e-3,
                    weight_decay=1e-5,
                    gradient_clip_norm=1.0,
                    gradient_clip_value=0.5,
                    **FULL_OPTIMIZER_FIELDS[optimizer],
                    scheduler=SchedulerConfiguration(scheduler_type=scheduler, warmup_steps=2, **FULL_SCHEDULER_FIELDS[scheduler]),
                )
            },
            ema=EMAConfiguration(decay=[0.99, 0.999], eval_decay=0.999, start_step=10, for_eval=False,
                                 posthoc={"sigma_rels": [0.05, 0.1], "snapshot_every": 50}),
            frozen=["encoder"],
            init_from={"checkpoint": "/tmp/other_run", "include": ["network"], "exclude": ["network/head"],
                       "rename": {"backbone": "network"}},
            performance=PerformanceConfiguration(
                grad_accum_steps=2, steps_per_call=2, data_on_device=True, max_steps_in_flight=3
            ),
        ),
        compilation=CompilationConfiguration(cache_dir="/tmp/jax_cache"),
        eval=EvalConfiguration(fid_every=50, fid_samples=64, fid_batch_size=32, features="inception",
                               inception_weights="/tmp/inception.safetensors", reference="/tmp/reference.npz",
                               sampling={"sampling_steps": 8}, seed=2),
        data=DataConfiguration(
            source="tfds:mnist",
            data_dir="/tmp/data",
            train_split="train[:90%]",
            eval_split="train[90%:]",
            image_key="img",
            normalize="levels",
            max_level=255.0,
            binarize=True,
            random_flip=True,
            shuffle=False,
            worker_count=2,
            prefetch=4,
            download=True,
            image_size=32,
            channels=3,
            resize=False,
            random_crop=False,
            skip_bad_examples=True,
        ),
        mesh=MeshConfiguration(
            data=2, fsdp=2, tensor=2, dcn_data=2, logical_axis_rules={"embed": "fsdp"}, fsdp_min_size=10
        ),
        logging=LoggingConfiguration(
            trackers=["jsonl", "wandb"],
            console="verbose",
            wandb=WandbConfiguration(
                project="p", entity="e", name="n", group="g", tags=["t"], notes="x", mode="offline"
            ),
        ),
        distributed=DistributedConfiguration(
            coordinator_address="10.0.0.1:1234",
            num_processes=2,
            process_id=1,
            local_device_ids=[0, 1],
            cluster_detection="slurm",
            heartbeat_timeout_seconds=20,
            initialization_timeout_seconds=100,
            shutdown_timeout_seconds=30,
            cpu_collectives="mpi",
        ),
    )


def null_paths(value: Any, prefix: str = "") -> list[str]:
    if value is None:
        return [prefix]
    if isinstance(value, dict):
        return [p for key, item in value.items() for p in null_paths(item, f"{prefix}.{key}".lstrip("."))]
    return []


def config_error(data: dict[str, Any], overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        ExperimentConfiguration.from_dict(data, overrides)
    return str(info.value)


# --------------------------------------------------------------------------- round trips


def test_full_configs_together_set_every_optional_field():
    # A field null in one variant (a scheduler field its type ignores) is set in another.
    null_in_all = set.intersection(*(set(null_paths(full_config(*v).model_dump())) for v in FULL_VARIANTS))
    assert null_in_all == {"training.performance.precision"}  # deprecated (model.dtype): only old configs set it
    assert {field for fields in FULL_OPTIMIZER_FIELDS.values() for field in fields} == set(OPTIMIZER_FIELD_USERS)
    assert {field for fields in FULL_SCHEDULER_FIELDS.values() for field in fields} == set(SCHEDULER_FIELD_USERS)


def test_packaged_default_loads_with_its_values():
    config = ExperimentConfiguration.load(packaged_default_path())
    assert config.model.input_dim == (8, 8, 1)
    assert isinstance(config.model.input_dim, tuple)
    assert config.model.hidden_dims == [256, 128]
    assert config.model.parameters == {"beta": 1.0}
    assert config.training.batch_size == 128
    assert config.training.optimizer.learning_rate == pytest.approx(2e-3)
    assert config.training.optimizer.gradient_clip_norm == 10.0
    assert config.training.scheduler is not None
    assert config.training.scheduler.scheduler_type == "cosine"
    assert config.training.scheduler.warmup_steps == 20
    assert config.training.scheduler.min_lr_ratio == pytest.approx(0.05)
    assert config.training.cadence.eval_every is None
    assert (config.mesh.data, config.mesh.fsdp, config.mesh.tensor) == (-1, 1, 1)


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
@pytest.mark.parametrize("which", ["packaged_default", *FULL_VARIANTS])
def test_save_load_round_trip_is_exact(tmp_path, suffix, which):
    config = (
        ExperimentConfiguration.load(packaged_default_path())
        if which == "packaged_default"
        else full_config(*which)
    )
    path = tmp_path / f"config{suffix}"
    config.save(path)
    loaded = ExperimentConfiguration.load(path)
    assert loaded == config
    assert loaded.model_dump() == config.model_dump()
    # Tuples come back as tuples, nested sections as their classes.
    assert isinstance(loaded.model.input_dim, tuple)
    assert loaded.model.input_dim == config.model.input_dim
    assert isinstance(loaded.training.optimizer, OptimizerConfiguration)
    assert loaded.training.optimizer == config.training.optimizer
    assert loaded.training.scheduler == config.training.scheduler
    # Saving again writes the very same text.
    again = tmp_path / f"again{suffix}"
    loaded.save(again)
    assert again.read_text() == path.read_text()


def test_save_picks_format_from_suffix(tmp_path):
    config = full_config()
    config.save(tmp_path / "c.json")
    config.save(tmp_path / "c.yaml")
    assert (tmp_path / "c.json").read_text().lstrip().startswith("{")
    assert (tmp_path / "c.json").read_text() == config.to_json()
    assert (tmp_path / "c.yaml").read_text() == config.to_yaml()
    assert not (tmp_path / "c.yaml").read_text().lstrip().startswith("{")


@pytest.mark.parametrize(
    "text", ["yes", "no", "on", "null", "~", "true", "2.5", "12", "0x1F", ".inf", "1e3", "1e-3", "2E+5"]
)
def test_yaml_round_trip_keeps_strings_that_look_like_other_types(tmp_path, text):
    config = ExperimentConfiguration(
        data=DataConfiguration(train_split=text), model=ModelConfiguration(parameters={"tag": text})
    )
    config.save(tmp_path / "c.yaml")
    loaded = ExperimentConfiguration.load(tmp_path / "c.yaml")
    assert loaded.data.train_split == text
    assert loaded.model.parameters == {"tag": text}


def test_yaml_reads_exponent_without_dot_as_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "model:\n  parameters:\n    beta: 1e-3\n    big: 2E+5\ntraining:\n  optimizer:\n"
        "    learning_rate: 3e-4\n"
    )
    config = ExperimentConfiguration.load(path)
    # parameters is dict[str, Any]: only the loader can make these floats.
    assert config.model.parameters == {"beta": 0.001, "big": 200000.0}
    assert all(type(v) is float for v in config.model.parameters.values())
    assert config.training.optimizer.learning_rate == 3e-4


def test_int_input_dim_becomes_a_one_element_tuple():
    assert ModelConfiguration(input_dim=64).input_dim == (64,)
    assert ExperimentConfiguration.from_dict({"model": {"input_dim": [4, 4]}}).model.input_dim == (4, 4)


# --------------------------------------------------------------------------- unknown fields


def test_unknown_top_level_field_names_it_and_suggests():
    message = config_error({"trainng": {"batch_size": 8}})
    assert "unknown field 'trainng'" in message
    assert "did you mean 'training'?" in message
    assert "(top level)" in message


def test_unknown_nested_field_names_it_and_suggests_learning_rate():
    message = config_error({"training": {"optimizer": {"learning_rat": 1e-3}}})
    assert "training.optimizer" in message
    assert "unknown field 'learning_rat'" in message
    assert "did you mean 'learning_rate'?" in message


def test_unknown_field_in_file_is_reported(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  optimizer:\n    learning_rat: 0.001\n")
    with pytest.raises(
        ConfigError, match=r"training\.optimizer.*unknown field 'learning_rat'.*'learning_rate'"
    ):
        ExperimentConfiguration.load(path)


@pytest.mark.parametrize(
    ("cls", "wrong", "right"),
    [
        (ModelConfiguration, "hiden_dims", "hidden_dims"),
        (TrainingConfiguration, "batch_sise", "batch_size"),
        (OptimizerConfiguration, "learning_rat", "learning_rate"),
        (SchedulerConfiguration, "warmup_step", "warmup_steps"),
        (DataConfiguration, "sorce", "source"),
        (MeshConfiguration, "fsdb", "fsdp"),
    ],
)
def test_direct_construction_rejects_unknown_fields_with_suggestion(cls, wrong, right):
    with pytest.raises(pydantic.ValidationError) as info:
        cls(**{wrong: 1})
    text = str(info.value)
    assert f"unknown field '{wrong}'" in text
    assert f"did you mean '{right}'?" in text


def test_unknown_field_without_close_match_lists_valid_fields():
    message = config_error({"mesh": {"zzzzzz": 1}})
    assert "unknown field 'zzzzzz'" in message
    assert "did you mean" not in message
    assert "valid fields: data, dcn_data, fsdp" in message


# --------------------------------------------------------------------------- wrong types / values


def test_seed_style_wrong_type_raises_validation_error():
    with pytest.raises(pydantic.ValidationError) as info:
        TrainingConfiguration(name="bad", batch_size="invalid")
    assert [error["loc"] for error in info.value.errors()] == [("batch_size",)]


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"training": {"batch_size": "invalid"}}, "training.batch_size"),
        ({"training": {"optimizer": {"learning_rate": "fast"}}}, "training.optimizer.learning_rate"),
        ({"training": {"optimizer": {"optimizer_type": "adamax"}}}, "training.optimizer.optimizer_type"),
        ({"training": {"scheduler": {"warmup_steps": "soon"}}}, "training.scheduler.warmup_steps"),
        ({"training": {"batch_size": 3.5}}, "training.batch_size"),
        ({"model": {"hidden_dims": "wide"}}, "model.hidden_dims"),
        ({"mesh": {"data": "all"}}, "mesh.data"),
        ({"data": {"shuffle": "maybe"}}, "data.shuffle"),
    ],
)
def test_wrong_type_names_the_field_path(data, where):
    message = config_error(data)
    assert f"  {where}: " in message


def test_wrong_type_message_shows_the_given_value():
    assert "(got 'invalid')" in config_error({"training": {"batch_size": "invalid"}})


@pytest.mark.parametrize("lr", [0, -1e-3])
def test_non_positive_learning_rate_rejected(lr):
    message = config_error({"training": {"optimizer": {"learning_rate": lr}}})
    assert "training.optimizer.learning_rate" in message
    assert "greater than 0" in message


@pytest.mark.parametrize("batch_size", [0, -8])
def test_non_positive_batch_size_rejected(batch_size):
    message = config_error({"training": {"batch_size": batch_size}})
    assert "training.batch_size" in message
    assert "greater than 0" in message


@pytest.mark.parametrize("milestones", [[10, 5], [5, 5], [0, 5], [-3, 5]])
def test_milestones_must_be_positive_and_increasing(milestones):
    message = config_error(
        {"training": {"scheduler": {"scheduler_type": "multistep", "milestones": milestones}}}
    )
    assert "training.scheduler" in message
    assert "strictly increasing" in message
    assert str(milestones) in message


def test_increasing_milestones_accepted():
    config = ExperimentConfiguration.from_dict(
        {"training": {"scheduler": {"scheduler_type": "multistep", "milestones": [5, 10]}}}
    )
    assert config.training.scheduler.milestones == [5, 10]


@pytest.mark.parametrize(("data", "fsdp", "size"), [(3, 1, 3), (2, 3, 6), (1, 5, 5)])
def test_batch_size_must_divide_by_data_times_fsdp(data, fsdp, size):
    message = config_error({"training": {"batch_size": 128}, "mesh": {"data": data, "fsdp": fsdp}})
    assert "training.batch_size=128" in message
    assert f"data-parallel size {size}" in message


@pytest.mark.parametrize(
    "mesh",
    [
        {"data": 2, "fsdp": 4},
        {"data": 4, "fsdp": 2, "tensor": 3},  # tensor is not a batch axis
        {"data": -1, "fsdp": 3},  # unknown until the devices are known
        {"data": 3, "fsdp": -1},
    ],
)
def test_batch_size_divisible_or_unknown_data_parallel_size_accepted(mesh):
    config = ExperimentConfiguration.from_dict({"training": {"batch_size": 128}, "mesh": mesh})
    assert config.mesh.data == mesh["data"]


def test_mesh_with_two_fill_axes_rejected():
    message = config_error({"mesh": {"data": -1, "fsdp": -1}})
    assert "mesh" in message
    assert "at most one mesh axis may be -1" in message
    with pytest.raises(pydantic.ValidationError, match="at most one mesh axis"):
        MeshConfiguration(data=-1, fsdp=1, tensor=-1)


@pytest.mark.parametrize(("axis", "size"), [("data", 0), ("fsdp", -2), ("tensor", 0)])
def test_mesh_axis_sizes_must_be_positive_or_fill(axis, size):
    with pytest.raises(pydantic.ValidationError, match=f"mesh.{axis} must be a positive size or -1"):
        MeshConfiguration(**{axis: size})


@pytest.mark.parametrize(
    ("sizes", "devices", "expected"),
    [
        ({"data": -1}, 8, {"data": 8, "fsdp": 1, "tensor": 1}),
        ({"data": -1, "fsdp": 2}, 8, {"data": 4, "fsdp": 2, "tensor": 1}),
        ({"data": 2, "fsdp": -1}, 8, {"data": 2, "fsdp": 4, "tensor": 1}),
        ({"data": 2, "fsdp": 2, "tensor": -1}, 8, {"data": 2, "fsdp": 2, "tensor": 2}),
        ({"data": 2, "fsdp": 2, "tensor": 2}, 8, {"data": 2, "fsdp": 2, "tensor": 2}),
        ({"data": -1, "fsdp": 1}, 1, {"data": 1, "fsdp": 1, "tensor": 1}),
    ],
)
def test_axis_sizes_fills_the_remaining_devices(sizes, devices, expected):
    assert MeshConfiguration(**sizes).axis_sizes(devices) == expected


def test_axis_sizes_rejects_a_fill_that_cannot_divide():
    with pytest.raises(ConfigError) as info:
        MeshConfiguration(data=-1, fsdp=3).axis_sizes(8)
    message = str(info.value)
    assert "mesh.data" in message
    assert "8 devices" in message
    assert "3" in message


def test_axis_sizes_rejects_a_fill_larger_than_the_devices():
    with pytest.raises(ConfigError, match=r"mesh\.data"):
        MeshConfiguration(data=-1, fsdp=16).axis_sizes(8)


@pytest.mark.parametrize(("sizes", "used"), [({"data": 2, "fsdp": 2}, 4), ({"data": 4, "fsdp": 4}, 16)])
def test_axis_sizes_rejects_products_that_do_not_use_every_device(sizes, used):
    with pytest.raises(ConfigError) as info:
        MeshConfiguration(**sizes).axis_sizes(8)
    message = str(info.value)
    assert f"uses {used} devices but 8 are available" in message
    assert "-1" in message


def test_axis_sizes_checks_dcn_data():
    assert MeshConfiguration(data=-1, dcn_data=2).axis_sizes(8)["data"] == 8
    with pytest.raises(ConfigError, match="dcn_data=3"):
        MeshConfiguration(data=-1, dcn_data=3).axis_sizes(8)


# --------------------------------------------------------------------------- overrides


def test_nested_override_sets_a_float():
    config = ExperimentConfiguration.load(packaged_default_path(), ["training.optimizer.learning_rate=3e-4"])
    assert type(config.training.optimizer.learning_rate) is float
    assert config.training.optimizer.learning_rate == 3e-4
    # Everything else stays as in the file.
    assert config.training.optimizer.gradient_clip_norm == 10.0
    assert config.training.scheduler.scheduler_type == "cosine"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("3e-4", 3e-4),
        ("1E5", 1e5),
        ("2.5", 2.5),
        ("42", 42),
        ("[1,2]", [1, 2]),
        ("[1, 2, 3]", [1, 2, 3]),
        ("null", None),
        ("~", None),
        ("", None),
        ("true", True),
        ("false", False),
        ("hello", "hello"),
        ("tfds:mnist", "tfds:mnist"),
        ("a=b", "a=b"),
        ("{x: 1}", {"x": 1}),
    ],
)
def test_override_values_are_parsed_as_yaml(raw, expected):
    data = apply_overrides({}, [f"section.field={raw}"])
    assert data == {"section": {"field": expected}}
    assert type(data["section"]["field"]) is type(expected)


def test_overrides_apply_in_order_and_leave_the_input_untouched():
    original = {"training": {"batch_size": 32, "optimizer": {"learning_rate": 0.1}}}
    data = apply_overrides(
        original, ["training.batch_size=16", "training.batch_size=64", " training.seed = 7 "]
    )
    assert data["training"]["batch_size"] == 64
    assert data["training"]["seed"] == 7
    assert original == {"training": {"batch_size": 32, "optimizer": {"learning_rate": 0.1}}}


def test_overrides_of_several_types_are_validated():
    config = ExperimentConfiguration.from_dict(
        {"training": {"checkpoint": {"directory": "/somewhere"}}},
        [
            "model.hidden_dims=[64,32]",
            "model.input_dim=[4,4,3]",
            "training.checkpoint.directory=null",
            "data.shuffle=false",
            "training.cadence.eval_every=50",
            "model.parameters.beta=0.25",
        ],
    )
    assert config.model.hidden_dims == [64, 32]
    assert config.model.input_dim == (4, 4, 3)
    assert config.training.checkpoint.directory is None
    assert config.data.shuffle is False
    assert config.training.cadence.eval_every == 50
    assert config.model.parameters == {"beta": 0.25}


def test_override_creates_a_section_that_is_null_in_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  batch_size: 32\n  scheduler: null\n")
    assert ExperimentConfiguration.load(path).training.scheduler is None
    config = ExperimentConfiguration.load(
        path, ["training.scheduler.scheduler_type=cosine", "training.scheduler.warmup_steps=5"]
    )
    assert config.training.scheduler == SchedulerConfiguration(scheduler_type="cosine", warmup_steps=5)
    assert config.training.batch_size == 32


def test_override_creates_a_section_missing_from_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  output_dim: 4\n")
    config = ExperimentConfiguration.load(path, ["mesh.fsdp=2", "mesh.data=-1"])
    assert (config.mesh.data, config.mesh.fsdp) == (-1, 2)
    assert config.model.output_dim == 4


def test_override_can_reset_a_section_to_null():
    config = ExperimentConfiguration.load(packaged_default_path(), ["training.scheduler=null"])
    assert config.training.scheduler is None


@pytest.mark.parametrize("bad", ["training.batch_size", "training.batch_size:64", "=64", " =1"])
def test_malformed_override_is_a_config_error(bad):
    with pytest.raises(ConfigError) as info:
        ExperimentConfiguration.from_dict({}, [bad])
    assert f"'{bad}'" in str(info.value)
    assert "section.field=value" in str(info.value)


def test_override_into_a_value_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        ExperimentConfiguration.load(packaged_default_path(), ["training.batch_size.x=1"])
    assert "'batch_size' is a value, not a section" in str(info.value)
    with pytest.raises(ConfigError, match="'hidden_dims' is a value"):
        ExperimentConfiguration.load(packaged_default_path(), ["model.hidden_dims.0=5"])


def test_override_with_unknown_field_suggests_the_closest():
    message = config_error({}, ["training.optimizer.learning_rat=3e-4"])
    assert "training.optimizer" in message
    assert "unknown field 'learning_rat'" in message
    assert "did you mean 'learning_rate'?" in message
    message = config_error({}, ["trainig.batch_size=3"])
    assert "did you mean 'training'?" in message


@pytest.mark.parametrize(
    ("override", "where"),
    [
        ("training.optimizer.learning_rate=0", "training.optimizer.learning_rate"),
        ("training.batch_size=abc", "training.batch_size"),
        ("training.batch_size=[1,2]", "training.batch_size"),
        ("mesh.fsdp=3", "(top level)"),  # 128 is not divisible by data x fsdp = 1 x 3
    ],
)
def test_override_values_are_validated_like_the_file(override, where):
    message = config_error({"training": {"batch_size": 128}, "mesh": {"data": 1}}, [override])
    assert f"  {where}: " in message


@pytest.mark.parametrize(
    "bad", ["model.hidden_dims=[1,2", "model.parameters.x={a: 1", "training.name=a: b: c"]
)
def test_override_value_that_is_not_valid_yaml_is_a_config_error(bad):
    with pytest.raises(ConfigError) as info:
        ExperimentConfiguration.from_dict({}, [bad])
    assert bad in str(info.value)


# --------------------------------------------------------------------------- fields the type ignores


def test_ignored_field_from_an_override_names_the_field_and_its_types():
    message = config_error({}, ["training.scheduler.milestones=[30,10]"])  # the default schedule: constant
    assert (
        "  training.scheduler.milestones: milestones is used only by scheduler_type multistep; "
        "with scheduler_type 'constant' it would be ignored"
    ) in message


def test_ignored_field_from_a_file_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  optimizer: {optimizer_type: adam, momentum: 0.9}\n")
    with pytest.raises(ConfigError, match=r"training.optimizer.momentum: momentum is used only by optimizer_type sgd, rmsprop"):
        ExperimentConfiguration.load(path)


def test_switching_the_packaged_schedule_names_the_leftover_field():
    # The default cosine sets min_lr_ratio; a `step` schedule would silently drop it.
    with pytest.raises(ConfigError, match=r"training\.scheduler\.min_lr_ratio: min_lr_ratio is used only by scheduler_type cosine, linear"):
        ExperimentConfiguration.load(
            packaged_default_path(), ["training.scheduler.scheduler_type=step", "training.scheduler.step_size=10"]
        )
    replaced = ExperimentConfiguration.load(
        packaged_default_path(), ["training.scheduler={scheduler_type: step, step_size: 10}"]
    )
    assert replaced.training.scheduler.scheduler_type == "step"


def test_resolved_config_with_every_field_spelled_out_loads_again(tmp_path):
    # config.yaml in a workdir lists every field, also those the chosen types ignore (at their defaults).
    path = tmp_path / "config.yaml"
    ExperimentConfiguration.load(packaged_default_path()).save(path)
    assert "milestones: []" in path.read_text() and "momentum: 0.0" in path.read_text()
    assert ExperimentConfiguration.load(path) == ExperimentConfiguration.load(packaged_default_path())


def test_cli_reports_an_ignored_field_in_one_line_with_exit_code_2(capsys):
    from workshop_dist.cli import main

    assert main(["--print-config", "training.scheduler.milestones=[30,10]"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    problem = [line for line in captured.err.splitlines() if "milestones" in line]
    assert problem == [
        "  training.scheduler.milestones: milestones is used only by scheduler_type multistep; with "
        "scheduler_type 'cosine' it would be ignored: remove it, or pick a scheduler_type that uses it (got [30, 10])"
    ]
    assert "Traceback" not in captured.err


# --------------------------------------------------------------------------- error messages


def test_config_error_is_one_readable_paragraph():
    message = config_error({"training": {"batch_size": 0, "optimizer": {"learning_rate": -1.0}}})
    assert message.startswith("Invalid ExperimentConfiguration (2 problems):")
    assert "\n\n" not in message
    assert "errors.pydantic.dev" not in message
    assert "Traceback" not in message
    assert "Value error," not in message
    assert "  training.batch_size: Input should be greater than 0 (got 0)" in message
    assert "  training.optimizer.learning_rate: Input should be greater than 0 (got -1.0)" in message
    assert len(message.splitlines()) == 3


def test_single_problem_message_and_error_classes():
    with pytest.raises(ConfigError) as info:
        ExperimentConfiguration.from_dict({"training": {"scheduler": {"scheduler_type": "step"}}})
    error = info.value
    assert str(error).startswith("Invalid ExperimentConfiguration (1 problem):")
    assert "  training.scheduler: scheduler_type 'step' needs step_size" in str(error)
    assert isinstance(error, WorkshopError)
    assert isinstance(error, ValueError)
    assert error.exit_code == 2
    assert error.__cause__ is None


def test_section_classes_name_themselves_in_the_message():
    with pytest.raises(ConfigError, match=r"^Invalid TrainingConfiguration \(1 problem\):\n  batch_size: "):
        TrainingConfiguration.from_dict({"batch_size": -1})


# --------------------------------------------------------------------------- config files


def test_missing_file_is_a_config_error(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        ExperimentConfiguration.load(missing)
    assert "not found" in str(info.value)
    assert str(missing) in str(info.value)


def test_directory_is_not_a_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ExperimentConfiguration.load(tmp_path)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("bad.yaml", "training:\n  batch_size: [1, 2\n"),
        ("bad.yaml", "training:\n\tbatch_size: 3\n"),
        ("bad.yml", "a: b: c\n"),
        ("bad.json", '{"training": {"batch_size": 3,}}'),
        ("bad.json", "training:\n  batch_size: 3\n"),  # YAML is not JSON
    ],
)
def test_invalid_yaml_or_json_is_a_config_error(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        ExperimentConfiguration.load(path)
    assert "is not valid YAML/JSON" in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("name", "text", "kind"),
    [
        ("list.yaml", "- training\n- model\n", "list"),
        ("scalar.yaml", "just text\n", "str"),
        ("number.yml", "12\n", "int"),
        ("list.json", "[1, 2]", "list"),
    ],
)
def test_top_level_must_be_a_mapping(tmp_path, name, text, kind):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        ExperimentConfiguration.load(path)
    assert "must hold a mapping of sections" in str(info.value)
    assert f"not {kind}" in str(info.value)


def test_empty_file_gives_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    assert read_config_file(path) == {}
    assert ExperimentConfiguration.load(path) == ExperimentConfiguration()
    assert ExperimentConfiguration.load(path, ["training.batch_size=8"]).training.batch_size == 8


def test_json_file_is_loaded_with_overrides(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"training": {"batch_size": 16, "optimizer": {"optimizer_type": "sgd"}}}')
    config = ExperimentConfiguration.load(path, ["training.optimizer.momentum=0.5"])
    assert config.training.batch_size == 16
    assert config.training.optimizer.optimizer_type == "sgd"
    assert config.training.optimizer.momentum == 0.5


# --------------------------------------------------------------------------- sections and old names

OLD_FLAT_VALUES = {  # every flat name of earlier releases, with a value that is not its default
    "max_steps": 7, "steps_per_epoch": 3, "log_frequency": 2, "eval_frequency": 4, "save_frequency": 5,
    "num_samples": 9, "profile_steps": (2, 1), "ema_decay": 0.5, "ema_start_step": 3, "eval_with_ema": False,
    "precision": "bfloat16", "grad_accum_steps": 2, "steps_per_call": 4, "data_on_device": True,
    "max_steps_in_flight": 3, "resume": False, "restore_from": "/tmp/r", "checkpoint_dir": "/tmp/c",
    "max_checkpoints": 2, "async_checkpointing": False, "replica_parallel_checkpoints": True,
}


@pytest.mark.parametrize("old", sorted(OLD_FLAT_VALUES))
def test_each_old_flat_name_still_works_with_a_warning_naming_its_new_place(old):
    from workshop_dist.training.config import MOVED

    section, new = MOVED[old]
    with pytest.warns(DeprecationWarning, match=rf"training\.{old} is deprecated .* use training\.{section}\.{new}$"):
        config = TrainingConfiguration(**{old: OLD_FLAT_VALUES[old]})
    assert getattr(getattr(config, section), new) == OLD_FLAT_VALUES[old]
    assert old not in config.model_dump()  # written back only under the new name
    assert set(MOVED) == set(OLD_FLAT_VALUES)


def test_old_names_in_a_file_load_and_save_under_the_new_ones(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text(
        "training:\n  name: run\n  log_frequency: 3\n  ema_decay: 0.9\n  max_checkpoints: 2\n"
        "  compilation_cache_dir: null\n  optimizer: {name: adam, learning_rate: 0.1}\n"
    )
    with pytest.warns(DeprecationWarning) as caught:
        config = ExperimentConfiguration.load(path)
    assert {str(w.message).split(" is ")[0] for w in caught} == {
        "training.log_frequency", "training.ema_decay", "training.max_checkpoints", "training.compilation_cache_dir",
    }
    assert (config.training.cadence.log_every, config.training.ema.decay, config.training.checkpoint.max_to_keep) == (3, 0.9, 2)
    assert config.compilation.cache_dir is None
    config.save(tmp_path / "new.yaml")
    text = (tmp_path / "new.yaml").read_text()
    assert "log_frequency" not in text and "name:" not in text.split("training:")[1].split("data:")[0]
    assert ExperimentConfiguration.load(tmp_path / "new.yaml") == config  # no warning: pytest turns ours into errors


def test_an_old_name_and_its_new_one_must_agree():
    with pytest.warns(DeprecationWarning), pytest.raises(pydantic.ValidationError, match=r"set only cadence\.log_every"):
        TrainingConfiguration(log_frequency=5, cadence={"log_every": 6})
    with pytest.warns(DeprecationWarning):
        assert TrainingConfiguration(log_frequency=5, cadence={"log_every": 5, "save_every": 7}).cadence.save_every == 7


def test_name_is_accepted_as_in_the_original_design_and_not_kept():
    config = TrainingConfiguration(
        name="vae", optimizer=OptimizerConfiguration(name="adamw", optimizer_type="adamw"),
        scheduler=SchedulerConfiguration(name="cosine", scheduler_type="cosine"),
    )
    assert config.optimizer.optimizer_type == "adamw"
    assert "name" not in config.model_dump() and "name" not in config.model_dump()["optimizer"]


def test_the_compilation_cache_is_not_a_training_setting():
    assert "compilation_cache_dir" not in TrainingConfiguration.model_fields
    with pytest.warns(DeprecationWarning, match="compilation.cache_dir"):
        config = ExperimentConfiguration.from_dict({}, ["training.compilation_cache_dir=/tmp/cache"])
    assert config.compilation.cache_dir == "/tmp/cache"
    assert ExperimentConfiguration.from_dict({}, ["compilation.cache_dir=null"]).compilation.cache_dir is None
