"""The fingerprint: what must match for a checkpoint to continue a run, and what may change.

Most tests here work at the level of plan_resume, on manifests written by hand
(plan_resume reads only the manifests); the optimizer tests restore real
checkpoints, and the end-to-end tests run the CLI.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import REPO, run_args, run_cli

from pipeline.__main__ import parse_resume
from pipeline.checkpoints.resume import plan_resume, restore_newest_usable
from pipeline.checkpoints.store import save_checkpoint
from pipeline.data.dataset import read_dataset
from pipeline.defaults import compose_config
from pipeline.errors import CheckpointError, ConfigError
from pipeline.model import build_model, compile_model, resolve_unfreeze_after, set_trainable
from pipeline.state import TrainState
from pipeline.train import make_fingerprint


def config_for(data_dir: Path, *overrides: str):
    return compose_config(["experiment=smoke", f"data.dir={data_dir}", *overrides])


@pytest.fixture(scope="module")
def held_out(tmp_path_factory, tiny_data) -> Path:
    """tiny_data's images all in train/ (6 a class), no validation/: data.validation_split holds out part of it."""
    root = tmp_path_factory.mktemp("held_out")
    shutil.copytree(tiny_data / "train", root / "train")
    for image in (tiny_data / "validation").glob("*/*.jpg"):
        shutil.copy(image, root / "train" / image.parent.name / f"v_{image.name}")
    return root


@pytest.fixture(scope="module")
def base_cfg(held_out):
    return config_for(held_out)


def fingerprint_of(cfg) -> dict:
    return make_fingerprint(cfg, read_dataset(cfg.data))


def changed(cfg, key: str, value):
    """A copy of `cfg` with the dotted `key` set to `value`."""
    cfg = copy.deepcopy(cfg)
    *parents, name = key.split(".")
    node = cfg
    for part in parents:
        node = getattr(node, part)
    setattr(node, name, value)
    return cfg


