"""The record of every epoch: a row in history.csv and the same values in TensorBoard.

Keras's fit runs one epoch at a time here (train.fit_epoch), so Keras's own
CSVLogger and TensorBoard callbacks would number every epoch 0 and start over
each call. This callback numbers rows by the run's overall epoch instead.

A resumed run continues the same files. Rows beyond the restored checkpoint
were trained by a process that died before committing them, and will be
trained again: they are dropped when the run starts, so the file never holds
an epoch twice. TensorBoard's logs are rebuilt from the kept rows at the same
moment, for the same reason.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable
from pathlib import Path

import keras
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from pipeline.atomic_file import replaced
from pipeline.checkpoints.store import reach, space_for
from pipeline.config import METRICS as MONITORED
from pipeline.errors import DiskFull
from pipeline.state import TrainState

HISTORY = "history.csv"
TENSORBOARD = "tensorboard"
COLUMNS = (
    "epoch",
    "phase",
    "phase_epoch",
    "loss",
    "accuracy",
    "val_loss",
    "val_accuracy",
    "val_macro_f1",
    "val_balanced_accuracy",
    "lr",
    "seconds",
    "resumed_from",
    "resumed_at",
)
# What fit logs that history.csv keeps: every value checkpoint.monitor may name (config.METRICS), with the
# validation scores for imbalanced sets but not their training counterparts (class-weighted in training).
LOGGED = MONITORED
METRICS = (*LOGGED, "lr", "seconds")
# TensorBoard's scalar plugin marker. tf.summary.scalar would add it, but it needs
# the tensorboard package, which TensorFlow no longer brings; tf.summary.write does not.
SCALAR_METADATA = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))


def read_history(path: Path) -> list[dict]:
    """The rows of a history.csv, numbers as floats (NaN where empty); [] if there is none."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [parse_row(row) for row in rows if (row.get("epoch") or "").isdigit()]


def parse_row(row: dict) -> dict:
    parsed = {
        "epoch": int(row["epoch"]),
        "phase": row.get("phase", ""),
        "phase_epoch": int(row.get("phase_epoch") or 0),
        "resumed_from": row.get("resumed_from") or "",
        "resumed_at": to_float(row.get("resumed_at")),
    }
    return {**parsed, **{k: to_float(row.get(k)) for k in METRICS}}


def to_float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def write_history(path: Path, rows: list[dict]) -> None:
    """Rewrite the whole file under a temporary name: a kill mid-write leaves the previous file whole.

    A full disk raises DiskFull naming the file (the previous one still whole).
    """
    with space_for(path), replaced(path) as tmp, open(tmp, "w", newline="") as f:
        reach("write_history")  # PIPELINE_ENOSPC_AT=write_history: a full disk here, for tests
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        # repr keeps every digit, so a value read back equals the one logged (report.best_epoch relies on it)
        writer.writerows({k: format_cell(row.get(k)) for k in COLUMNS} for row in rows)


def format_cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def start_history(
    report_dir: Path,
    state_of: Callable[[], TrainState],
    resumed_from: str | None,
    restored_logs: dict | None = None,
) -> list[keras.callbacks.Callback]:
    """Keep the rows up to the state training starts from; the callbacks that record the rest.

    `state_of()` is the run's live TrainState (train.Session.state), read when
    each epoch ends, before fit_epoch counts the epoch done. `resumed_from` is
    the restored checkpoint's name, or None for a fresh start; `restored_logs` its logs.
    """
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    start = state_of()
    rows = [row for row in read_history(report_dir / HISTORY) if row["epoch"] <= start.epoch]
    if restored_logs is not None and start.batch == 0 and start.epoch not in [0, *(r["epoch"] for r in rows)]:
        # The disk was full when this epoch ended: its checkpoint committed, its row did not (train.fit_epoch).
        rows.append(row_from_checkpoint(start, restored_logs))
    write_history(report_dir / HISTORY, rows)
    with space_for(report_dir / TENSORBOARD):
        writers = rebuild_tensorboard(report_dir / TENSORBOARD, rows)
    return [EpochRecorder(report_dir / HISTORY, rows, writers, state_of, resumed_from)]


