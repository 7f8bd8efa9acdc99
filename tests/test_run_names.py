"""Folder names of runs and sweep jobs: readable, within a file name's 255 bytes, stable, epochs left out."""

from __future__ import annotations

import pytest
from conftest import REPO, cli_env, run_cli
from hydra import compose, initialize_config_dir

from pipeline.config import register_config, run_name
from pipeline.run_names import adopt_folder_named_with_epochs

register_config()

MAX_NAME_BYTES = 255
# The Optuna trial, with the path a user's data may well have.
OPTUNA_TRIAL = (
    "data.batch_size=8,data.dir=/mnt/shared/projects/flower-classifier/datasets/photos-2024-cleaned,data.image_size=75,"
    "hparams_search=optuna,model.dropout=0.4753571532049581,model.weights=null,"
    "train.finetune.lr=0.0006251373574521745,train.finetune.unfreeze_after=mixed8"
)


def composed_folders(*overrides: str) -> tuple[str, str]:
    """(hydra.run.dir, hydra.sweep.subdir) as Hydra composes them for `overrides`."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    return cfg.hydra.run.dir, cfg.hydra.sweep.subdir


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ("", "default"),
        ("train.head.lr=0.001", "train.head.lr=0.001"),
        ("data.dir=/data/photos,model.dropout=0.3", "data.dir=_data_photos,model.dropout=0.3"),
        ("x=" + "a" * 253, "x=" + "a" * 253),  # exactly 255 bytes: fits, so kept
    ],
)
def test_names_that_fit_are_kept_as_they_were(overrides, expected):
    """Earlier runs' folders (ckpt/<job>/ above all) must be found again under the same name."""
    assert run_name(overrides) == expected


@pytest.mark.parametrize(
    "overrides",
    [
        OPTUNA_TRIAL,
        "x=" + "a" * 254,  # one byte too many
        "data.dir=/" + "very/long/path/" * 40,
        ",".join(f"key{i}=value{i}" for i in range(100)),
        "k" * 1000,  # no '=' at all
        "label=" + "é" * 300,  # two bytes a letter: a cut must not split one
        "emoji=" + "\U0001f600" * 100 + ",b=" + "ü" * 100,
        "a=[" + ",".join(str(i) for i in range(200)) + "]",  # commas inside a value
        "model.dropout=" + "0." + "3" * 300,
        "/" * 400,
    ],
)
def test_long_names_fit_in_a_file_name_and_stay_the_same(overrides):
    name = run_name(overrides)
    assert len(name.encode()) <= MAX_NAME_BYTES, (len(name.encode()), name)
    assert name and "/" not in name and "\0" not in name and name not in (".", "..")
    assert run_name(overrides) == name  # a rerun finds its folder again


def test_long_names_stay_readable_and_tell_apart_what_was_cut():
    name = run_name(OPTUNA_TRIAL)
    assert "model.dropout=0.4754" in name and "train.finetune.lr=0.0006251" in name
    assert "data.dir=" in name and "photos-2024-cleaned" in name and "unfreeze_after=mixed8" in name
    # Two override sets that differ only where the shortening cut: different folders all the same.
    other = run_name(OPTUNA_TRIAL.replace("0.4753571532049581", "0.4753571532049582"))
    assert other != name and len(other.encode()) <= MAX_NAME_BYTES


def test_the_epochs_are_not_part_of_where_a_run_or_job_writes():
    """Raising the epochs is how a run trains longer: it must find its checkpoints and history again."""
    plain = composed_folders("model.dropout=0.3")
    longer = composed_folders("model.dropout=0.3", "train.head.epochs=5", "train.finetune.epochs=12")
    assert longer == plain == ("outputs/model.dropout=0.3", "model.dropout=0.3")
    assert composed_folders("train.finetune.epochs=3") == ("outputs/default", "default")


@pytest.mark.e2e
def test_a_long_override_set_gets_past_folder_creation(tmp_path):
    """The README's speed options with two long absolute paths: Errno 36 before, now a real start.

    The data folder holds no class folders, so the run stops with its one-line data error right
    after Hydra made the run folder and the config was recorded there.
    """
    data = tmp_path / "datasets" / "flowers-photographed-in-the-garden-2024" / "cleaned-and-resized-to-150px"
    data.mkdir(parents=True)
    (data / "README.txt").write_text("no class folders here")
    weights = data.parent / "inception_v3_weights_tf_dim_ordering_tf_kernels_notop_downloaded.h5"
    weights.write_bytes(b"not read: the data check fails first")
    overrides = [
        f"data.dir={data}",
        f"model.weights={weights}",
        "data.image_size=150",
        "train.head.epochs=10",
        "train.finetune.epochs=5",
        "train.head.cached_views=2",
        "train.finetune.cached_views=2",
        "train.finetune.reuse_head_views=true",
        "train.finetune.unfreeze_after=mixed8",
        "train.precision=mixed_bfloat16",
        f"checkpoint.dir={tmp_path / 'ckpt'}",
        f"model.save_path={tmp_path / 'model' / 'final.h5'}",
    ]
    # Run from tmp_path (outputs/ lands there), importing this checkout's pipeline.
    result = run_cli(*overrides, cwd=tmp_path, env=cli_env(PYTHONPATH=str(REPO)), timeout=300)
    assert "File name too long" not in result.stdout + result.stderr
    assert result.returncode == 2, result.stdout + result.stderr
    assert "holds 0 class folder(s)" in result.stderr and "Traceback" not in result.stderr
    (folder,) = (tmp_path / "outputs").iterdir()
    assert len(folder.name.encode()) <= MAX_NAME_BYTES and "digest=" in folder.name
    assert "train.precision=mixed_bfloat16" in folder.name and "epochs" not in folder.name
    assert (folder / ".hydra" / "config.yaml").is_file()


def test_a_sweep_jobs_folder_named_with_its_epochs_is_taken_over(tmp_path):
    """Checkpoints of a sweep run before the epochs left job names continue in the job's new folder."""
    ckpt = tmp_path / "ckpt"
    old = ckpt / "model.dropout=0.3,train.finetune.epochs=4,train.head.epochs=2"
    old.mkdir(parents=True)
    (old / "transfer_02-0.50.manifest.json").write_text("{}")
    (ckpt / "model.dropout=0.1,train.head.epochs=2").mkdir()  # another job: left alone
    job = ckpt / run_name("model.dropout=0.3")
    note = adopt_folder_named_with_epochs(job)
    assert note and str(old) in note
    assert (job / "transfer_02-0.50.manifest.json").is_file() and not old.exists()
    assert (ckpt / "model.dropout=0.1,train.head.epochs=2").is_dir()
    assert adopt_folder_named_with_epochs(job) is None  # once only


def test_two_older_folders_of_one_job_are_named_not_guessed_between(tmp_path):
    for epochs in (2, 4):
        (tmp_path / f"model.dropout=0.3,train.head.epochs={epochs}").mkdir()
    note = adopt_folder_named_with_epochs(tmp_path / "model.dropout=0.3")
    assert "train.head.epochs=2" in note and "train.head.epochs=4" in note and "rename" in note
    assert not (tmp_path / "model.dropout=0.3").exists()