def write_record(directory: Path, fingerprint: dict, phase: str = "head", epoch: int = 1, stem: str | None = None):
    """A committed checkpoint as plan_resume sees it: its manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = stem or f"transfer_{epoch:02d}"
    state = TrainState(phase=phase, phase_epoch=1, epoch=epoch)
    manifest = {
        "version": 1,
        "stem": stem,
        "format": "h5",
        "files": {},
        "state": asdict(state),
        "logs": {},
        "fingerprint": fingerprint,
        "created": time.time() + epoch,
    }
    (directory / f"{stem}.manifest.json").write_text(json.dumps(manifest))


# Each setting the fingerprint holds, the config key that changes it, a new value, and the phase
# a checkpoint must be in for the change to matter. A key added to the fingerprint without an
# entry here fails test_every_setting_of_the_fingerprint_has_a_test.
SETTING_CHANGES = {
    "image_size": ("data.image_size", 99, "head"),
    "dropout": ("model.dropout", 0.1, "head"),
    "pretrained": ("model.weights", "imagenet.h5", "head"),
    "data.batch_size": ("data.batch_size", 8, "head"),
    "data.interpolation": ("data.interpolation", "nearest", "head"),
    "data.validation_split": ("data.validation_split", 0.5, "head"),
    "data.rotation_range": ("data.rotation_range", 5.0, "head"),
    "data.width_shift_range": ("data.width_shift_range", 0.3, "head"),
    "data.height_shift_range": ("data.height_shift_range", 0.3, "head"),
    "data.shear_range": ("data.shear_range", 0.0, "head"),
    "data.zoom_range": ("data.zoom_range", 0.0, "head"),
    "data.horizontal_flip": ("data.horizontal_flip", False, "head"),
    "data.fill_mode": ("data.fill_mode", "reflect", "head"),
    "train.seed": ("train.seed", 7, "head"),
    "train.precision": ("train.precision", "mixed_bfloat16", "head"),
    "train.head.optimizer": ("train.head.optimizer", "sgd", "head"),
    "train.head.schedule": ("train.head.schedule", "constant", "head"),
    "train.finetune.optimizer": ("train.finetune.optimizer", "rmsprop", "finetune"),
    "train.finetune.schedule": ("train.finetune.schedule", "constant", "finetune"),
    "train.finetune.unfreeze_after": ("train.finetune.unfreeze_after", "mixed7", "finetune"),
    "train.class_weight": ("train.class_weight", "balanced", "head"),
    "train.label_smoothing": ("train.label_smoothing", 0.1, "head"),
}
# Set by the code or by the data, not by one config key: tested on their own below.
NOT_SETTINGS = {"architecture", "classes", "data", "train_images", "validation_images"}


def test_every_setting_of_the_fingerprint_has_a_test(base_cfg):
    assert set(fingerprint_of(base_cfg)) - NOT_SETTINGS == set(SETTING_CHANGES)


@pytest.mark.parametrize("fingerprint_key", sorted(SETTING_CHANGES))
def test_each_setting_of_the_fingerprint_refuses_with_old_and_new_value(tmp_path, base_cfg, fingerprint_key):
    key, value, phase = SETTING_CHANGES[fingerprint_key]
    write_record(tmp_path, fingerprint_of(base_cfg), phase=phase)
    with pytest.raises(CheckpointError) as refused:
        plan_resume(tmp_path, fingerprint_of(changed(base_cfg, key, value)), None)
    message = str(refused.value)
    assert "\n" not in message  # one error: line
    assert key in message and "+resume=false" in message and "checkpoint.dir=" in message
    shown = "False -> True" if fingerprint_key == "pretrained" else f"-> {value}"
    assert shown in message.split(key, 1)[1]


def test_the_architecture_and_the_class_folders_refuse(tmp_path, base_cfg):
    current = fingerprint_of(base_cfg)
    write_record(tmp_path, {**current, "architecture": "ResNet50+GAP+dense"})
    with pytest.raises(CheckpointError, match="architecture ResNet50"):
        plan_resume(tmp_path, current, None)
    write_record(tmp_path, {**current, "classes": ["a", "b", "z"]})
    with pytest.raises(CheckpointError, match="class folders"):
        plan_resume(tmp_path, current, None)


@pytest.mark.parametrize(
    "key, value",
    [
        ("train.head.epochs", 5),  # raising the epochs trains longer
        ("train.finetune.epochs", 3),
        ("train.head.lr", 0.01),
        ("train.finetune.lr", 1e-5),
        ("data.workers", 2),
        ("train.threads", 1),
        ("checkpoint.keep_last", 1),
        ("data.validation_split", 0.5),  # unused when validation/ exists
    ],
)
def test_settings_that_do_not_change_the_run_resume(tmp_path, tiny_data, key, value):
    cfg = config_for(tiny_data)
    write_record(tmp_path, fingerprint_of(cfg))
    assert plan_resume(tmp_path, fingerprint_of(changed(cfg, key, value)), None).reason == "resuming"


def test_another_phase_s_optimizer_does_not_block(tmp_path, base_cfg):
    # the checkpoint is in the head phase: the fine-tune phase has no optimizer state yet
    write_record(tmp_path, fingerprint_of(base_cfg), phase="head")
    current = fingerprint_of(changed(base_cfg, "train.finetune.optimizer", "sgd"))
    assert plan_resume(tmp_path, current, None).reason == "resuming"


def test_a_moved_data_folder_resumes(tmp_path, held_out):
    write_record(tmp_path / "ckpt", fingerprint_of(config_for(held_out)))
    moved = shutil.copytree(held_out, tmp_path / "elsewhere" / "photos")
    plan = plan_resume(tmp_path / "ckpt", fingerprint_of(config_for(moved)), None)
    assert plan.reason == "resuming" and len(plan.candidates) == 1


def test_checkpoints_from_before_the_new_keys_still_resume(tmp_path, held_out):
    # what the fingerprint held before: an absolute data folder (here another one) and counts
    cfg = config_for(held_out)
    current = fingerprint_of(cfg)
    old = {
        "architecture": current["architecture"],
        "classes": current["classes"],
        "image_size": cfg.data.image_size,
        "dropout": cfg.model.dropout,
        "pretrained": False,
        "data_dir": "/mnt/old-mount/photos",
        "train_images": current["train_images"],
        "validation_images": current["validation_images"],
    }
    write_record(tmp_path, old)
    assert plan_resume(tmp_path, current, None).reason == "resuming"
    write_record(tmp_path, {**old, "image_size": 99}, epoch=2)  # the keys it had are still compared
    with pytest.raises(CheckpointError, match="data.image_size 99 -> 75"):
        plan_resume(tmp_path, current, None)


def edit_data(root: Path) -> None:
    """One file added, one removed, one relabelled (moved to another class), one replaced by a larger one."""
    classes = sorted(p.name for p in (root / "train").iterdir())
    first = sorted((root / "train" / classes[0]).iterdir())
    second = sorted((root / "train" / classes[1]).iterdir())
    shutil.copy(first[0], root / "train" / classes[0] / "added.jpg")
    first[1].unlink()
    first[2].rename(root / "train" / classes[1] / first[2].name)
    second[0].write_bytes(second[0].read_bytes() + b"\0" * 100)


@pytest.fixture
def changed_data(tmp_path, tiny_data):
    """Checkpoints made on a copy of tiny_data, then that copy edited: (ckpt dir, cfg before, cfg after)."""
    from pipeline.checkpoints.fingerprint import save_file_list
    from pipeline.data.dataset import file_list

    root = shutil.copytree(tiny_data, tmp_path / "data")
    cfg = config_for(root)
    data = read_dataset(cfg.data)
    files = file_list(data, root)
    write_record(tmp_path / "ckpt", make_fingerprint(cfg, data, files))
    save_file_list(tmp_path / "ckpt", files)
    edit_data(root)
    return tmp_path / "ckpt", cfg


def test_changed_data_refuses_with_the_differences(changed_data):
    from pipeline.data.dataset import file_list

    ckpt, cfg = changed_data
    data = read_dataset(cfg.data)
    with pytest.raises(CheckpointError) as refused:
        plan_resume(ckpt, make_fingerprint(cfg, data), None, files=file_list(data, Path(cfg.data.dir)))
    message = str(refused.value)
    assert "\n" not in message
    assert "1 file added, 1 removed, 1 relabelled, 1 changed in size" in message
    assert "added train/" in message and "added.jpg" in message
    assert "+resume=anyway" in message and "+resume=false" in message


def test_anyway_continues_over_changed_data_and_says_so(changed_data):
    from pipeline.data.dataset import file_list

    ckpt, cfg = changed_data
    data = read_dataset(cfg.data)
    plan = plan_resume(ckpt, make_fingerprint(cfg, data), "anyway", files=file_list(data, Path(cfg.data.dir)))
    assert [c.stem for c in plan.candidates] == ["transfer_01"]
    assert plan.overridden.startswith("+resume=anyway") and "1 removed" in plan.overridden


def test_anyway_does_not_pass_over_a_changed_setting(changed_data):
    ckpt, cfg = changed_data
    cfg = changed(cfg, "data.batch_size", 8)
    with pytest.raises(CheckpointError, match="data.batch_size 4 -> 8"):
        plan_resume(ckpt, fingerprint_of(cfg), "anyway")


def test_changed_data_without_the_stored_file_list_names_the_counts(changed_data):
    ckpt, cfg = changed_data
    for listing in ckpt.glob("data-*.json"):
        listing.unlink()
    with pytest.raises(CheckpointError, match="12 -> 12 training images"):
        plan_resume(ckpt, fingerprint_of(cfg), None)


def test_after_an_anyway_resume_the_same_command_resumes(tmp_path, changed_data):
    ckpt, cfg = changed_data  # transfer_01 was made on the old data
    current = fingerprint_of(cfg)
    write_record(ckpt, current, epoch=2)  # the first checkpoint after +resume=anyway
    plan = plan_resume(ckpt, current, None)
    # the old data's checkpoint is no fallback for this run
    assert [c.stem for c in plan.candidates] == ["transfer_02"]


def test_parse_resume_accepts_anyway():
    assert parse_resume("anyway") == "anyway"
    assert parse_resume(True) is True and parse_resume(None) is None
    with pytest.raises(ConfigError, match="anyway"):
        parse_resume("maybe")


# ---- a changed optimizer is a configuration change, not damage ---------------


@pytest.fixture(scope="module")
def two_phase_checkpoints(tmp_path_factory, held_out):
    """Real checkpoints: one at the end of the head phase, a newer one inside the fine-tune phase (adam both)."""
    directory = tmp_path_factory.mktemp("ckpt")
    cfg = config_for(held_out, "train.finetune.unfreeze_after=mixed9", f"checkpoint.dir={directory}")
    fingerprint = fingerprint_of(cfg)
    keras.utils.set_random_seed(0)
    model = build_model(cfg.model, 3, cfg.data.image_size)
    for epoch, phase in enumerate(PHASES, start=1):
        prepare_for(cfg, model)(TrainState(phase=phase))
        model.optimizer.build(model.trainable_variables)
        state = TrainState(phase=phase, phase_epoch=1, epoch=epoch)
        save_checkpoint(model, cfg.checkpoint, f"transfer_{epoch:02d}", state, {}, fingerprint)
    return directory, cfg


PHASES = ("head", "finetune")


def prepare_for(cfg, model):
    """What train.Session.prepare does: trainable layers and optimizer of the state's phase."""

    def prepare(state: TrainState):
        phase = getattr(cfg.train, state.phase)
        unfreeze = resolve_unfreeze_after(cfg.train.finetune.unfreeze_after, pretrained=False, name=cfg.model.name)
        set_trainable(model, state.phase, unfreeze, pretrained=False)
        compile_model(model, phase.optimizer, phase.lr, phase.schedule, 10)
        return model

    return prepare


