"""One run at a time per checkpoint folder: a second is refused at once; a dead holder blocks nothing."""

from __future__ import annotations

import copy
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, cli_env, composed_defaults, run_args, run_cli, sweep_args

from pipeline.checkpoints.lock import LOCK_FILE, hold_lock, lock_for_run
from pipeline.config import run_name
from pipeline.errors import CheckpointInUse

# Holds the lock of argv[1] until killed; with argv[2], first asks a child to take it as its parent's.
HOLDER = """
import subprocess, sys, time
from pathlib import Path
from pipeline.checkpoints.lock import hold_lock
with hold_lock(Path(sys.argv[1])):
    print("held", flush=True)
    if len(sys.argv) > 2:
        child = "from pipeline.checkpoints.lock import hold_lock; import sys; from pathlib import Path\\n"
        child += "with hold_lock(Path(sys.argv[1]), parent_may_hold=sys.argv[2] == 'yes'): print('child ran')"
        for allowed in ("yes", "no"):
            done = subprocess.run([sys.executable, "-c", child, sys.argv[1], allowed], capture_output=True, text=True)
            print(repr((done.stdout + done.stderr).strip().splitlines()[-1]), flush=True)
    time.sleep(600)
"""


def start_holder(folder: Path, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder), *extra], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def kill_9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_a_second_holder_is_refused_naming_the_folder_and_pid_until_the_first_is_killed(tmp_path):
    folder = tmp_path / "ckpt"
    holder = start_holder(folder)
    try:
        with pytest.raises(CheckpointInUse) as refused, hold_lock(folder):
            pass
        message = str(refused.value)
        assert str(folder) in message and f"process {holder.pid}" in message and "\n" not in message
    finally:
        kill_9(holder)
    assert (folder / LOCK_FILE).read_text() == f"{holder.pid}\n"  # left behind by the dead holder...
    with hold_lock(folder):  # ...and blocks nothing: the kernel released its flock
        assert (folder / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    assert not (folder / LOCK_FILE).exists()


def test_a_run_that_wrote_nothing_leaves_no_folder_and_one_that_did_keeps_it(tmp_path):
    with hold_lock(tmp_path / "ckpt" / "job"):
        assert (tmp_path / "ckpt" / "job" / LOCK_FILE).is_file()
    assert list(tmp_path.iterdir()) == []
    with hold_lock(tmp_path / "ckpt" / "job"):
        (tmp_path / "ckpt" / "job" / "transfer_01.manifest.json").write_text("{}")
    assert [p.name for p in (tmp_path / "ckpt" / "job").iterdir()] == ["transfer_01.manifest.json"]


def test_the_local_workers_chief_runs_under_its_launchers_lock_and_no_one_else_does(tmp_path):
    holder = start_holder(tmp_path / "ckpt", "with children")
    try:
        assert holder.stdout.readline().strip() == repr("child ran")
        refused = holder.stdout.readline()
        assert "CheckpointInUse" in refused and f"process {holder.pid}" in refused
    finally:
        kill_9(holder)


def test_in_a_multi_worker_run_only_the_chief_locks(tmp_path, monkeypatch):
    config = copy.deepcopy(composed_defaults())
    config.checkpoint.dir = str(tmp_path / "ckpt")
    config.distribute.strategy = "multi_worker"
    cluster = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 1}}))
    with lock_for_run(config):
        assert not (tmp_path / "ckpt").exists()
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 0}}))
    with lock_for_run(config):
        assert (tmp_path / "ckpt" / LOCK_FILE).read_text() == f"{os.getpid()}\n"


def test_resume_false_moves_everything_aside_but_the_lock(tmp_path):
    from pipeline.checkpoints.store import archive_all

    with hold_lock(tmp_path):
        (tmp_path / "transfer_01.keras").write_bytes(b"old")
        archived = archive_all(tmp_path)
        assert (archived / "transfer_01.keras").is_file() and not (archived / LOCK_FILE).exists()
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"


