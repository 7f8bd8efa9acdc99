"""Checkpoints written in the background while training continues.

At the epoch (or batch) boundary the training thread copies the model's
weights, optimizer slots and dropout state into a twin model (same layers and
names, compiled alike): a memory copy, small beside an epoch (make bench; docs/speed.md).
A background thread then writes the twin with the same save_checkpoint as a
synchronous save (scratch files, fsync, pending record, renames, manifest
last), so every guarantee of checkpoint.py holds unchanged: a kill at any
moment leaves the previous checkpoint usable, and a full disk still ends the
run with CheckpointError. Only when it surfaces moves: at the next checkpoint
or at the end of training (`wait`), at most one checkpoint interval later.

One write at a time: `submit` first waits for the previous one, so the fault
hooks (`PIPELINE_KILL_AT=after_write#2`) count saves in order, and a
checkpoint's name is chosen knowing the previous one exists.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from pathlib import Path

import keras

from pipeline.checkpoints.store import Checkpoint, prune, save_checkpoint, seed_generators
from pipeline.config import CheckpointConfig
from pipeline.state import TrainState


class CheckpointWriter:
    """Commits checkpoints one at a time, in the background when `cfg.asynchronous`.

    `on_commit(checkpoint)` runs after each commit, in the writing thread
    (pruning, the `checkpoint:` line): whoever reads that line may rely on the
    checkpoint being on disk.
    """

    def __init__(
        self,
        cfg: CheckpointConfig,
        fingerprint: dict,
        model: keras.Model,
        on_commit: Callable[[Checkpoint], None] = lambda ckpt: None,
    ):
        self.cfg, self.fingerprint, self.on_commit = cfg, fingerprint, on_commit
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        # Built now, in the training thread, before any step: building draws
        # from Keras's seed generators, and a fresh and a resumed run must draw alike.
        self.snapshot = keras.models.clone_model(model) if cfg.asynchronous else None
        self.snapshot_optimizer = None  # the model optimizer the snapshot is compiled like
        # tf_checkpoint holds weights only, written from a model without an optimizer, so
        # `tf.train.Checkpoint(model=m).restore(...)` works whatever optimizer m carries.
        self.bare = keras.models.clone_model(model) if cfg.format == "tf_checkpoint" else None

    def submit(self, model: keras.Model, stem: str, state: TrainState, logs: dict, background: bool = True) -> None:
        """Write `model` as it is now under `stem`; return once it is safe to train on.

        `background=False` writes before returning: when the run stops right after
        (SIGTERM), there is no training to overlap and the exit should not wait on a thread.
        """
        self.wait()
        state, logs = copy.deepcopy(state), dict(logs)
        if not (self.cfg.asynchronous and background):
            self.write(model, stem, state, logs)
            self.raise_error()
            return
        copy_training_state(model, self.mirror(model))
        self.thread = threading.Thread(
            target=self.write, args=(self.snapshot, stem, state, logs), name=f"checkpoint-{stem}"
        )
        # Not a daemon: the interpreter waits for a write in progress even on an unforeseen exit.
        self.thread.start()

    def wait(self) -> None:
        """Block until the write in progress has committed; raise its error if it failed."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        self.raise_error()

    def raise_error(self) -> None:
        error, self.error = self.error, None
        if error is not None:
            raise error

    def write(self, model: keras.Model, stem: str, state: TrainState, logs: dict) -> None:
        # At the usual priority on purpose: a lowered one left SIGTERM's final wait
        # (and the end of a run) queueing behind every other process on a busy machine.
        try:
            ckpt = save_checkpoint(model, self.cfg, stem, state, logs, self.fingerprint, self.bare)
            self.on_commit(ckpt)
        except BaseException as err:  # noqa: BLE001 - handed to the training thread by wait()
            self.error = err

    def mirror(self, model: keras.Model) -> keras.Model:
        """The snapshot twin with the model's trainable layers and a built optimizer like its own.

        Recompiled only when the model got a new optimizer (a new phase, a restore).
        """
        twin = self.snapshot
        if twin is None:  # built in __init__ only when writes are asynchronous, the one case that mirrors
            raise RuntimeError("mirror() needs checkpoint.asynchronous: there is no snapshot twin")
        if self.snapshot_optimizer is not model.optimizer:
            if not model.optimizer.built:
                model.optimizer.build(model.trainable_variables)
            for ours, theirs in zip(twin._flatten_layers(), model._flatten_layers(), strict=True):
                ours.trainable = theirs.trainable
            config = {k: v for k, v in model.get_compile_config().items() if k != "optimizer"}
            twin.compile(optimizer=keras.optimizers.deserialize(keras.optimizers.serialize(model.optimizer)), **config)
            twin.optimizer.build(twin.trainable_variables)
            self.snapshot_optimizer = model.optimizer
        return twin


def copy_training_state(model: keras.Model, twin: keras.Model) -> None:
    """Weights, optimizer slots and step count, dropout's random state: model -> twin.

    TensorFlow copies a variable's buffer before the next in-place update
    when another variable still shares it, so the twin keeps these values
    while training goes on.
    """
    pairs = [
        (twin.weights, model.weights),
        (twin.optimizer.variables, model.optimizer.variables),
        ([g.state for g in seed_generators(twin)], [g.state for g in seed_generators(model)]),
    ]
    for ours, theirs in pairs:
        if len(ours) != len(theirs):
            raise RuntimeError(f"checkpoint snapshot: {len(ours)} variables to fill from {len(theirs)}")
        for dst, src in zip(ours, theirs, strict=True):
            dst.assign(src)


def prune_and_announce(cfg: CheckpointConfig) -> Callable[[Checkpoint], None]:
    """The usual on_commit: prune older checkpoints (keeping the best as of this one), announce it."""

    def on_commit(ckpt: Checkpoint) -> None:
        keep = 1 if cfg.save_best_only else cfg.keep_last
        prune(Path(cfg.dir), keep, ckpt.state.best_stem, current=ckpt.stem)
        print(f"checkpoint: {Path(cfg.dir) / ckpt.stem} ({cfg.format})", flush=True)

    return on_commit
