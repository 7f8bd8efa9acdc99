"""Early stopping and model.final=best in real runs: a run SIGKILLed during its epochs of patience and
resumed stops at the epoch an uninterrupted run stops at, with the same weights; the rerun says it
stopped early and exits 0, and would continue with raised patience; the final file scores what the
best epoch did. Three training runs and one rerun that trains nothing: each run costs about half a
minute, mostly start-up and tracing, so the continued run is shown on the committed state instead.

The head phase only, at a rate (0.1) at which this tiny set's validation accuracy stays where epoch 1
put it: with patience 2 the phase stops after epoch 3 of 5, and the best checkpoint is epoch 1's, two
epochs before the last, so "best" and "last" are different weights (checked, not assumed).
"""

from __future__ import annotations

import math
import signal
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import REPO, SMOKE, cli_env, final_weights, largest_difference, run_args, run_cli

from pipeline.checkpoints.store import SUFFIXES, list_checkpoints
from pipeline.defaults import compose_config
from pipeline.inference import label_files
from pipeline.model_file.load import read_metadata
from pipeline.reports.history import read_history
from pipeline.train import advance, plan_phases

pytestmark = pytest.mark.e2e
STOPPING = [
    "train.head.epochs=5",
    "train.finetune.epochs=0",
    "train.head.lr=0.1",
    "train.early_stopping.patience=2",
    "model.final=best",
    "checkpoint.keep_last=1",  # pruning must still keep the best checkpoint
]
STOP_LINE = "early stopping: the head phase stops after epoch 3"
# Commits with every_batches=1 and 3 batches an epoch: e1b1 e1b2 e1 e2b1 e2b2 e2 e3b1 e3b2 -> the 8th is
# two batches into epoch 3, the second epoch of patience.
KILL_AT = "after_manifest#8"
BATCHED = "checkpoint.every_batches=1"


