"""The real CLI in subprocesses: train, rerun, kill -9 and resume, refusals."""

from __future__ import annotations

import csv
import json
import re
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import (
    REPO,
    assert_labels_raw_pixels,
    cli_env,
    final_weights,
    largest_difference,
    run_args,
    run_cli,
    sweep_args,
)

pytestmark = pytest.mark.e2e
# The run the other tests read, and the kill test beside it, fine-tune the whole base with learning
# BatchNorm: the default with weights=null, which the smoke experiment narrows to the top blocks for speed.
WHOLE_BASE = "train.finetune.unfreeze_after=none"


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_data):
    """One uninterrupted smoke run, shared by the tests that only read what it left."""
    tmp = tmp_path_factory.mktemp("finished")
    result = run_cli(*run_args(tmp, tiny_data, WHOLE_BASE), cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp, result


def test_fresh_run_reports_plan_and_outcome(finished):
    tmp, result = finished
    out = result.stdout
    for name in ("circle", "square", "triangle"):
        assert re.search(rf"{name}\s+train\s+4\s+validation\s+2", out), out
    assert "resume: starting fresh" in out
    assert "phase head: 1 epochs" in out and "phase finetune: 1 epochs, adam lr 0.001, whole base trained" in out
    assert "done in" in out and "saved:" in out
    assert "Traceback" not in result.stderr
    manifests = sorted(p.name for p in (tmp / "ckpt").glob("*.manifest.json"))
    assert len(manifests) == 2 and manifests[0].startswith("transfer_01-")


def test_saved_model_loads_in_a_fresh_process_and_labels_raw_pixels(finished, tiny_data):
    tmp, _ = finished
    meta = json.loads((tmp / "model" / "final.json").read_text())
    assert meta["class_names"] == ["circle", "square", "triangle"]
    image = sorted((tiny_data / "validation" / "square").glob("*.jpg"))[0]
    assert_labels_raw_pixels(tmp / "model" / "final.h5", image)


def copy_of_finished(finished, tmp_path):
    """The finished run's folders in tmp_path, for a test that runs the CLI over them again."""
    shutil.copytree(finished[0], tmp_path, dirs_exist_ok=True)
    return tmp_path


def test_rerun_of_a_finished_run_does_nothing(finished, tmp_path, tiny_data):
    tmp = copy_of_finished(finished, tmp_path)
    model = tmp / "model" / "final.h5"
    before = (model.stat().st_mtime_ns, model.read_bytes())
    checkpoints = sorted(p.name for p in (tmp / "ckpt").iterdir())
    result = run_cli(*run_args(tmp, tiny_data, WHOLE_BASE), cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "already complete" in result.stdout
    assert "epoch 1/1" not in result.stdout and "checkpoint:" not in result.stdout  # nothing trained or saved
    assert (model.stat().st_mtime_ns, model.read_bytes()) == before
    assert sorted(p.name for p in (tmp / "ckpt").iterdir()) == checkpoints


def test_kill_9_after_a_checkpoint_then_same_command_resumes_exactly(finished, tmp_path, tiny_data):
    args = run_args(tmp_path, tiny_data, WHOLE_BASE)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for line in proc.stdout:
            if line.startswith("checkpoint:"):
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "model" / "final.h5").exists()

    result = run_cli(*args, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resume: from checkpoint transfer_01-" in result.stdout
    meta = json.loads((tmp_path / "model" / "final.json").read_text())
    assert meta["lineage"] and meta["lineage"][0].startswith("transfer_01-")
    # same seed, same configuration: the resumed run ends where the uninterrupted one did
    assert largest_difference(final_weights(finished[0]), final_weights(tmp_path)) <= 1e-5


def test_changed_configuration_is_refused_and_nothing_touched(finished, tmp_path, tiny_data):
    tmp = copy_of_finished(finished, tmp_path)
    before = sorted(p.name for p in (tmp / "ckpt").iterdir())
    result = run_cli(*run_args(tmp, tiny_data, WHOLE_BASE, "data.image_size=80"), cwd=REPO)
    assert result.returncode == 2
    assert "data.image_size 75 -> 80" in result.stderr
    assert "+resume=false" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in (tmp / "ckpt").iterdir()) == before


def test_resume_true_with_nothing_to_resume_is_an_error(tmp_path, tiny_data):
    result = run_cli(*run_args(tmp_path, tiny_data, "+resume=true"), cwd=REPO)
    assert result.returncode == 2
    assert "+resume=true" in result.stderr and "no committed checkpoint" in result.stderr
    assert not (tmp_path / "model").exists()


def test_resume_false_moves_old_checkpoints_aside_and_starts_afresh(tmp_path, tiny_data):
    old = tmp_path / "ckpt"
    old.mkdir()
    (old / "transfer_09-0.99.keras").write_bytes(b"an old run's file")
    result = run_cli(*run_args(tmp_path, tiny_data, "+resume=false", "train.finetune.epochs=0"), cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "starting fresh (+resume=false)" in result.stdout
    archived = list((old / "archive").glob("*/transfer_09-0.99.keras"))
    assert len(archived) == 1 and archived[0].read_bytes() == b"an old run's file"
    assert (tmp_path / "model" / "final.h5").exists()


def test_bad_value_fails_fast_naming_the_key_with_nothing_written(tmp_path, tiny_data):
    result = run_cli(*run_args(tmp_path, tiny_data, "data.batch_size=0"), cwd=REPO)
    assert result.returncode == 2
    assert "data.batch_size=0 must be >= 1" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert list(tmp_path.iterdir()) == [], "a rejected run wrote something"


def test_unavailable_imagenet_weights_fail_fast_with_both_remedies(tmp_path, tiny_data):
    env = cli_env(KERAS_HOME=str(tmp_path / "keras_home"), PIPELINE_IMAGENET_URL="http://127.0.0.1:9/notop.h5")
    result = run_cli(*run_args(tmp_path, tiny_data, "model.weights=imagenet"), cwd=REPO, env=env)
    assert result.returncode == 2
    assert "model.weights=imagenet" in result.stderr and "model.weights=null" in result.stderr
    assert "Traceback" not in result.stderr
    assert not any((tmp_path / "ckpt").glob("*")) and not (tmp_path / "model").exists()


def test_make_help_lists_every_target():
    out = subprocess.run(["make", "help"], cwd=REPO, capture_output=True, text=True).stdout
    for target in ("train", "test", "test-fast", "setup", "bench", "help"):
        assert f"make {target} " in out


def summary_rows(tmp_path) -> list[dict]:
    with open(tmp_path / "multirun" / "summary.csv") as f:
        return list(csv.DictReader(f))


def test_sweep_jobs_never_share_folders_stay_within_255_bytes_and_resume_when_epochs_are_raised(tmp_path, tiny_data):
    """Two jobs with a long data path and an Optuna-like float: each its own checkpoints and model, in
    folders within 255 bytes (Errno 36 before); raising the epochs resumes each job in its own folders
    (a fresh start before); the same sweep again finds them complete; and an earlier sweep's failed job
    left in multirun/ does not fail these sweeps (exit 2 before)."""
    data = tmp_path / ("photos-of-shapes-" + "resized-" * 16)
    shutil.copytree(tiny_data, data)
    earlier = tmp_path / "multirun" / "model.dropout=1.5"
    earlier.mkdir(parents=True)
    (earlier / "result.json").write_text(
        json.dumps({"overrides": ["model.dropout=1.5"], "status": "error: model.dropout=1.5 must be in [0, 1)"})
    )
    args = [*sweep_args(tmp_path, data, "train.finetune.epochs=0", "model.dropout=0.4753571532049581")]
    result = run_cli("-m", *args, "train.head.lr=0.001,0.002", cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert len(jobs) == 2 and all("train.head.lr=0.00" in j for j in jobs), jobs
    for job in jobs:
        assert len(job.encode()) <= 255 and "model.dropout=0.4754" in job and "epochs" not in job
        assert len(list((tmp_path / "ckpt" / job).glob("*.manifest.json"))) == 1
        assert (tmp_path / "model" / job / "final.h5").exists()
    rows = summary_rows(tmp_path)
    assert sorted(r["job"] for r in rows) == jobs  # this sweep's jobs only
    assert all(r["status"] == "trained" and 0 <= float(r["best"]) <= 1 and r["epochs"] == "1" for r in rows)
    # Each job trains in its own process, so the second does not inherit the first's memory.
    first, second = (float(r["peak_mb"]) for r in sorted(rows, key=lambda r: r["job"]))
    assert second <= 1.1 * first, (first, second)

    raised = [*args, "train.head.lr=0.001,0.002", "train.head.epochs=2"]
    again = run_cli("-m", *raised, cwd=REPO)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("resume: from checkpoint transfer_01") == 2, again.stdout
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == jobs
    assert all((tmp_path / "model" / job / "final.h5").is_file() for job in jobs)
    assert sorted((r["job"], r["status"], r["epochs"]) for r in summary_rows(tmp_path)) == [
        (job, "trained", "2") for job in jobs
    ]
    # the same sweep again: every job finds its own finished run
    complete = run_cli("-m", *raised, cwd=REPO)
    assert complete.returncode == 0 and complete.stdout.count("This run is already complete") == 2
    assert [r["status"] for r in summary_rows(tmp_path)] == ["already complete"] * 2


def test_parallel_jobs_run_side_by_side_in_their_own_folders_and_a_bad_one_does_not_stop_them(tmp_path, tiny_data):
    args = sweep_args(tmp_path, tiny_data, "train.finetune.epochs=0")
    result = run_cli("-m", "launcher=parallel", *args, "model.dropout=1.5,0.1,0.3", cwd=REPO)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Joblib" in result.stdout + result.stderr
    assert "1 of 3 jobs failed" in result.stderr and "Traceback" not in result.stderr
    statuses = sorted(r["status"] for r in summary_rows(tmp_path))
    assert statuses[0].startswith("error: model.dropout=1.5") and statuses[1:] == ["trained", "trained"]
    jobs = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert len(jobs) == 2 and all((tmp_path / "model" / job / "final.h5").exists() for job in jobs)
    assert len(list((tmp_path / "model").glob("*/final.h5"))) == 2
