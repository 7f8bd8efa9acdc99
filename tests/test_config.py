"""The composed configuration: defaults, types, ranges, the seed's spellings."""

from __future__ import annotations

import re

import pytest
from conftest import REPO, run_cli
from hydra import compose, initialize_config_dir

from pipeline.config import register_config, to_config
from pipeline.errors import ConfigError

register_config()


def compose_config(*overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_defaults_match_the_documented_public_keys():
    config, notes = to_config(compose_config())
    assert notes == []
    assert config.data.dir == "data" and config.data.image_size == 150
    assert config.model.weights == "imagenet"
    assert config.model.save_path == "model/my_saved_InceptionV3_model.h5"
    assert config.checkpoint.dir == "ckpt"
    assert config.checkpoint.filename == "transfer_{epoch:02d}-{val_accuracy:.2f}"
    assert config.checkpoint.monitor == "val_accuracy"
    assert config.train.finetune.unfreeze_after == "auto"


def test_resume_is_absent_so_plus_resume_can_add_it():
    assert "resume" not in compose_config()
    assert compose_config("+resume=true").resume is True
    assert compose_config("+resume=false").resume is False


def test_finetune_rate_defaults_to_the_weights_source():
    pretrained, _ = to_config(compose_config())
    scratch, _ = to_config(compose_config("model.weights=null"))
    assert pretrained.train.finetune.lr == 1e-4 and scratch.train.finetune.lr == 1e-3
    explicit, _ = to_config(compose_config("model.weights=null", "train.finetune.lr=0.01"))
    assert explicit.train.finetune.lr == 0.01


def test_smoke_experiment_shrinks_the_run():
    config, _ = to_config(compose_config("experiment=smoke"))
    assert config.data.image_size == 75 and config.model.weights is None
    assert config.train.head.epochs == 1 and config.train.finetune.epochs == 1


def test_wrong_type_is_refused_while_composing():
    with pytest.raises(Exception, match="data.batch_size"):
        compose_config("data.batch_size=lots")


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
    ],
)
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        to_config(compose_config(override))


def test_zero_epochs_in_both_phases_is_refused():
    with pytest.raises(ConfigError, match="nothing to train"):
        to_config(compose_config("train.head.epochs=0", "train.finetune.epochs=0"))


def test_seed_spellings_are_translated_with_a_note():
    config, notes = to_config(
        compose_config("checkpoint.monitor=val_acc", "checkpoint.filename='transfer_{epoch:02d}-{val_acc:.2f}'")
    )
    assert config.checkpoint.monitor == "val_accuracy"
    assert config.checkpoint.filename == "transfer_{epoch:02d}-{val_accuracy:.2f}"
    assert len(notes) == 2 and all("Keras 2" in n for n in notes)


@pytest.mark.parametrize("pattern", ["ckpt_{epoch}-{val_f1:.2f}", "ckpt_{epoch:xyz}", "sub/ckpt_{epoch}"])
def test_unfillable_filename_is_refused_before_training(pattern):
    with pytest.raises(ConfigError, match="checkpoint.filename"):
        to_config(compose_config(f"checkpoint.filename='{pattern}'"))


# --- the keys of the image check (data.on_bad_image, data.max_pixels) and data.dir ---


def test_image_check_defaults_fail_on_bad_images_at_pillows_bomb_limit():
    config, _ = to_config(compose_config())
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
        to_config(compose_config(override))


# --- the speed keys (train.precision, train.cache_dir, train.*.cached_views) ---


def test_speed_keys_default_to_off():
    config, _ = to_config(compose_config())
    assert config.train.precision == "float32" and config.train.cache_dir == "cache"
    assert config.train.head.cached_views == 0 and config.train.finetune.cached_views == 0
    assert config.train.finetune.reuse_head_views is False


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
            ["train.finetune.reuse_head_views=true", "train.finetune.cached_views=2"],
            "needs train.head.epochs, train.head.cached_views and train.finetune.cached_views all above 0 (they are 2, 0 and 2)",
        ),
        (
            ["train.finetune.reuse_head_views=true", "train.head.cached_views=2", "train.finetune.cached_views=1"],
            "train.finetune.cached_views=1 must equal train.head.cached_views=2",
        ),
    ],
)
def test_speed_keys_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        to_config(compose_config(*overrides))


def test_help_says_what_it_is_the_two_commands_and_the_groups():
    result = run_cli("--help", cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "powered by Hydra" not in result.stdout
    assert "fine-tunes InceptionV3" in result.stdout
    assert "make train" in result.stdout and "make test" in result.stdout
    assert "distribute: mirrored, multi_worker, none" in result.stdout  # $APP_CONFIG_GROUPS, filled in
    assert "README.md" in result.stdout and "docs/" in result.stdout
