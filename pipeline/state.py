"""Where training stands (TrainState): what a checkpoint records and a resumed run continues from."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainState:
    """Where training stands: enough to continue exactly where it stopped."""

    phase: str = "head"  # the phase the next step belongs to
    phase_epoch: int = 0  # epochs of that phase completed
    epoch: int = 0  # epochs completed over all phases (names the files)
    batch: int = 0  # batches of the next epoch already trained
    best: float | None = None
    best_stem: str | None = None
    lineage: list = field(default_factory=list)  # checkpoints each resume started from
    # Early stopping (training/early_stopping.py), counted per phase at each epoch's end:
    phase_best: float | None = None  # the phase's best checkpoint.monitor value so far
    since_best: int = 0  # epochs of the phase since the monitor last improved by min_delta
    stopped: dict = field(default_factory=dict)  # phase -> {epoch, patience, epochs} of its early stop
