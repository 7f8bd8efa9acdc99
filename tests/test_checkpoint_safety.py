"""Checkpoints under faults around the commit itself: SIGTERM at an epoch's last batch or
during the last background write, a fallback past damaged checkpoints, unreadable
manifests, a kill during pruning, and the folders that must be fsynced."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO, cli_env, run_args, run_cli, sigterm_when
from test_checkpoint import FINGERPRINT, fresh_model, save

from pipeline.checkpoints import store
from pipeline.checkpoints.resume import plan_resume, restore_newest_usable
from pipeline.checkpoints.store import (
    MANIFEST,
    archive_all,
    clean_leftovers,
    list_checkpoints,
    prune,
    verify,
)
from pipeline.errors import CheckpointError, Preempted
from pipeline.training.batch_saver import BatchSaver, StopFlag


@pytest.fixture(scope="module")
def source():
    from test_checkpoint import trained_model

    return trained_model()


# ---- 1. SIGTERM at an epoch's last batch ----------------------------------


def saver_after_sigterm(start_batch: int, saved: list) -> BatchSaver:
    flag = StopFlag()
    flag.raised = True
    return BatchSaver(lambda done, logs: saved.append(done) or f"b{done}", 0, start_batch, 3, flag)


def test_sigterm_before_the_last_batch_saves_there_and_stops():
    saved = []
    with pytest.raises(Preempted, match="2 batches into the epoch"):
        saver_after_sigterm(0, saved).on_train_batch_end(1)
    assert saved == [2]


def test_sigterm_at_the_last_batch_leaves_the_checkpoint_to_the_epoch_end():
    # A checkpoint at batch 3 of 3 would resume into an epoch with no batches left.
    saved = []
    saver_after_sigterm(1, saved).on_train_batch_end(1)  # batch 3 of 3: no save, no stop here
    assert saved == []


@pytest.mark.e2e
def test_sigterm_in_an_epochs_only_batch_and_then_during_the_last_write_each_commit_and_resume(tmp_path, tiny_data):
    """Two SIGTERMs to the same command, then the run it finishes.

    1. Batches of 16 from 12 training images: one batch per epoch, so a SIGTERM during training
       always lands in the epoch's last batch; the run stops after the epoch, with the epoch-end
       checkpoint (a batch-end one at batch 1 of 1 would resume into an epoch with no batches left).
    2. (7) The writer pauses just before committing the last epoch's checkpoint; by then training is
       over and the main thread is waiting for it, the moment the handler used to be gone already.
    """
    args = run_args(
        tmp_path,
        tiny_data,
        "data.batch_size=16",
        "train.head.epochs=2",
        "train.finetune.epochs=0",
        "checkpoint.asynchronous=true",
    )
    code, text = sigterm_when(args, "head epoch 1/2")
    assert code == 128 + signal.SIGTERM, text
    assert "stopped on SIGTERM after epoch 1;" in text
    (manifest,) = [json.loads(p.read_text()) for p in (tmp_path / "ckpt").glob("*" + MANIFEST)]
    assert (manifest["state"]["epoch"], manifest["state"]["batch"]) == (1, 0)
    assert not math.isnan(manifest["logs"]["val_accuracy"])  # the epoch-end checkpoint, validated

    code, text = sigterm_when(args, "paused at before_manifest", cli_env(PIPELINE_PAUSE_AT="before_manifest"))
    assert code == 128 + signal.SIGTERM, text
    assert f"resume: from checkpoint {manifest['stem']}" in text
    assert "stopped on SIGTERM after the last checkpoint committed" in text
    last = list_checkpoints(tmp_path / "ckpt")[-1]
    assert last.stem.startswith("transfer_02-") and verify(last) is None
    assert f"checkpoint: {tmp_path / 'ckpt' / last.stem} (h5)" in text
    assert not (tmp_path / "model" / "final.h5").exists()

    third = run_cli(*args, cwd=REPO)
    assert third.returncode == 0, third.stdout + third.stderr
    assert f"resume: from checkpoint {last.stem}" in third.stdout
    assert (tmp_path / "model" / "final.h5").exists()


# ---- 3. pruning and fallback ----------------------------------------------


def stems(directory):
    return [c.stem for c in list_checkpoints(directory)]


def test_prune_goes_by_commit_order_and_keeps_the_current_and_the_best(tmp_path, source):
    # Committed in this order: epoch 5 (say, before a fallback), then 2, then 3.
    for epoch in (5, 2, 3):
        save(source, tmp_path, "weights_h5", epoch=epoch)
    assert stems(tmp_path) == ["transfer_05-0.30", "transfer_02-0.27", "transfer_03-0.28"]
    prune(tmp_path, keep_last=1, best_stem=None)
    assert stems(tmp_path) == ["transfer_03-0.28"]
    for epoch in (4, 6):
        save(source, tmp_path, "weights_h5", epoch=epoch)
    prune(tmp_path, keep_last=1, best_stem="transfer_03-0.28", current="transfer_04-0.29")
    assert stems(tmp_path) == ["transfer_03-0.28", "transfer_04-0.29", "transfer_06-0.31"]


def damage(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_checkpoints_skipped_on_a_fallback_move_to_archive(tmp_path, source, capsys):
    older = save(source, tmp_path, "weights_h5", epoch=1)
    newer = save(source, tmp_path, "weights_h5", epoch=2)
    files = sorted([newer.path.name, *newer.manifest["files"]])
    damage(tmp_path / (newer.stem + ".weights.h5"))
    restored = restore_newest_usable(plan_resume(tmp_path, FINGERPRINT, None), lambda state: fresh_model())
    assert restored.stem == older.stem
    assert stems(tmp_path) == [older.stem]
    (archived,) = (tmp_path / "archive").iterdir()
    assert sorted(p.name for p in archived.iterdir()) == files  # moved whole, nothing deleted
    out = capsys.readouterr().out
    assert f"skipping checkpoint {newer.stem}" in out and f"moved to {archived}" in out


def test_a_read_only_worker_moves_nothing(tmp_path, source):
    older = save(source, tmp_path, "weights_h5", epoch=1)
    newer = save(source, tmp_path, "weights_h5", epoch=2)
    damage(tmp_path / (newer.stem + ".weights.h5"))
    plan = plan_resume(tmp_path, FINGERPRINT, None, read_only=True)
    assert restore_newest_usable(plan, lambda state: fresh_model()).stem == older.stem
    assert stems(tmp_path) == [older.stem, newer.stem] and not (tmp_path / "archive").exists()


def test_when_nothing_is_usable_nothing_is_moved(tmp_path, source):
    ckpt = save(source, tmp_path, "weights_h5", epoch=1)
    damage(tmp_path / (ckpt.stem + ".weights.h5"))
    with pytest.raises(CheckpointError, match=f"none of the 1 checkpoints.*\n  {ckpt.stem}: .*checksum"):
        restore_newest_usable(plan_resume(tmp_path, FINGERPRINT, None), lambda state: fresh_model())
    assert stems(tmp_path) == [ckpt.stem] and not (tmp_path / "archive").exists()


# ---- 6. an unreadable manifest ---------------------------------------------


@pytest.mark.parametrize("resume", [None, True])
def test_an_unreadable_manifest_alone_is_refused_never_a_fresh_start(tmp_path, resume):
    broken = tmp_path / ("transfer_01-0.26" + MANIFEST)
    broken.write_text('{"stem": "transfer_01-0.26", "files": {')  # cut short
    with pytest.raises(CheckpointError, match=f"none of the 1 checkpoints.*\n  {broken}: unreadable manifest"):
        restore_newest_usable(plan_resume(tmp_path, FINGERPRINT, resume), lambda state: fresh_model())
    assert broken.exists()


def test_an_unreadable_manifest_is_a_failed_candidate_on_a_fallback(tmp_path, source):
    older = save(source, tmp_path, "weights_h5", epoch=1)
    broken = tmp_path / ("transfer_02-0.27" + MANIFEST)
    broken.write_text("not json")
    restored = restore_newest_usable(plan_resume(tmp_path, FINGERPRINT, None), lambda state: fresh_model())
    assert restored.stem == older.stem
    assert [p.name for p in (tmp_path / "archive").glob("*/*")] == [broken.name]


# ---- 12. a kill during pruning; fsync of the folders changed ---------------


KILLED_WHILE_PRUNING = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import keras
    from pipeline.checkpoints.store import prune, save_checkpoint
    from pipeline.config import CheckpointConfig
    from pipeline.state import TrainState

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    cfg = CheckpointConfig(dir=sys.argv[1], filename="epoch{epoch}", format="weights_h5", monitor="val_accuracy",
                           mode="max", save_best_only=False, every=1, every_batches=0, keep_last=1, asynchronous=False)
    for epoch in (1, 2):
        save_checkpoint(model, cfg, f"epoch{epoch}", TrainState(phase_epoch=epoch, epoch=epoch), {}, {})
    unlink, calls = Path.unlink, []

    def unlink_then_die(self, *args, **kwargs):
        calls.append(self)
        if len(calls) == 2:  # a power cut or kill -9 in the middle of deleting epoch1
            os.kill(os.getpid(), signal.SIGKILL)
        return unlink(self, *args, **kwargs)

    Path.unlink = unlink_then_die
    prune(Path(sys.argv[1]), keep_last=1, best_stem=None)
    print("not killed", flush=True)
""")


def test_a_kill_during_pruning_leaves_nothing_behind_after_the_next_start(tmp_path):
    ckpt = tmp_path / "ckpt"
    run = subprocess.run(
        [sys.executable, "-c", KILLED_WHILE_PRUNING, str(ckpt)],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == -signal.SIGKILL, run.stdout + run.stderr
    assert stems(ckpt) == ["epoch2"]
    clean_leftovers(ckpt)  # what the next start does
    assert sorted(p.name for p in ckpt.iterdir()) == ["epoch2.manifest.json", "epoch2.state.npz", "epoch2.weights.h5"]
    assert verify(list_checkpoints(ckpt)[0]) is None


def test_archive_and_prune_fsync_the_folders_they_change(tmp_path, source, monkeypatch):
    for epoch in (1, 2):
        save(source, tmp_path, "weights_h5", epoch=epoch)
    synced = []
    monkeypatch.setattr(store, "fsync_dir", lambda path: synced.append(path))
    prune(tmp_path, keep_last=1, best_stem=None)
    assert synced and set(synced) == {tmp_path}
    synced.clear()
    target = archive_all(tmp_path)
    assert {tmp_path, tmp_path / "archive", target} <= set(synced)