@pytest.mark.parametrize("key, value", [("train.finetune.optimizer", "sgd"), ("train.finetune.schedule", "constant")])
def test_a_changed_optimizer_refuses_instead_of_falling_back(two_phase_checkpoints, key, value):
    directory, cfg = two_phase_checkpoints
    new = changed(cfg, key, value)
    model = build_model(new.model, 3, new.data.image_size)
    with pytest.raises(CheckpointError, match=f"{key} "):
        # before: the fine-tune checkpoint failed to load, was skipped as damaged, and the
        # run went back to the end of the head phase
        plan = plan_resume(directory, fingerprint_of(new), None, read_only=True)
        restore_newest_usable(plan, prepare_for(new, model))


def test_an_optimizer_change_the_fingerprint_cannot_see_refuses_at_load(tmp_path, two_phase_checkpoints):
    # checkpoints written before the optimizer was in the fingerprint
    directory, cfg = two_phase_checkpoints
    old = shutil.copytree(directory, tmp_path / "ckpt")
    for path in old.glob("*.manifest.json"):
        manifest = json.loads(path.read_text())
        manifest["fingerprint"] = {k: v for k, v in manifest["fingerprint"].items() if not k.startswith("train.")}
        path.write_text(json.dumps(manifest))
    new = changed(cfg, "train.finetune.optimizer", "sgd")
    model = build_model(new.model, 3, new.data.image_size)
    plan = plan_resume(old, fingerprint_of(new), None, read_only=True)
    with pytest.raises(CheckpointError, match="transfer_02 does not fit") as refused:
        restore_newest_usable(plan, prepare_for(new, model))
    assert "\n" not in str(refused.value) and "+resume=false" in str(refused.value)


