"""Faults and misuse around a run: a full disk, untrusted model files, class names
that break line-based files, and what dead processes leave in the temporary folder."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import REPO, from_conf, run_cli

from pipeline.data.dataset import DataError, read_dataset
from pipeline.distribute.strategy import scratch_folder
from pipeline.distribute.tf_config import WorkerRole


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
