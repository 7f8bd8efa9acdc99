"""The resume contract, in real subprocesses: SIGKILL inside every save step and
mid-epoch, every checkpoint format, SIGTERM, damaged checkpoints, a full disk.

Each killed run is continued by the same command, and its final weights are
compared with an uninterrupted run of the same configuration. To keep the suite
quick these runs train the head phase only (2 epochs of 3 batches); the kill
test in test_e2e.py covers the fine-tune phase.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
from pathlib import Path

import keras
import pytest
from conftest import REPO, cli_env, final_weights, largest_difference, run_args, run_cli, sigterm_when

from pipeline.checkpoints.store import list_checkpoints, verify
from pipeline.reports.history import HISTORY, read_history

pytestmark = pytest.mark.e2e
HEAD_ONLY = ["train.head.epochs=2", "train.finetune.epochs=0"]


def args_for(tmp, data, *extra):
    return run_args(tmp, data, *HEAD_ONLY, *extra)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data):
    tmp = tmp_path_factory.mktemp("reference")
    result = run_cli(*args_for(tmp, tiny_data), cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp, final_weights(tmp)


def killed_then_resumed(tmp, data, kill_at, *extra):
    """Run with a SIGKILL at `kill_at`, check it died there, run the same command again."""
    first = run_cli(*args_for(tmp, data, *extra), cwd=REPO, env=cli_env(PIPELINE_KILL_AT=kill_at))
    assert first.returncode == -signal.SIGKILL, first.stdout + first.stderr
    second = run_cli(*args_for(tmp, data, *extra), cwd=REPO)
    assert second.returncode == 0, second.stdout + second.stderr
    return first, second


@pytest.mark.parametrize(
    "fmt, kills",
    [
        ("h5", ["after_write#2"]),  # files written, nothing renamed into place
        ("weights_h5", ["before_manifest#2"]),  # files in place, manifest not yet committed
        ("tf_checkpoint", ["after_manifest#2"]),  # committed, intent record not yet removed
        # the background writer killed before its commit; the same command then killed during the final save
        ("keras+async", ["before_manifest#2", "final_before_rename"]),
    ],
    ids=["h5", "weights_h5", "tf_checkpoint", "keras+async"],
)
def test_kill_inside_a_save_step_resumes_exactly_in_every_format(reference, tmp_path, tiny_data, fmt, kills):
    fmt, _, asynchronous = fmt.partition("+")
    extra = (f"checkpoint.format={fmt}", f"checkpoint.asynchronous={'true' if asynchronous else 'false'}")
    # Killed during the final save with a model from before in place (the reference's epoch 1 stands
    # in for it): the old file stays whole until the new one replaces it.
    previous = tmp_path / "model" / "final.h5"
    if "final_before_rename" in kills:
        previous.parent.mkdir()
        shutil.copy(next((reference[0] / "ckpt").glob("transfer_01-*.h5")), previous)
    old_bytes = previous.read_bytes() if previous.exists() else None
    for kill_at in kills:
        first = run_cli(*args_for(tmp_path, tiny_data, *extra), cwd=REPO, env=cli_env(PIPELINE_KILL_AT=kill_at))
        assert first.returncode == -signal.SIGKILL, (kill_at, first.stdout + first.stderr)
        if old_bytes is not None:
            assert previous.read_bytes() == old_bytes, kill_at
    second = run_cli(*args_for(tmp_path, tiny_data, *extra), cwd=REPO)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resume: from checkpoint transfer_0" in second.stdout
    assert largest_difference(reference[1], final_weights(tmp_path)) <= 1e-5
    if old_bytes is not None:  # replaced: the old model's weights are not the reference's final ones
        assert largest_difference(reference[1], [w.numpy() for w in load_file(old_bytes, tmp_path).weights]) > 1e-4
    leftovers = [
        p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".") or p.name.endswith(".pending.json")
    ]
    assert leftovers == []
    assert not list((tmp_path / "model").glob(".*tmp*"))


def load_file(data: bytes, tmp_path: Path) -> keras.Model:
    """A model from the bytes of a full-model .h5 file."""
    path = tmp_path / "old_model.h5"
    path.write_bytes(data)
    return keras.models.load_model(path, compile=False)


# The mid-epoch kill runs with class weights (sample weights from the feed) and label smoothing (in the
# loss), so one pair of runs shows both the batch position and these settings survive; the unweighted
# head phase is killed mid-epoch in test_kill_campaign.py.
WEIGHTED = ("train.class_weight={circle:4,square:0.5}", "train.label_smoothing=0.1")


@pytest.fixture(scope="module")
def weighted_reference(tmp_path_factory, tiny_data):
    tmp = tmp_path_factory.mktemp("weighted_reference")
    result = run_cli(*args_for(tmp, tiny_data, *WEIGHTED), cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp, final_weights(tmp)


def test_kill_mid_epoch_resumes_at_the_right_batch_with_class_weights_and_label_smoothing(
    reference, weighted_reference, tmp_path, tiny_data
):
    # checkpoints after batches 1 and 2 of epoch 1; killed right after the second commits
    extra = ("checkpoint.every_batches=1", *WEIGHTED)
    first, second = killed_then_resumed(tmp_path, tiny_data, "after_manifest#2", *extra)
    assert "2 batches into the next" in second.stdout
    assert "class weights by class: circle 4, square 0.5, triangle 1" in second.stdout
    assert largest_difference(weighted_reference[1], final_weights(tmp_path)) <= 1e-5
    # Control: the two settings change the training, so the match above is theirs.
    assert largest_difference(reference[1], weighted_reference[1]) > 1e-4
    # The epoch's val_macro_f1 is the final model's, scored over the whole validation set by the report.
    rows = read_history(tmp_path / "outputs" / HISTORY)
    assert [r["epoch"] for r in rows] == [1, 2] and not any(math.isnan(r["val_macro_f1"]) for r in rows)
    report = (tmp_path / "outputs" / "report.md").read_text()
    last = rows[-1]
    assert f"macro-F1 {last['val_macro_f1']:.4f}, balanced accuracy {last['val_balanced_accuracy']:.4f}" in report


def test_sigterm_saves_at_the_next_batch_and_resumes_exactly(reference, tmp_path, tiny_data):
    code, text = sigterm_when(args_for(tmp_path, tiny_data), "head epoch 1/2", timeout=60)
    assert code == 128 + signal.SIGTERM, text
    # Stopped at a batch boundary of the epoch it was in, with a checkpoint there, not at the end of training.
    stopped = r"stopped on SIGTERM after checkpoint transfer_01-\S+ \([123] batches into the epoch\)"
    assert re.search(stopped, text), text
    assert "head epoch 2/2" not in text
    second = run_cli(*args_for(tmp_path, tiny_data), cwd=REPO)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resume: from checkpoint" in second.stdout
    assert largest_difference(reference[1], final_weights(tmp_path)) <= 1e-5


def copy_of_reference_checkpoints(reference, tmp_path):
    shutil.copytree(reference[0] / "ckpt", tmp_path / "ckpt")
    return sorted((tmp_path / "ckpt").glob("*.h5"))  # the default format


def test_a_damaged_newest_checkpoint_is_named_archived_and_the_new_one_kept(reference, tmp_path, tiny_data):
    older, newest = copy_of_reference_checkpoints(reference, tmp_path)
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    # Keep 1; the run falls back to epoch 1 and checkpoints after each batch of epoch 2.
    # Killed inside the second of those writes: the first has committed and pruned by then.
    extra = ("checkpoint.save_best_only=true", "checkpoint.every_batches=1")
    first = run_cli(*args_for(tmp_path, tiny_data, *extra), cwd=REPO, env=cli_env(PIPELINE_KILL_AT="after_write#2"))
    assert first.returncode == -signal.SIGKILL, first.stdout + first.stderr
    # The damaged checkpoint is named, with why, and the one before it used.
    assert f"warning: skipping checkpoint {newest.stem}" in first.stdout and "checksum" in first.stdout
    assert f"resume: from checkpoint {older.stem}" in first.stdout
    announced = [Path(line.split()[1]).name for line in first.stdout.splitlines() if line.startswith("checkpoint: ")]
    committed = list_checkpoints(tmp_path / "ckpt")
    assert announced and announced[-1] in [c.stem for c in committed], first.stdout
    assert all(verify(c) is None for c in committed)
    assert len(list((tmp_path / "ckpt" / "archive").glob(f"*/{newest.name}"))) == 1
    second = run_cli(*args_for(tmp_path, tiny_data, *extra), cwd=REPO)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"resume: from checkpoint {announced[-1]}" in second.stdout
    assert largest_difference(reference[1], final_weights(tmp_path)) <= 1e-5


def test_no_usable_checkpoint_stops_instead_of_starting_from_scratch(reference, tmp_path, tiny_data):
    checkpoints = copy_of_reference_checkpoints(reference, tmp_path)
    checkpoints[0].write_bytes(checkpoints[0].read_bytes()[:1000])  # truncated
    checkpoints[1].unlink()
    result = run_cli(*args_for(tmp_path, tiny_data), cwd=REPO)
    assert result.returncode == 2
    assert "none of the 2 checkpoints" in result.stderr and "+resume=false" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "model").exists()


def test_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, tiny_data):
    result = run_cli(*args_for(tmp_path, tiny_data), cwd=REPO, env=cli_env(PIPELINE_ENOSPC_AT="after_write#2"))
    assert result.returncode == 2
    assert "No space left on device" in result.stderr and str(tmp_path / "ckpt") in result.stderr
    manifests = list((tmp_path / "ckpt").glob("*.manifest.json"))
    assert len(manifests) == 1 and manifests[0].name.startswith("transfer_01-")
    listed = json.loads(manifests[0].read_text())["files"]
    data_list = [p.name for p in (tmp_path / "ckpt").glob("data-*.json")]  # the data's file list (fingerprint.py)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted([manifests[0].name, *listed, *data_list])