def wait_for_line(proc: subprocess.Popen, text: str, seen: list[str], timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return
    raise AssertionError(f"no {text!r} in the output:\n{''.join(seen)}")


@pytest.mark.e2e
def test_a_second_run_on_the_same_checkpoints_is_refused_and_a_killed_runs_lock_blocks_nothing(tmp_path, tiny_data):
    args = run_args(tmp_path, tiny_data)
    command = [sys.executable, "-m", "pipeline", *args]
    first = subprocess.Popen(
        command, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seen: list[str] = []
    wait_for_line(first, "head epoch 1/1", seen)  # it trains

    # Python's import profile shows what the refused run loaded: it stopped before TensorFlow, so it
    # refuses at once on any machine (no clock in the test: the profile is the proof).
    second = run_cli(*args, cwd=REPO, timeout=120, env=cli_env(PYTHONPROFILEIMPORTTIME="1"))
    lines = second.stderr.strip().splitlines()
    imported = [line.split("|")[-1].strip() for line in lines if line.startswith("import time:")]
    assert second.returncode == 2, second.stdout + second.stderr
    assert [line for line in lines if not line.startswith("import time:")] == [
        f"error: checkpoint folder {tmp_path / 'ckpt'} is in use by process {first.pid} (another run with the "
        "same checkpoint.dir); wait for it to end or stop it, or set checkpoint.dir to another folder"
    ]
    assert "hydra" in imported and "pipeline.checkpoints.lock" in imported  # the profile is there
    assert not [name for name in imported if name.split(".")[0] in ("tensorflow", "keras")], "imported TensorFlow"

    rest, _ = first.communicate(timeout=600)
    assert first.returncode == 0, "".join(seen) + rest
    history = (tmp_path / "outputs" / "history.csv").read_text().splitlines()
    assert len(history) == 3, history  # header + both epochs: nothing truncated by the second run
    assert len(list((tmp_path / "ckpt").glob("*.manifest.json"))) == 2
    assert not (tmp_path / "ckpt" / LOCK_FILE).exists()

    # A real run killed with SIGKILL while it holds the lock: the next run is not blocked.
    third = subprocess.Popen(command, cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = tmp_path / "ckpt" / LOCK_FILE
    deadline = time.time() + 120
    while not (lock.is_file() and lock.read_text() == f"{third.pid}\n") and time.time() < deadline:
        time.sleep(0.05)
    kill_9(third)
    assert lock.read_text() == f"{third.pid}\n"
    fourth = run_cli(*args, cwd=REPO)
    assert fourth.returncode == 0, fourth.stdout + fourth.stderr
    assert "This run is already complete" in fourth.stdout
    assert not lock.exists()


@pytest.mark.e2e
def test_a_sweep_job_locks_its_own_folder_and_is_recorded_when_it_is_held(tmp_path, tiny_data):
    """An orphaned job of an earlier sweep still holds ckpt/<job>/: this sweep's job is refused
    before it starts TensorFlow, recorded as failed, and the sweep exits 2."""
    job = run_name(",".join(sorted([f"data.dir={tiny_data}", "experiment=smoke", "model.dropout=0.3"])))
    holder = start_holder(tmp_path / "ckpt" / job)
    try:
        result = run_cli("-m", *sweep_args(tmp_path, tiny_data, "model.dropout=0.3"), cwd=REPO, timeout=300)
    finally:
        kill_9(holder)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"in use by process {holder.pid}" in result.stderr and "1 of 1 jobs failed" in result.stderr
    assert "Traceback" not in result.stderr and "head epoch" not in result.stdout
    with open(tmp_path / "multirun" / "summary.csv") as f:
        (row,) = csv.DictReader(f)
    assert row["job"] == job and row["status"].startswith(f"error: checkpoint folder {tmp_path / 'ckpt' / job}")
