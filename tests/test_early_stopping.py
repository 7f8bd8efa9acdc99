"""Early stopping and model.final, as functions: the patience rule, its state in a checkpoint, which phase runs next,
and the best checkpoint's weights loaded back in every format. The real runs, killed and resumed, are in
test_early_stopping_e2e.py."""

from __future__ import annotations

import math
from dataclasses import replace

import keras
import numpy as np
import pytest
from conftest import from_conf
from keras import layers

from pipeline.checkpoints.resume import ResumePlan
from pipeline.checkpoints.store import list_checkpoints, load_weights, prune, save_checkpoint
from pipeline.config import Config
from pipeline.state import TrainState
from pipeline.train import Phase, advance, finished_run, monitor_improved
from pipeline.training.early_stopping import StopRule, announce_stop, count_epoch, improves, resolve_mode

MAX2 = StopRule("val_accuracy", "max", patience=2, min_delta=0.0)


def epochs_until_stop(values, rule=MAX2, phase_epochs=10) -> int | None:
    """Feed one phase's per-epoch monitor values to the rule; the epoch it stops after, or None."""
    state = TrainState()
    for value in values:
        state.epoch, state.phase_epoch = state.epoch + 1, state.phase_epoch + 1
        if count_epoch(state, value, rule, phase_epochs):
            return state.epoch
    return None


# ---- the rule ---------------------------------------------------------------


def test_improvement_goes_by_mode_and_must_exceed_min_delta():
    assert improves(0.6, 0.5, "max") and not improves(0.5, 0.5, "max") and not improves(0.4, 0.5, "max")
    assert improves(0.4, 0.5, "min") and not improves(0.6, 0.5, "min")
    assert not improves(0.55, 0.5, "max", min_delta=0.1) and improves(0.65, 0.5, "max", min_delta=0.1)
    assert not improves(0.45, 0.5, "min", min_delta=0.1) and improves(0.35, 0.5, "min", min_delta=0.1)
    assert improves(0.1, None, "max") and not improves(math.nan, 0.1, "max") and not improves(None, 0.1, "min")


def test_auto_mode_maximises_accuracies_and_scores_and_minimises_losses():
    assert [resolve_mode(m, "auto") for m in ("val_accuracy", "val_balanced_accuracy", "val_macro_f1")] == ["max"] * 3
    assert resolve_mode("val_loss", "auto") == "min" and resolve_mode("val_loss", "max") == "max"


def test_checkpoints_best_follows_checkpoint_mode():
    cfg = Config(checkpoint=from_conf("checkpoint", monitor="val_loss", mode="auto"))
    assert monitor_improved(cfg, 0.9, 1.0) and not monitor_improved(cfg, 1.1, 1.0)


@pytest.mark.parametrize(
    "values, rule, stops_after",
    [
        ([0.5, 0.6, 0.6, 0.6, 0.7], MAX2, 4),  # two epochs without a gain after the best (epoch 2)
        ([0.5, 0.6, 0.6, 0.7, 0.7, 0.7], MAX2, 6),  # a gain restarts the count
        ([0.5, 0.6, 0.6, 0.7, 0.7, 0.7], StopRule("a", "max", 3, 0.0), None),  # not within 6 epochs
        ([0.5, 0.55, 0.58, 0.7], StopRule("a", "max", 2, 0.1), 3),  # gains under min_delta do not count
        ([0.5, 0.55, 0.58, 0.7], StopRule("a", "max", 2, 0.01), None),  # ... above it they do
        ([1.0, 0.9, 0.95, 0.91, 0.8], StopRule("val_loss", "min", 2, 0.0), 4),  # losses must fall
        ([0.5, 0.5, 0.5, 0.5], StopRule("a", "max", 0, 0.0), None),  # patience 0: off
    ],
)
def test_a_phase_stops_after_patience_epochs_without_improvement(values, rule, stops_after):
    assert epochs_until_stop(values, rule) == stops_after


def test_a_monitor_with_no_value_counts_as_no_improvement_and_the_stop_says_so():
    state = TrainState(epoch=2, phase_epoch=2, since_best=1)
    assert count_epoch(state, None, MAX2, phase_epochs=5)
    assert announce_stop(state, MAX2) == (
        "early stopping: the head phase stops after epoch 2: val_accuracy has not improved by more than 0 "
        "for 2 epochs (the phase's best none)"
    )


def test_patience_running_out_at_the_phases_last_epoch_is_no_early_stop():
    assert epochs_until_stop([0.5, 0.5, 0.5], MAX2, phase_epochs=3) is None
    assert epochs_until_stop([0.5, 0.5, 0.5], MAX2, phase_epochs=4) == 3


