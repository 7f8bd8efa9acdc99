"""The pieces of the run report without a training run: scores, history.csv across a resume, the figures."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_real_png, event_steps

from pipeline.reports.history import HISTORY, TENSORBOARD, read_history, start_history
from pipeline.reports.metrics import accuracy, class_scores, confusion_matrix, format_confusion, format_scores
from pipeline.reports.plots import draw_confusion, draw_curves
from pipeline.state import TrainState


def test_confusion_matrix_and_scores_match_a_count_by_hand():
    true = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 0, 0])
    matrix = confusion_matrix(true, predicted, 3)
    assert matrix.tolist() == [[2, 1, 0], [1, 1, 0], [1, 0, 0]]
    assert accuracy(matrix) == pytest.approx(3 / 6)
    scores = class_scores(matrix)
    # class 0: predicted 4 times, 2 right; 3 true images, 2 found
    assert scores.precision.tolist() == pytest.approx([2 / 4, 1 / 2, 0.0])
    assert scores.recall.tolist() == pytest.approx([2 / 3, 1 / 2, 0.0])
    assert scores.f1[0] == pytest.approx(2 * (0.5 * 2 / 3) / (0.5 + 2 / 3))
    assert scores.support.tolist() == [3, 2, 1]
    text = format_scores(matrix, ["a", "b", "c"])
    assert text.startswith("accuracy 0.5000 (3/6)") and "macro avg" in text
    assert format_confusion(matrix, ["a", "b", "c"]).splitlines()[1].split() == ["a", "2", "1", "0"]


def tiny_model():
    import keras

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="categorical_crossentropy", metrics=["accuracy"])
    return model


def fit_epoch(model, recorder_callbacks, state: TrainState):
    """As train.fit_epoch: one epoch per fit call, the state counted after fit returns."""
    x = np.random.default_rng(state.epoch).normal(size=(8, 2)).astype("float32")
    y = np.eye(2, dtype="float32")[np.arange(8) % 2]
    model.fit(x, y, validation_data=(x, y), epochs=1, batch_size=4, verbose=0, callbacks=recorder_callbacks)
    state.epoch, state.phase_epoch = state.epoch + 1, state.phase_epoch + 1


def test_history_drops_epochs_past_the_restored_checkpoint_and_marks_the_resume(tmp_path):
    model = tiny_model()
    state = TrainState(phase="head")
    callbacks = start_history(tmp_path, lambda: state, None)
    for _ in range(3):
        fit_epoch(model, callbacks, state)
    assert [r["epoch"] for r in read_history(tmp_path / HISTORY)] == [1, 2, 3]

    # killed after epoch 3 was logged, resumed from a checkpoint 1 batch into epoch 3
    state = TrainState(phase="head", epoch=2, phase_epoch=2, batch=1)
    callbacks = start_history(tmp_path, lambda: state, "transfer_03-0.50-b00001")
    assert [r["epoch"] for r in read_history(tmp_path / HISTORY)] == [1, 2]
    fit_epoch(model, callbacks, state)
    rows = read_history(tmp_path / HISTORY)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["resumed_from"] for r in rows] == ["", "", "transfer_03-0.50-b00001"]
    assert 2 < rows[2]["resumed_at"] < 3  # one batch into the third epoch
    assert all(r["lr"] == pytest.approx(0.01) and r["seconds"] >= 0 for r in rows)
    assert all(0 <= r["val_accuracy"] <= 1 for r in rows)
    # TensorBoard holds each epoch once too: the resumed run rebuilt its logs from the kept rows
    for split, tags in (
        ("train", ("epoch_loss", "epoch_accuracy", "epoch_learning_rate")),
        ("validation", ("epoch_loss", "epoch_accuracy")),
    ):
        steps = event_steps(tmp_path / TENSORBOARD / split)
        assert all(steps[tag] == [1, 2, 3] for tag in tags), steps


def test_a_fresh_start_empties_an_old_history(tmp_path):
    (tmp_path / HISTORY).write_text("epoch,phase,loss\n1,head,0.5\n2,head,0.4\n")
    assert [r["epoch"] for r in read_history(tmp_path / HISTORY)] == [1, 2]
    start_history(tmp_path, lambda: TrainState(), None)
    assert read_history(tmp_path / HISTORY) == []


def test_curves_and_confusion_matrix_are_real_pngs(tmp_path):
    nan = float("nan")
    rows = [
        {
            "epoch": e,
            "phase": p,
            "loss": 1.0 / e,
            "accuracy": 0.3 * e,
            "val_loss": 1.1 / e,
            "val_accuracy": 0.25 * e,
            "resumed_from": r,
            "resumed_at": a,
        }
        for e, p, r, a in ((1, "head", "", nan), (2, "finetune", "", nan), (3, "finetune", "x", 2.5))
    ]
    assert_real_png(draw_curves(rows, tmp_path / "curves.png"), (600, 300))
    assert_real_png(draw_curves([], tmp_path / "empty.png"), (600, 300))  # a run with nothing recorded
    matrix = np.array([[3, 1], [0, 4]])
    assert_real_png(draw_confusion(matrix, ["cat", "dog"], tmp_path / "cm.png"))
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def test_the_final_model_metadata_round_trips_through_the_one_reader(tmp_path):
    import json

    import h5py
    import keras

    from pipeline.model_file.load import (
        METADATA_ATTR,
        ModelFileError,
        metadata_path,
        read_metadata,
        read_metadata_or_none,
        read_model_info,
    )
    from pipeline.model_file.save import save_final

    inputs = keras.Input((4, 4, 3))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(inputs)))
    path = tmp_path / "final.h5"
    metadata = {"class_names": ["cat", "dog"], "image_size": 4, "final_checkpoint": "t_02@ab", "lineage": ["t_01@cd"]}
    save_final(model, path, metadata)
    assert json.loads(metadata_path(path).read_text()) == metadata  # the copy beside, for people
    metadata_path(path).unlink()  # read from inside the file, not from the copy beside it
    assert read_metadata(path) == read_metadata_or_none(path) == metadata
    info = read_model_info(path)
    assert (info.class_names, info.image_size, info.metadata) == (["cat", "dog"], 4, metadata)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.h5"]  # no temporaries left
    # without the attribute (and no copy beside) the file is not a final model: the commands
    # get an error naming it, training gets None
    with h5py.File(path, "a") as f:
        del f.attrs[METADATA_ATTR]
    with pytest.raises(ModelFileError, match="final.h5 has no class names"):
        read_metadata(path)
    assert read_metadata_or_none(path) is None
    assert read_metadata_or_none(tmp_path / "absent.h5") is None
