"""Faults and misuse around a run: a full disk, untrusted model files, class names
that break line-based files, and what dead processes leave in the temporary folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import from_conf

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