def test_an_unchanged_optimizer_restores_the_newest(two_phase_checkpoints):
    directory, cfg = two_phase_checkpoints
    model = build_model(cfg.model, 3, cfg.data.image_size)
    plan = plan_resume(directory, fingerprint_of(cfg), None, read_only=True)
    assert restore_newest_usable(plan, prepare_for(cfg, model)).stem == "transfer_02"


# ---- end to end ------------------------------------------------------------

HEAD_ONE = ["train.head.epochs=1", "train.finetune.epochs=0"]


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory, tiny_data):
    """A run of one head epoch on a copy of tiny_data, to copy and continue in the tests below."""
    tmp = tmp_path_factory.mktemp("one_epoch")
    data = shutil.copytree(tiny_data, tmp / "data")
    result = run_cli(*run_args(tmp, data, *HEAD_ONE), cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp


def copy_of_run(run: Path, tmp_path: Path, data_name: str = "data") -> Path:
    shutil.copytree(run / "ckpt", tmp_path / "ckpt")
    return shutil.copytree(run / "data", tmp_path / data_name)


@pytest.mark.e2e
def test_e2e_a_changed_setting_refuses_with_one_line(one_epoch_run, tmp_path):
    data = copy_of_run(one_epoch_run, tmp_path)
    result = run_cli(*run_args(tmp_path, data, *HEAD_ONE, "data.batch_size=8"), cwd=REPO)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr
    assert "data.batch_size 4 -> 8" in errors[0] and "Traceback" not in result.stderr


@pytest.mark.e2e
def test_e2e_a_moved_data_folder_resumes_with_more_epochs(one_epoch_run, tmp_path):
    data = copy_of_run(one_epoch_run, tmp_path, "moved/photos")
    result = run_cli(*run_args(tmp_path, data, "train.head.epochs=2", "train.finetune.epochs=0"), cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resume: from checkpoint transfer_01" in result.stdout
    assert "head epoch 2/2" in result.stdout


@pytest.mark.e2e
def test_e2e_changed_data_refuses_and_anyway_continues_into_the_lineage(one_epoch_run, tmp_path):
    data = copy_of_run(one_epoch_run, tmp_path)
    edit_data(data)
    args = run_args(tmp_path, data, "train.head.epochs=2", "train.finetune.epochs=0")
    refused = run_cli(*args, cwd=REPO)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "1 file added, 1 removed, 1 relabelled, 1 changed in size" in refused.stderr
    assert "+resume=anyway" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    anyway = run_cli(*args, "+resume=anyway", cwd=REPO)
    assert anyway.returncode == 0, anyway.stdout + anyway.stderr
    assert "resume: from checkpoint transfer_01" in anyway.stdout
    lineage = json.loads((tmp_path / "model" / "final.json").read_text())["lineage"]
    assert lineage[0].startswith("transfer_01") and "+resume=anyway" in lineage[0] and "1 removed" in lineage[0]
    # the model trained on: weights changed from the checkpoint's
    final = keras.models.load_model(tmp_path / "model" / "final.h5", compile=False)
    assert final.output_shape == (None, 3) and np.isfinite(final.weights[-1].numpy()).all()
    again = run_cli(*args, cwd=REPO)  # the same command now finds a finished run
    assert again.returncode == 0 and "already complete" in again.stdout, again.stdout + again.stderr