def row_from_checkpoint(state: TrainState, logs: dict) -> dict:
    """The row of the epoch a checkpoint ended, from its logs (its rate and duration were not kept)."""
    row = {"epoch": state.epoch, "phase": state.phase, "phase_epoch": state.phase_epoch, "resumed_from": ""}
    row.update({k: to_float(logs.get(k)) for k in (*METRICS, "resumed_at")})  # NaN where the logs have none
    return row


def rebuild_tensorboard(logdir: Path, rows: list[dict]) -> dict:
    """Fresh event files holding exactly `rows`: the old ones may hold epochs that were dropped."""
    writers = {}
    for split in ("train", "validation"):
        folder = logdir / split
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("events.out.tfevents.*"):
            old.unlink()
        writers[split] = tf.summary.create_file_writer(str(folder))
    for row in rows:
        write_scalars(writers, row)
    return writers


def write_scalars(writers: dict, row: dict) -> None:
    """Keras's tag names (epoch_loss, ...) in train/ and validation/, so TensorBoard overlays the two."""
    values = {
        "train": {
            "epoch_loss": row["loss"],
            "epoch_accuracy": row["accuracy"],
            "epoch_learning_rate": row["lr"],
            "epoch_seconds": row["seconds"],
        },
        "validation": {
            "epoch_loss": row["val_loss"],
            "epoch_accuracy": row["val_accuracy"],
            "epoch_macro_f1": row["val_macro_f1"],
            "epoch_balanced_accuracy": row["val_balanced_accuracy"],
        },
    }
    for split, scalars in values.items():
        with writers[split].as_default():
            for tag, value in scalars.items():
                if not math.isnan(value):  # NaN: not measured
                    tf.summary.write(tag, tf.constant(value, tf.float32), step=row["epoch"], metadata=SCALAR_METADATA)
        writers[split].flush()


class EpochRecorder(keras.callbacks.Callback):
    """Appends one row per finished epoch to history.csv and TensorBoard."""

    def __init__(
        self, path: Path, rows: list[dict], writers: dict, state_of: Callable[[], TrainState], resumed_from: str | None
    ):
        super().__init__()
        self.path, self.rows, self.writers, self.state_of = path, rows, writers, state_of
        self.resumed_from = resumed_from  # marks the first row this process writes
        self.resumed_at: float | None = None
        self.started, self.lr = time.time(), float("nan")
        # Set when the disk is full. Raised inside fit, it would also lose the epoch just
        # trained: train.fit_epoch checkpoints that epoch first (it commits if checkpoints
        # live on another disk), then raises this.
        self.failed: DiskFull | None = None

    def on_train_begin(self, logs=None):
        state = self.state_of()
        if self.resumed_from and self.resumed_at is None:
            # params["steps"] counts only the batches left in a resumed epoch.
            per_epoch = (self.params.get("steps") or 0) + state.batch
            self.resumed_at = state.epoch + (state.batch / per_epoch if per_epoch else 0.0)

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.time()
        # The rate the epoch starts with: at its end a cosine phase has already decayed to 0.
        self.lr = current_learning_rate(self.model)

    def on_epoch_end(self, epoch, logs=None):
        logs, state = dict(logs or {}), self.state_of()
        row = {
            "epoch": state.epoch + 1,
            "phase": state.phase,
            "phase_epoch": state.phase_epoch + 1,
            **{k: to_float(logs.get(k)) for k in LOGGED},
            "lr": self.lr,
            "seconds": round(time.time() - self.started, 2),
            "resumed_from": "",
            "resumed_at": float("nan"),
        }
        if self.resumed_from:
            row["resumed_from"], row["resumed_at"] = self.resumed_from, round(self.resumed_at or 0.0, 3)
            self.resumed_from = None
        self.rows.append(row)
        try:
            write_history(self.path, self.rows)
            with space_for(self.path.parent / TENSORBOARD):
                write_scalars(self.writers, row)
        except DiskFull as err:
            self.failed = err


def current_learning_rate(model: keras.Model) -> float:
    """The rate the next step uses: a schedule evaluated at the optimizer's step count."""
    try:
        return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
    except (AttributeError, TypeError, ValueError):
        return float("nan")
