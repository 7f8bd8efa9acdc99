"""Early stopping that survives a resume: the patience rule on checkpoint.monitor, per phase, kept in TrainState.

Keras's EarlyStopping counts its patience inside one `fit` call; here every
epoch is its own call, and a resumed process starts another, so its count
would start over each time. The count lives in TrainState instead, updated at
the epoch's end before that epoch's checkpoint records it: a run resumed from
any checkpoint (a mid-epoch one included) reaches the same count at the same
epoch, and stops where an uninterrupted run stops.

A stop is recorded with the patience and epochs it was made under, so it is
an outcome, not a mood: the same command finds the run finished; raising
`train.early_stopping.patience` continues the phase as a run with that
patience would have; raising the phase's epochs gives it a fresh patience.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.state import TrainState

# checkpoint.mode=auto: metrics that grow as the model gets better (val_accuracy, val_balanced_accuracy,
# val_macro_f1, ...); any other monitor (a loss) is minimised, as Keras's callbacks decide.
MAXIMISED = ("acc", "f1", "auc", "precision", "recall")


@dataclass(frozen=True)
class StopRule:
    """When a phase stops early: `patience` epochs (0 = never) without `min_delta` of improvement."""

    monitor: str
    mode: str  # "max" or "min", resolved from checkpoint.mode
    patience: int
    min_delta: float


def resolve_mode(monitor: str, mode: str) -> str:
    """checkpoint.mode as "max" or "min"; auto maximises accuracies and scores, minimises the rest."""
    if mode != "auto":
        return mode
    return "max" if any(word in monitor for word in MAXIMISED) else "min"


def improves(value: float | None, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether `value` beats `best` by more than `min_delta` in the direction of `mode`.

    NaN never improves (mid-epoch checkpoints have no validation yet); anything beats no best.
    """
    if value is None or value != value:
        return False
    if best is None:
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


def count_epoch(state: TrainState, value: float | None, rule: StopRule, phase_epochs: int) -> bool:
    """Count the epoch `state` has just completed, whose monitor was `value`; True if its phase stops here.

    Called once per epoch, after the epoch is counted done and before its checkpoint
    is written, so the checkpoint records the decision with the state.
    """
    if improves(value, state.phase_best, rule.mode, rule.min_delta):
        state.phase_best, state.since_best = value, 0
    else:
        state.since_best += 1
    # Patience running out at the phase's last epoch is the phase's end, not an early stop.
    if rule.patience and state.since_best >= rule.patience and state.phase_epoch < phase_epochs:
        state.stopped[state.phase] = {"epoch": state.epoch, "patience": rule.patience, "epochs": phase_epochs}
        return True
    return False


def stays_stopped(state: TrainState, rule: StopRule, phase_epochs: int) -> bool:
    """Whether the state's phase stopped early and this configuration keeps it stopped.

    A stop made under patience P and E epochs holds while the configuration asks
    for no more than that; with more of either, the phase goes on, and the stop
    is forgotten. Raised patience keeps counting from the phase's best epoch (as
    an uninterrupted run with that patience would); raised epochs alone restart
    the count, or the phase would stop again after one epoch.
    """
    stop = state.stopped.get(state.phase)
    if stop is None:
        return False
    if 0 < rule.patience <= stop["patience"] and phase_epochs <= stop["epochs"]:
        return True
    del state.stopped[state.phase]
    if rule.patience <= stop["patience"]:
        state.since_best = 0
    return False


def start_phase(state: TrainState, phase: str) -> None:
    """Move `state` to the first epoch of `phase`: each phase is judged against its own best."""
    state.phase, state.phase_epoch, state.batch = phase, 0, 0
    state.phase_best, state.since_best = None, 0


def announce_stop(state: TrainState, rule: StopRule) -> str:
    """The line a run prints when its phase stops early."""
    best = "none" if state.phase_best is None else f"{state.phase_best:.4f}"
    return (
        f"early stopping: the {state.phase} phase stops after epoch {state.epoch}: {rule.monitor} has not "
        f"improved by more than {rule.min_delta:g} for {rule.patience} epochs (the phase's best {best})"
    )


def describe_stops(state: TrainState) -> str:
    """'the head phase stopped early at epoch 3, ...' for the phases that did; '' if none did."""
    return ", ".join(
        f"the {phase} phase stopped early at epoch {stop['epoch']} (patience {stop['patience']})"
        for phase, stop in state.stopped.items()
    )