def test_the_stop_is_recorded_in_the_manifest_and_read_back(tmp_path):
    state = TrainState()
    for epoch, value in enumerate([0.5, 0.4, 0.4], start=1):
        state.epoch = state.phase_epoch = epoch
        stopped = count_epoch(state, value, MAX2, phase_epochs=5)
    assert stopped and state.stopped == {"head": {"epoch": 3, "patience": 2, "epochs": 5}}
    model = tiny_model()
    cfg = from_conf("checkpoint", dir=str(tmp_path), format="h5")
    save_checkpoint(model, cfg, "transfer_03", state, {"val_accuracy": 0.4}, {})
    assert list_checkpoints(tmp_path)[0].state == state  # phase best, count and stop included


# ---- which phase runs next ------------------------------------------------


def phases(patience=2, head_epochs=5, finetune_epochs=3) -> list[Phase]:
    rule = StopRule("val_accuracy", "max", patience, 0.0)
    train = from_conf("train")
    return [
        Phase("head", replace(train.head, epochs=head_epochs), rule),
        Phase("finetune", replace(train.finetune, epochs=finetune_epochs), rule),
    ]


def stopped_head() -> TrainState:
    """The state a run with patience 2 and 5 head epochs checkpointed when its head phase stopped after epoch 3."""
    return TrainState(
        phase="head",
        phase_epoch=3,
        epoch=3,
        phase_best=0.5,
        since_best=2,
        stopped={"head": {"epoch": 3, "patience": 2, "epochs": 5}},
    )


def test_a_stopped_head_phase_moves_on_to_fine_tuning_judged_afresh():
    state = stopped_head()
    assert advance(state, phases()).name == "finetune"
    assert (state.phase, state.phase_epoch, state.phase_best, state.since_best) == ("finetune", 0, None, 0)
    assert state.stopped == {"head": {"epoch": 3, "patience": 2, "epochs": 5}}  # still told in the final metadata


def test_a_stopped_last_phase_means_the_run_is_done():
    assert advance(stopped_head(), phases(finetune_epochs=0)[:1]) is None


def test_raised_patience_continues_counting_from_the_phases_best():
    state = stopped_head()
    assert advance(state, phases(patience=3)[:1]).name == "head"
    assert (state.phase_epoch, state.since_best, state.stopped) == (3, 2, {})  # one more epoch without a gain stops it


def test_raised_epochs_continue_with_a_fresh_patience():
    state = stopped_head()
    assert advance(state, phases(head_epochs=8)[:1]).name == "head"
    assert (state.since_best, state.stopped) == (0, {})


def test_patience_turned_off_continues_a_stopped_phase():
    assert advance(stopped_head(), phases(patience=0)[:1]).name == "head"


def test_a_final_file_of_the_other_model_final_is_saved_again(tmp_path):
    """The rerun of a finished run with model.final changed is not 'already complete'."""
    model, state = tiny_model(), stopped_head()
    ckpt = save_checkpoint(model, from_conf("checkpoint", dir=str(tmp_path), format="h5"), "t3", state, {}, {})
    final = tmp_path / "final.h5"
    model.save(final)
    (tmp_path / "final.json").write_text(f'{{"final_checkpoint": "{ckpt.identity}", "weights": {{"final": "last"}}}}')
    plan = ResumePlan([ckpt])
    head_only = phases(finetune_epochs=0)[:1]
    cfg = Config(model=from_conf("model", save_path=str(final), final="last"))
    assert finished_run(cfg, plan, head_only) == ckpt
    cfg.model.final = "best"
    assert finished_run(cfg, plan, head_only) is None


# ---- the best checkpoint's weights ----------------------------------------


def tiny_model() -> keras.Model:
    model = keras.Sequential([keras.Input((4,)), layers.Dense(3, activation="softmax", name="predictions")])
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    model.optimizer.build(model.trainable_variables)
    return model


@pytest.mark.parametrize("fmt", ["h5", "keras", "weights_h5", "tf_checkpoint"])
def test_the_best_checkpoints_weights_load_into_the_model_in_every_format(tmp_path, fmt):
    best, last = tiny_model(), tiny_model()
    assert not np.allclose(best.get_weights()[0], last.get_weights()[0])
    cfg = from_conf("checkpoint", dir=str(tmp_path), format=fmt)
    twin = tiny_model() if fmt == "tf_checkpoint" else None
    ckpt = save_checkpoint(best, cfg, "transfer_01", TrainState(epoch=1), {}, {}, twin)
    load_weights(last, ckpt)
    for ours, theirs in zip(last.get_weights(), best.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_pruning_with_keep_last_1_keeps_the_best(tmp_path):
    cfg = from_conf("checkpoint", dir=str(tmp_path), format="weights_h5")
    model = tiny_model()
    for epoch in (1, 2, 3):
        save_checkpoint(model, cfg, f"transfer_{epoch:02d}", TrainState(epoch=epoch), {}, {})
        prune(tmp_path, keep_last=1, best_stem="transfer_01", current=f"transfer_{epoch:02d}")
    assert [c.stem for c in list_checkpoints(tmp_path)] == ["transfer_01", "transfer_03"]
