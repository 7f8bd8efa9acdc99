"""Rates measured inside the bench's own process: the input feed alone, the model alone on
in-memory tensors (compute-bound), and what a checkpoint costs a training epoch."""

from __future__ import annotations

import contextlib
import io
import time
from dataclasses import replace
from pathlib import Path

import keras
import numpy as np

from pipeline.checkpoints.writer import CheckpointWriter
from pipeline.config import Config, DataConfig
from pipeline.data.dataset import Batches, read_dataset, train_batches
from pipeline.model import build_model, compile_model, set_trainable
from pipeline.state import TrainState
from pipeline.training.cached_phase import share_compilation, split_at
from pipeline.training.precision import set_precision

PHASES = {
    "head": "base frozen",
    "finetune": "trained after mixed8",
    "whole": "whole network",
    "finetune_cached": "the layers above mixed8 on cached mixed8 features",
}


def read_quietly(cfg: DataConfig):
    """read_dataset without flow_from_directory's "Found N images" lines in the bench's report."""
    with contextlib.redirect_stdout(io.StringIO()):
        return read_dataset(cfg)


def trained_model(
    config: Config, n_classes: int, image_size: int, phase: str, precision: str = "float32"
) -> keras.Model:
    """A model (the bench's: random init) set up for `phase` as the bench's pipeline run trains it.

    The optimizer and rate are the phase's in `config`; the rate stays constant over the few timed steps.
    """
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    set_precision(precision)
    model = build_model(config.model, n_classes, image_size)
    if phase == "head":
        set_trainable(model, "head", None, pretrained=False)
    else:
        set_trainable(model, "finetune", "mixed8" if phase == "finetune" else None, pretrained=False)
    settings = config.train.head if phase == "head" else config.train.finetune
    compile_model(model, settings.optimizer, settings.lr)
    return model


def time_steps(model: keras.Model, x, y, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    return time.perf_counter() - started


def model_rate(
    config: Config,
    n_classes: int,
    image_size: int,
    batch_size: int,
    phase: str,
    steps: int,
    precision: str = "float32",
) -> float:
    """Training images/s of `phase` on one in-memory batch: no input, no validation, no checkpoint.

    `finetune_cached` is what a cached fine-tune phase trains: the layers above
    mixed8 on a batch of mixed8-shaped features.
    """
    try:
        full_phase = "finetune" if phase == "finetune_cached" else phase
        full = trained_model(config, n_classes, image_size, full_phase, precision)
        model = full
        rng = np.random.default_rng(0)
        x = rng.uniform(0, 255, (batch_size, image_size, image_size, 3)).astype("float32")
        if phase == "finetune_cached":
            _, model = split_at(full, "mixed8")
            share_compilation(model, full)
            x = rng.uniform(0, 1, (batch_size, *model.input.shape[1:])).astype("float32")
        y = np.eye(n_classes, dtype="float32")[rng.integers(0, n_classes, batch_size)]
        time_steps(model, x, y, 2)  # tracing
        return steps * batch_size / time_steps(model, x, y, steps)
    finally:
        set_precision("float32")


def feed_rate(data_cfg: DataConfig, image_size: int, workers: int) -> float:
    """Training images/s of the real feed (Batches, augmentation, `workers` threads), as fit() pulls it.

    A model that only averages the pixels consumes the batches, so the time is the feed's.
    """
    cfg = replace(data_cfg, image_size=image_size, workers=workers)
    data = read_quietly(cfg)
    keras.backend.clear_session()
    inputs = keras.Input((image_size, image_size, 3))
    outputs = keras.layers.Dense(len(data.class_names), activation="softmax")(
        keras.layers.GlobalAveragePooling2D()(inputs)
    )
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    model.fit(train_batches(data, cfg, 0, 0, start_batch=len(train_batches(data, cfg, 0, 0)) - 2), verbose=0)
    batches = train_batches(data, cfg, 0, 1)
    started = time.perf_counter()
    model.fit(batches, epochs=1, verbose=0, shuffle=False)
    return len(data.train.filepaths) / (time.perf_counter() - started)


def epoch_seconds(model: keras.Model, data, cfg: DataConfig) -> float:
    """One real epoch of the sample set through the feed, after tracing on two batches."""
    model.fit(train_batches(data, cfg, 0, 0, start_batch=len(train_batches(data, cfg, 0, 0)) - 2), verbose=0)
    started = time.perf_counter()
    model.fit(train_batches(data, cfg, 0, 1), epochs=1, verbose=0, shuffle=False)
    return time.perf_counter() - started


def checkpoint_costs(config: Config, work: Path, formats: list[str], steps: int) -> tuple[float, list[dict]]:
    """An epoch's seconds (whole network, as `config` sets it up: the bench's weights=null), and per
    format and mode the seconds a checkpoint costs training.

    Synchronous: the save itself. Asynchronous: the training thread's snapshot, plus how much
    slower `steps` training steps run while the write goes on in the background than without
    (plus any wait left when they are done), against the mean of a plain run before and after.
    """
    cfg = config.data
    data = read_quietly(cfg)
    model = trained_model(config, len(data.class_names), cfg.image_size, "whole")
    epoch = epoch_seconds(model, data, cfg)
    x, y = Batches(data.train, len(data.class_names), cfg, 0, 0, None, shuffle=False)[0]
    results = []
    for fmt in formats:
        for asynchronous in (False, True):
            ckpt_cfg = replace(
                config.checkpoint, dir=str(work / f"ckpt_{fmt}_{asynchronous}"), format=fmt, asynchronous=asynchronous
            )
            writer = CheckpointWriter(ckpt_cfg, {}, model)
            cost = checkpoint_cost(model, writer, x, y, steps) if asynchronous else save_seconds(model, writer)
            results.append({"format": fmt, "asynchronous": asynchronous, **cost})
    return epoch, results


def save_seconds(model: keras.Model, writer: CheckpointWriter, label: str = "sync") -> dict:
    started = time.perf_counter()
    writer.submit(model, label, TrainState(phase="finetune", phase_epoch=1, epoch=1), {"val_accuracy": 0.5})
    writer.wait()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "blocking": seconds}


def checkpoint_cost(model: keras.Model, writer: CheckpointWriter, x, y, steps: int) -> dict:
    """What one background checkpoint costs the training thread, in seconds.

    The snapshot it waits for, plus how much longer the steps run while the write
    goes on than the same number of steps before and after it. Training continues
    until the write has committed (at least `steps` steps), as it would in an epoch.
    """
    save_seconds(model, writer, "warm-up")  # the snapshot twin's first compile, paid once per phase
    time_steps(model, x, y, 2)  # tracing for this batch shape
    before = time_steps(model, x, y, steps) / steps
    started = time.perf_counter()
    writer.submit(model, "async", replace(TrainState(phase="finetune"), epoch=2), {"val_accuracy": 0.5})
    blocking = time.perf_counter() - started
    thread, done = writer.thread, 0
    if thread is None:  # submit() wrote in the foreground: there is no background write to overlap
        raise ValueError("checkpoint_cost needs a writer with checkpoint.asynchronous")
    started = time.perf_counter()
    while done < steps or thread.is_alive():
        model.train_on_batch(x, y)
        done += 1
    during = time.perf_counter() - started
    writer.wait()
    after = time_steps(model, x, y, steps) / steps
    slowdown = during - done * (before + after) / 2
    return {
        "seconds": blocking + slowdown,
        "blocking": blocking,
        "slowdown": slowdown,
        "steps_during": done,
        "during": during,
    }
