"""Faults and misuse around a run: a full disk, untrusted model files, class names
that break line-based files, and what dead processes leave in the temporary folder."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, cli_env, from_conf, run_args, run_cli

import pipeline.checkpoints.store as store_hooks
from pipeline.checkpoints.store import (
    list_checkpoints,
    save_checkpoint,
    space_for,
    verify,
)
from pipeline.data.dataset import read_dataset
from pipeline.distribute.strategy import scratch_folder
from pipeline.distribute.tf_config import WorkerRole
from pipeline.errors import CheckpointError, DataError, DiskFull
from pipeline.model_file.load import read_metadata_or_none as read_metadata
from pipeline.reports.history import read_history, start_history, write_scalars
from pipeline.state import TrainState


def dead_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ---- 12c: class names that would break labels.txt and predict's tab-separated output


@pytest.mark.parametrize("bad", ["tab\there", "new\nline", "carriage\rreturn"])
def test_class_names_with_a_tab_or_line_break_are_refused_and_named(tmp_path, tiny_data, bad):
    root = tmp_path / "d"
    shutil.copytree(tiny_data, root)
    for split in ("train", "validation"):
        os.rename(root / split / "square", root / split / bad)
    cfg = from_conf("data", dir=str(root), image_size=75, batch_size=4, workers=0)
    with pytest.raises(DataError) as err:
        read_dataset(cfg)
    message = str(err.value)
    assert repr(bad) in message and str(root / "train") in message
    assert "\n" not in message and "\t" not in message  # the error itself stays one line


# ---- 12d: a SIGKILLed worker's scratch folder


@pytest.mark.parametrize("role", [WorkerRole(1, 2), WorkerRole(0, 2)], ids=["worker", "chief"])
def test_scratch_folders_of_dead_workers_are_removed_at_the_next_start(tmp_path, monkeypatch, role):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = tmp_path / f"pipeline-worker-{dead_pid()}-1-abc123"
    (dead / "ckpt").mkdir(parents=True)
    (dead / "model.h5").write_bytes(b"left by a SIGKILLed worker")
    live = tmp_path / f"pipeline-worker-{os.getpid()}-2-def456"  # a worker still running
    live.mkdir()
    unrelated = tmp_path / "someone-elses-folder"
    unrelated.mkdir()
    with scratch_folder(role) as scratch:
        assert not dead.exists()
        assert live.exists() and unrelated.exists()
        if role.is_chief:
            assert scratch is None
        else:
            assert Path(scratch).parent == tmp_path
            assert Path(scratch).name.startswith(f"pipeline-worker-{os.getpid()}-1-")
    if scratch is not None:
        assert not Path(scratch).exists()


# ---- 10: a model file that would run code when loaded


def write_evil_model(path: Path, marker: Path) -> None:
    """A model whose Lambda layer creates `marker` when it runs, with the metadata predict looks for."""
    import h5py
    import keras

    from pipeline.model_file.load import METADATA_ATTR

    inputs = keras.Input((75, 75, 3))
    x = keras.layers.Lambda(lambda t, m=str(marker): (open(m, "w").close(), t)[1])(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    marker.unlink()  # building the model ran the function once; only a load may create it again
    model.save(path)
    if path.suffix == ".h5":  # an attacker adds the metadata too, so that only the load can refuse it
        with h5py.File(path, "a") as f:
            f.attrs[METADATA_ATTR] = json.dumps({"class_names": ["a", "b", "c"], "image_size": 75})


@pytest.mark.e2e
@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_predict_refuses_a_model_whose_lambda_layer_would_run_code(tmp_path, tiny_data, suffix):
    marker = tmp_path / "code-ran"
    evil = tmp_path / f"evil{suffix}"
    write_evil_model(evil, marker)
    result = run_cli(str(evil), str(tiny_data / "validation"), cwd=REPO, module="pipeline.predict")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert str(evil) in lines[0]
    if suffix == ".h5":  # a .keras file is refused earlier: it is not the HDF5 file training saves
        assert "Lambda layer" in lines[0] and "refused" in lines[0] and "safe_mode=False" not in lines[0]
    assert not marker.exists()
    assert result.stdout == ""


def test_a_keras_that_ignores_safe_mode_for_h5_is_refused_before_loading(tmp_path, monkeypatch):
    import keras

    from pipeline.model_file.load import ModelFileError, ModelInfo, load_model

    monkeypatch.setattr(keras, "__version__", "3.11.3")  # CVE-2025-9905: safe_mode ignored for .h5
    info = ModelInfo(tmp_path / "any.h5", ["a", "b"], 75, "bilinear", 1000, {})
    with pytest.raises(ModelFileError, match=r"Keras 3\.11\.3 .*CVE-2025-9905.*keras>=3\.12"):
        load_model(info)


def test_the_project_requires_a_keras_that_honours_safe_mode():
    dependencies = (REPO / "pyproject.toml").read_text().split("dependencies = [", 1)[1].split("]", 1)[0]
    assert re.search(r'"keras>=3\.(1[2-9]|[2-9]\d)(\.\d+)?[",]', dependencies), dependencies


# ---- 8: a full disk, for real where the machine allows it

# One h5 checkpoint of the smoke model (InceptionV3 at 75 px, weights=null, 3 classes) is 84 MiB
# and the final model as much (measured 2026-12-01, Keras 3.15): 130 MiB holds the first
# checkpoint and the reports, and fills during the final save.
FINAL_SAVE_FILLS = "130m"
ONE_EPOCH = ["train.head.epochs=1", "train.finetune.epochs=0"]


@contextlib.contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[str | None]:
    """Mount a tmpfs of `size` on `folder` for the block; yields None, or why it could not be mounted."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        yield "not running as root"
        return
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mount.returncode != 0:
        yield f"mount failed: {mount.stderr.strip() or mount.returncode}"
        return
    try:
        yield None
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=False)


