"""The composed configuration: defaults, types, ranges, the seed's spellings."""

from __future__ import annotations

import ast
import dataclasses
import re
import shutil

import pytest
from conftest import REPO, run_cli
from hydra import compose, initialize_config_dir
from omegaconf import MISSING

from pipeline import config as schema
from pipeline.config import register_config, to_config
from pipeline.defaults import compose_config
from pipeline.errors import ConfigError

register_config()


def hydra_compose(*overrides):
    """The DictConfig Hydra composes from conf/, before to_config."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_defaults_match_the_documented_public_keys():
    config, notes = to_config(hydra_compose())
    assert notes == []
    assert config.data.dir == "data" and config.data.image_size == 150
    assert config.model.weights == "imagenet"
    assert config.model.save_path == "model/my_saved_InceptionV3_model.h5"
    assert config.checkpoint.dir == "ckpt"
    assert config.checkpoint.filename == "transfer_{epoch:02d}-{val_accuracy:.2f}"
    assert config.checkpoint.monitor == "val_accuracy"
    assert config.train.finetune.unfreeze_after == "auto"


def test_defaults_are_the_values_conf_writes():
    config = compose_config([f"data.dir={REPO / 'data'}"])
    assert config.train.head.epochs == 2 and config.train.finetune.epochs == 10
    assert config.train.head.lr == 1e-3 and config.train.finetune.lr == 1e-4  # pretrained: the low rate
    assert config.data.batch_size == 16 and config.data.workers == 2 and config.data.interpolation == "bilinear"
    assert config.checkpoint.format == "h5" and config.checkpoint.keep_last == 3
    assert config.distribute.strategy == "none" and config.distribute.local_workers == 0
    assert config.logger.name == "none" and config.logger.tracking_uri == "sqlite:///mlruns.db"


SCHEMA = [schema.Config, schema.DataConfig, schema.ModelConfig, schema.TrainConfig, schema.PhaseConfig]
SCHEMA += [schema.FinetuneConfig, schema.EarlyStoppingConfig, schema.CheckpointConfig, schema.DistributeConfig]
SCHEMA += [schema.LoggerConfig]


@pytest.mark.parametrize("cls", SCHEMA, ids=lambda cls: cls.__name__)
def test_the_schema_holds_types_but_no_values(cls):
    """conf/ is the one source of values: a default here would be a second one, free to drift."""
    assert {f.name: f.default for f in dataclasses.fields(cls)} == {f.name: MISSING for f in dataclasses.fields(cls)}
    assert all(f.default_factory is dataclasses.MISSING for f in dataclasses.fields(cls))


def test_every_schema_class_is_checked():
    assert {c.__name__ for c in SCHEMA} == {
        name
        for name, obj in vars(schema).items()
        if dataclasses.is_dataclass(obj) and obj.__module__ == schema.__name__
    }


def test_no_code_reads_a_value_from_the_schema_classes():
    """`DataConfig.max_pixels` is MISSING ("???"), not a value: read the composed config instead."""
    names = {cls.__name__: {f.name for f in dataclasses.fields(cls)} for cls in SCHEMA}
    reads = []
    for path in sorted([*(REPO / "pipeline").rglob("*.py"), *(REPO / "tests").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.attr in names.get(node.value.id, ()):
                    reads.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert reads == []


def test_a_key_missing_from_conf_is_refused_by_name(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    data_yaml = conf / "data" / "default.yaml"
    data_yaml.write_text(
        "".join(x for x in data_yaml.read_text().splitlines(True) if not x.startswith("interpolation:"))
    )
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"data.dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"^data\.interpolation: no value; conf/\*\.yaml gives every key one"):
        to_config(cfg)


def test_compose_config_takes_overrides_and_validates(tmp_path):
    config = compose_config([f"data.dir={tmp_path}", "model.weights=null", "checkpoint.monitor=val_acc"])
    assert config.data.dir == str(tmp_path) and config.train.finetune.lr == 1e-3  # the scratch rate
    assert config.checkpoint.monitor == "val_accuracy"  # the seed's spelling translated, as the command does
    with pytest.raises(ConfigError, match="data.batch_size"):
        compose_config([f"data.dir={tmp_path}", "data.batch_size=0"])


def test_compose_config_works_inside_a_running_hydra_app_and_leaves_it_as_it_was(tmp_path):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        first = compose_config([f"data.dir={tmp_path}", "data.batch_size=3"])
        second = compose_config([f"data.dir={tmp_path}"])
        assert first.data.batch_size == 3 and second.data.batch_size == 16
        assert compose(config_name="config", overrides=["data.batch_size=5"]).data.batch_size == 5  # the app's own
    assert compose_config([f"data.dir={tmp_path}"]).data.batch_size == 16  # and again after it has ended


def test_resume_is_absent_so_plus_resume_can_add_it():
    assert "resume" not in hydra_compose()
    assert hydra_compose("+resume=true").resume is True
    assert hydra_compose("+resume=false").resume is False


def test_finetune_rate_defaults_to_the_weights_source():
    pretrained, _ = to_config(hydra_compose())
    scratch, _ = to_config(hydra_compose("model.weights=null"))
    assert pretrained.train.finetune.lr == 1e-4 and scratch.train.finetune.lr == 1e-3
    explicit, _ = to_config(hydra_compose("model.weights=null", "train.finetune.lr=0.01"))
    assert explicit.train.finetune.lr == 0.01


def test_smoke_experiment_shrinks_the_run():
    config, _ = to_config(hydra_compose("experiment=smoke"))
    assert config.data.image_size == 75 and config.model.weights is None
    assert config.train.head.epochs == 1 and config.train.finetune.epochs == 1


def test_wrong_type_is_refused_while_composing():
    with pytest.raises(Exception, match="data.batch_size"):
        hydra_compose("data.batch_size=lots")


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.image_size=64", "data.image_size"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.validation_split=1.5", "data.validation_split"),
        ("train.head.epochs=-1", "train.head.epochs"),
        ("train.finetune.lr=0", "train.finetune.lr"),
        ("train.head.optimizer=adagrad", "train.head.optimizer"),
        ("checkpoint.format=pickle", "checkpoint.format"),
        ("checkpoint.monitor=f1", "checkpoint.monitor"),
        ("checkpoint.every=0", "checkpoint.every"),
        ("model.weights=/no/such/file.h5", "model.weights"),
        ("model.dropout=1.0", "model.dropout"),
        ("model.save_path=model/final.keras", "model.save_path"),
        ("model.final=worst", "model.final"),
        ("train.early_stopping.patience=-1", "train.early_stopping.patience"),
        ("train.early_stopping.min_delta=-0.1", "train.early_stopping.min_delta"),
        ("logger.on_error=ignore", "logger.on_error"),
        ("logger.timeout=0", "logger.timeout"),
        ("logger.retries=-1", "logger.retries"),
    ],
)
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        to_config(hydra_compose(override))


def test_zero_epochs_in_both_phases_is_refused():
    with pytest.raises(ConfigError, match="nothing to train"):
        to_config(hydra_compose("train.head.epochs=0", "train.finetune.epochs=0"))


def test_seed_spellings_are_translated_with_a_note():
    config, notes = to_config(
        hydra_compose("checkpoint.monitor=val_acc", "checkpoint.filename='transfer_{epoch:02d}-{val_acc:.2f}'")
    )
    assert config.checkpoint.monitor == "val_accuracy"
    assert config.checkpoint.filename == "transfer_{epoch:02d}-{val_accuracy:.2f}"
    assert len(notes) == 2 and all("Keras 2" in n for n in notes)


@pytest.mark.parametrize("pattern", ["ckpt_{epoch}-{val_f1:.2f}", "ckpt_{epoch:xyz}", "sub/ckpt_{epoch}"])
def test_unfillable_filename_is_refused_before_training(pattern):
    with pytest.raises(ConfigError, match="checkpoint.filename"):
        to_config(hydra_compose(f"checkpoint.filename='{pattern}'"))


# --- the keys of the image check (data.on_bad_image, data.max_pixels) and data.dir ---


def test_image_check_defaults_fail_on_bad_images_at_pillows_bomb_limit():
    config, _ = to_config(hydra_compose())
    assert config.data.on_bad_image == "fail" and config.data.max_pixels == 89_478_485


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.on_bad_image=ignore", "data.on_bad_image='ignore' is not allowed; choose one of: fail, skip"),
        ("data.max_pixels=0", "data.max_pixels=0 must be >= 1"),
        # make_sample_if_empty is true by default: a mistyped folder must still be refused, not filled
        ("data.dir=/no/such/folder", "data.dir='/no/such/folder' is not a folder"),
    ],
)
def test_image_check_keys_and_data_dir_are_validated(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        to_config(hydra_compose(override))


# --- the speed keys (train.precision, train.cache_dir, train.*.cached_views) ---


def cache_settings(*overrides):
    t = to_config(hydra_compose(*overrides))[0].train
    return t.head.cached_views, t.finetune.cached_views, t.finetune.reuse_head_views


def test_speed_keys_default_to_the_fast_path_with_pretrained_weights_and_off_from_scratch():
    config, _ = to_config(hydra_compose())
    assert config.train.precision == "float32" and config.train.cache_dir == "cache"
    assert cache_settings() == (2, 2, True)  # weights=imagenet
    assert cache_settings("model.weights=null") == (0, 0, False)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        # defaults step aside where the rest rules them out, instead of refusing the run
        (["train.finetune.unfreeze_after=none"], (2, 0, False)),
        (["train.head.epochs=0"], (2, 2, False)),
        (["train.finetune.cached_views=3"], (2, 3, False)),
        (["train.head.cached_views=0"], (0, 2, False)),
        (["distribute=mirrored"], (0, 0, False)),
        (["distribute.local_workers=2"], (0, 0, False)),
        # values given are kept as given
        (["train.finetune.reuse_head_views=false"], (2, 2, False)),
        (["model.weights=null", "train.head.cached_views=1"], (1, 0, False)),
    ],
)
def test_cache_defaults_step_aside_where_they_cannot_apply(overrides, expected):
    assert cache_settings(*overrides) == expected


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.head.cached_views=-1"], "train.head.cached_views=-1 must be >= 0"),
        (
            ["train.precision=bfloat16"],
            ("train.precision='bfloat16' is not allowed; choose one of: float32, mixed_bfloat16, mixed_float16"),
        ),
        # a whole-base fine-tune has no frozen part to cache; auto means none from random weights
        (["model.weights=null", "train.finetune.cached_views=2"], "train.finetune.unfreeze_after='auto' trains"),
        (["train.finetune.unfreeze_after=none", "train.finetune.cached_views=2"], "set train.finetune.unfreeze_after"),
        # reusing the head phase's views needs both phases cached alike
        (
            ["train.finetune.reuse_head_views=true", "train.head.cached_views=0", "train.finetune.cached_views=2"],
            "needs train.head.epochs, train.head.cached_views and train.finetune.cached_views all above 0 "
            "(they are 2, 0 and 2)",
        ),
        (
            ["train.finetune.reuse_head_views=true", "train.head.cached_views=2", "train.finetune.cached_views=1"],
            "train.finetune.cached_views=1 must equal train.head.cached_views=2",
        ),
    ],
)
def test_speed_keys_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        to_config(hydra_compose(*overrides))


def test_help_says_what_it_is_the_two_commands_and_the_groups():
    result = run_cli("--help", cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "powered by Hydra" not in result.stdout
    assert "fine-tunes InceptionV3" in result.stdout
    assert "make train" in result.stdout and "make test" in result.stdout
    assert "distribute: mirrored, multi_worker, none" in result.stdout  # $APP_CONFIG_GROUPS, filled in
    assert "README.md" in result.stdout and "docs/" in result.stdout