def args(tmp: Path, data: Path, *extra) -> list[str]:
    return run_args(tmp, data, *STOPPING, *extra)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_data) -> Path:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    result = run_cli(*args(tmp, tiny_data), cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert STOP_LINE in result.stdout and "head epoch 4/5" not in result.stdout, result.stdout
    return tmp


@pytest.fixture(scope="module")
def killed(tmp_path_factory, tiny_data) -> tuple[Path, str]:
    """The same run with batch checkpoints, SIGKILLed in epoch 3 and resumed by the same command."""
    tmp = tmp_path_factory.mktemp("killed")
    first = run_cli(*args(tmp, tiny_data, BATCHED), cwd=REPO, env=cli_env(PIPELINE_KILL_AT=KILL_AT))
    assert first.returncode == -signal.SIGKILL, first.stdout + first.stderr
    # Killed inside epoch 3 (its end may have been printed: the background writer was two batches behind).
    assert list_checkpoints(tmp / "ckpt")[-1].state.since_best == 1
    second = run_cli(*args(tmp, tiny_data, BATCHED), cwd=REPO)
    assert second.returncode == 0, second.stdout + second.stderr
    return tmp, second.stdout


def newest_checkpoint_weights(tmp: Path) -> list[np.ndarray]:
    """The weights of the epoch the run stopped after: its newest checkpoint (checkpoint.format=h5)."""
    newest = list_checkpoints(tmp / "ckpt")[-1]
    model = keras.models.load_model(tmp / "ckpt" / (newest.stem + SUFFIXES["h5"]), compile=False)
    return [w.numpy() for w in model.weights]


def test_a_run_killed_in_its_patience_stops_at_the_same_epoch_with_the_same_weights(uninterrupted, killed):
    tmp, resumed = killed
    assert "resume: from checkpoint transfer_03-nan-b00002 (head phase, 2 epochs done, 2 batches" in resumed
    assert STOP_LINE in resumed and "head epoch 4/5" not in resumed
    assert [r["epoch"] for r in read_history(tmp / "outputs" / "history.csv")] == [1, 2, 3]
    stopped_epoch = newest_checkpoint_weights(tmp)
    assert largest_difference(newest_checkpoint_weights(uninterrupted), stopped_epoch) <= 1e-5
    assert largest_difference(final_weights(uninterrupted), final_weights(tmp)) <= 1e-5
    # Control: the comparison tells epochs apart (the final file holds epoch 1's weights, the newest checkpoint 3's).
    assert largest_difference(final_weights(tmp), stopped_epoch) > 1e-3


def test_the_rerun_says_it_stopped_early_and_exits_0(killed, tiny_data):
    tmp, _ = killed
    model_file = tmp / "model" / "final.h5"
    saved = model_file.read_bytes()
    again = run_cli(*args(tmp, tiny_data, BATCHED), cwd=REPO)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already complete (the head phase stopped early at epoch 3 (patience 2))" in again.stdout
    assert "head epoch" not in again.stdout and model_file.read_bytes() == saved
    assert read_metadata(model_file)["early_stopping"] == {"head": {"epoch": 3, "patience": 2, "epochs": 5}}


def test_raised_patience_continues_from_the_stopped_runs_own_checkpoint(killed, tiny_data):
    """What a rerun decides from the state the killed-and-resumed run committed, without a fourth run
    (its cost): with patience 2 it is finished; with 3 the head phase's epoch 4 comes next."""
    tmp, _ = killed
    newest = list_checkpoints(tmp / "ckpt")[-1]
    cfg = compose_config([*SMOKE, f"data.dir={tiny_data}", *STOPPING, BATCHED])
    assert advance(newest.state, plan_phases(cfg)) is None
    cfg.train.early_stopping.patience = 3
    state = newest.state
    assert advance(state, plan_phases(cfg)).name == "head"
    assert (state.epoch, state.phase_epoch, state.since_best, state.stopped) == (3, 3, 2, {})


def validation_scores(model_file: Path, data: Path) -> tuple[float, float]:
    """Cross-entropy and accuracy of a saved final model over data/validation/, by the inference code."""
    meta = read_metadata(model_file)
    model = keras.models.load_model(model_file, compile=False)
    files = sorted(data.glob("validation/*/*.jpg"))
    labels = [meta["class_names"].index(path.parent.name) for path in files]
    # The run's own data settings (smoke size, the default filter and pixel limit).
    d = meta["config"]["data"]
    results = label_files(model, files, d["image_size"], d["interpolation"], d["max_pixels"])
    probabilities = np.stack([r.probabilities for r in results])
    true = probabilities[np.arange(len(labels)), labels]
    return float(-np.log(true).mean()), float((probabilities.argmax(axis=1) == labels).mean())


def test_final_best_scores_what_the_best_epoch_scored_in_history(uninterrupted, tiny_data):
    model_file = uninterrupted / "model" / "final.h5"
    meta = read_metadata(model_file)
    rows = read_history(uninterrupted / "outputs" / "history.csv")
    best_row = max(rows, key=lambda r: r["val_accuracy"])  # the first of equal maxima, as the checkpoints keep
    assert meta["weights"]["final"] == "best" and meta["weights"]["epoch"] == best_row["epoch"] == 1
    assert meta["weights"]["checkpoint"] == meta["best"]["checkpoint"]
    kept = [c.stem for c in list_checkpoints(uninterrupted / "ckpt")]
    assert kept == [meta["best"]["checkpoint"], "transfer_03-0.33"]  # keep_last=1 spared the best
    val_loss, val_accuracy = validation_scores(model_file, tiny_data)
    assert val_accuracy == pytest.approx(best_row["val_accuracy"], abs=1e-6)
    assert math.isclose(val_loss, best_row["val_loss"], abs_tol=1e-5)
    # Control: the last epoch's loss is far outside that tolerance, so the match is epoch 1's.
    assert abs(val_loss - rows[-1]["val_loss"]) > 1e-3
