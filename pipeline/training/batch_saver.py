"""Checkpoints at batch boundaries: every N batches, and on SIGTERM (preemption).

Cluster managers and laptops alike send SIGTERM before they kill. The handler
only raises a flag; the next batch boundary saves a mid-epoch checkpoint and
stops the run, so the same command later continues at exactly that batch.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

import keras

from pipeline.errors import Preempted


class StopFlag:
    """Set by SIGTERM; read at batch boundaries."""

    def __init__(self):
        self.raised = False
        self.previous = None

    def install(self) -> StopFlag:
        self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        print("SIGTERM: saving a checkpoint at the next batch boundary, then stopping", flush=True)
        self.raised = True

    def uninstall(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


class BatchSaver(keras.callbacks.Callback):
    """Calls `save(batches_done, batch_logs)` every `every` batches and when `flag` is raised.

    `start_batch` is where this fit call began inside the epoch (a resumed
    epoch starts past its first batches); `batches_per_epoch` bounds it, since
    the epoch's last batch is checkpointed at the epoch's end instead, SIGTERM
    or not: a checkpoint at batch N of N would resume into an epoch with no
    batches left, which fit refuses. On the flag there, the epoch ends (with its
    validation) and the run stops after the epoch-end checkpoint (train.py).
    """

    def __init__(
        self, save: Callable[[int, dict], str], every: int, start_batch: int, batches_per_epoch: int, flag: StopFlag
    ):
        super().__init__()
        self.save, self.every, self.start_batch = save, every, start_batch
        self.batches_per_epoch, self.flag = batches_per_epoch, flag

    def on_train_batch_end(self, batch, logs=None):
        done = self.start_batch + batch + 1
        if done >= self.batches_per_epoch:
            return
        if (self.every > 0 and done % self.every == 0) or self.flag.raised:
            stem = self.save(done, dict(logs or {}))
            if self.flag.raised:
                raise Preempted(
                    f"stopped on SIGTERM after checkpoint {stem} "
                    f"({done} batches into the epoch); run the same command to continue"
                )