def fell_back(why: str, hook: str) -> None:
    """Say, in the test's output and pytest's summary, that a hook stands in for the real disk."""
    message = f"no real full disk here ({why}): fell back to PIPELINE_ENOSPC_AT={hook}"
    print(message, file=sys.stderr)
    warnings.warn(message, stacklevel=2)


def fill(folder: Path) -> None:
    """Write a filler file until the disk holding `folder` is full."""
    chunk = b"\0" * (1 << 16)
    with open(folder / "filler", "wb", buffering=0) as f:
        while True:
            try:
                f.write(chunk)
            except OSError as err:
                assert err.errno == errno.ENOSPC
                if len(chunk) == 1:
                    return
                chunk = chunk[: len(chunk) // 2]


def the_error_line(result) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return errors[0]


@pytest.mark.e2e
def test_a_full_disk_at_the_history_and_then_at_the_final_save_each_end_in_one_line_and_lose_nothing(
    tmp_path, tiny_data
):
    """One command three times on one disk (checkpoints, outputs and the final model alike):
    1. the disk full at history.csv's write at the end of epoch 1 (a hook, inside fit): the epoch's
       checkpoint still commits, the previous history file stays whole, exit 2 with one line;
    2. the disk full for real during the final save (a 130 MiB tmpfs, or a hook where mounting is
       refused): one line naming the model file, no temporary left, the checkpoint intact;
    3. with space again: it resumes from that checkpoint, writes the model and the lost history row.
    """
    disk = tmp_path / "disk"
    args = run_args(disk, tiny_data, *ONE_EPOCH)
    with tmpfs(disk, FINAL_SAVE_FILLS) as why_not:
        first = run_cli(*args, cwd=REPO, env=cli_env(PIPELINE_ENOSPC_AT="write_history#2"))
        line = the_error_line(first)
        assert "No space left on device" in line and str(disk / "outputs" / "history.csv") in line, line
        (committed,) = list_checkpoints(disk / "ckpt")  # the epoch's training was kept
        assert committed.stem.startswith("transfer_01-") and verify(committed) is None
        assert read_history(disk / "outputs" / "history.csv") == []  # the previous file, whole

        env = cli_env()
        if why_not:
            fell_back(why_not, "final_before_rename")
            env = cli_env(PIPELINE_ENOSPC_AT="final_before_rename")
        second = run_cli(*args, cwd=REPO, env=env)
        line = the_error_line(second)
        assert "No space left on device" in line and str(disk / "model" / "final.h5") in line, line
        assert [c.stem for c in list_checkpoints(disk / "ckpt")] == [committed.stem] and verify(committed) is None
        assert not list((disk / "model").glob(".*tmp*")), "the failed save left its temporary file"
        if not why_not:
            subprocess.run(["mount", "-o", "remount,size=400m", str(disk)], check=True)  # space again
        third = run_cli(*args, cwd=REPO)
        assert third.returncode == 0, third.stdout + third.stderr
        assert f"resume: from checkpoint {committed.stem}" in third.stdout
        assert read_metadata(disk / "model" / "final.h5")["final_checkpoint"] == committed.identity
        rows = read_history(disk / "outputs" / "history.csv")
        assert [r["epoch"] for r in rows] == [1]  # the row the full disk lost, from the checkpoint
        assert rows[0]["val_accuracy"] == committed.manifest["logs"]["val_accuracy"]


def test_history_on_a_real_full_disk_is_one_error_naming_it_and_keeps_the_file(tmp_path, monkeypatch):
    disk = tmp_path / "disk"
    logs = {"loss": 1.0, "accuracy": 0.5, "val_loss": 1.1, "val_accuracy": 0.5}
    with tmpfs(disk, "1m") as why_not:
        state = TrainState(phase="head")
        (recorder,) = start_history(disk, lambda: state, None)
        recorder.on_epoch_end(0, logs)
        state.epoch = state.phase_epoch = 1
        if why_not:
            fell_back(why_not, "write_history")
            monkeypatch.setenv("PIPELINE_ENOSPC_AT", f"write_history#{store_hooks._reached['write_history'] + 1}")
        else:
            fill(disk)
        recorder.on_epoch_end(1, logs)  # inside fit: recorded for fit_epoch, not raised
        assert isinstance(recorder.failed, DiskFull)
        assert f"No space left on device writing {disk / 'history.csv'}" in str(recorder.failed)
        assert [r["epoch"] for r in read_history(disk / "history.csv")] == [1]
        assert not list(disk.glob(".history.tmp*"))


def test_tensorboard_and_tf_checkpoint_on_a_real_full_disk_say_so(tmp_path):
    import keras
    import tensorflow as tf

    disk = tmp_path / "disk"
    with tmpfs(disk, "1m") as why_not:
        if why_not:  # neither writer has a hook: TensorFlow raises its own error for a full disk
            pytest.skip(f"needs a real full disk, and {why_not}; the history test above covers the hook")
        writer = tf.summary.create_file_writer(str(disk / "tensorboard"))
        inputs = keras.Input((64,))
        model = keras.Model(inputs, keras.layers.Dense(4096)(inputs))  # 1 MiB of weights: more than is left
        model.compile("adam", "mse")
        model.optimizer.build(model.trainable_variables)
        fill(disk)
        row = {"loss": 1.0, "accuracy": 0.5, "lr": 0.1, "seconds": 1.0, "val_loss": 1.0, "val_accuracy": 0.5}
        row |= {"val_macro_f1": 0.5, "val_balanced_accuracy": 0.5}
        # TensorFlow's writer may drop a failed flush and raise at a later write; it does raise.
        with pytest.raises(DiskFull, match="No space left on device writing .*tensorboard"):
            with space_for(disk / "tensorboard"):
                for epoch in range(1, 100):
                    write_scalars({"train": writer, "validation": writer}, {**row, "epoch": epoch})
        cfg = from_conf("checkpoint", dir=str(disk / "ckpt"), format="tf_checkpoint")
        with pytest.raises(CheckpointError, match="No space left on device: could not write checkpoint"):
            save_checkpoint(model, cfg, "transfer_01", TrainState(), {}, {}, keras.models.clone_model(model))
