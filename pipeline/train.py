"""The stages in order: data -> resume plan -> model -> head phase -> fine-tune phase -> final save."""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import keras
import tensorflow as tf

from . import summary
from .checkpoint import Checkpoint, TrainState, checkpoint_stem, list_checkpoints, prune, save_checkpoint
from .config import Config, PhaseConfig
from .data import DataSet, ensure_sample_data, read_dataset, train_batches, validation_batches
from .final_model import read_metadata, save_final
from .model import build_model, check_unfreeze_after, compile_model, resolve_unfreeze_after, set_trainable
from .resume import plan_resume, restore_newest_usable
from .checkpoint import CheckpointError
from .config import ConfigError
from .data import DataError
from .model import WeightsError

# Errors whose message tells the user what to fix; the entry point prints them without a traceback.
USER_ERRORS = (ConfigError, DataError, WeightsError, CheckpointError)


@dataclass
class Phase:
    name: str
    cfg: PhaseConfig


def configure_tensorflow(cfg: Config) -> None:
    """Seeds, and op determinism for bit-exact runs and resumes (before TF starts its runtime)."""
    keras.utils.set_random_seed(cfg.train.seed)
    if cfg.train.deterministic:
        tf.config.experimental.enable_op_determinism()
        # Measured: op determinism alone still let two processes differ by 0.02
        # in the weights; one inter-op thread made them agree bit for bit.
        tf.config.threading.set_inter_op_parallelism_threads(1)


def plan_phases(cfg: Config) -> list[Phase]:
    return [Phase(name, phase) for name, phase in (("head", cfg.train.head), ("finetune", cfg.train.finetune))
            if phase.epochs > 0]


PHASE_ORDER = ("head", "finetune")


def advance(state: TrainState, phases: list[Phase]) -> Optional[Phase]:
    """Move `state` past finished phases; the phase to train next, or None when all are done."""
    for phase in phases:
        if PHASE_ORDER.index(phase.name) < PHASE_ORDER.index(state.phase):
            continue
        if phase.name != state.phase:
            state.phase, state.phase_epoch, state.batch = phase.name, 0, 0
        if state.phase_epoch < phase.cfg.epochs:
            return phase
    return None


def make_fingerprint(cfg: Config, data: DataSet) -> dict:
    """What must match for a checkpoint to continue this run (not the epochs, which may grow)."""
    return {
        "architecture": "InceptionV3+GAP+dropout+dense",
        "classes": data.class_names,
        "image_size": cfg.data.image_size,
        "dropout": cfg.model.dropout,
        "pretrained": cfg.model.weights is not None,
        "data_dir": str(Path(cfg.data.dir).resolve()),
        "train_images": len(data.train.filepaths),
        "validation_images": len(data.validation.filepaths),
    }


def monitor_improved(cfg: Config, value: Optional[float], best: Optional[float]) -> bool:
    if value is None:
        return False
    if best is None:
        return True
    mode = cfg.checkpoint.mode
    if mode == "auto":
        mode = "max" if "acc" in cfg.checkpoint.monitor else "min"
    return value > best if mode == "max" else value < best


def run(cfg: Config, resume: Optional[bool] = None) -> dict:
    """Train (or continue training) and save the final model; return the closing summary."""
    started = time.time()
    configure_tensorflow(cfg)
    ensure_sample_data(cfg.data)
    data = read_dataset(cfg.data)
    # The model is built before anything in checkpoint.dir is touched, so weights
    # that cannot be had stop the run with every folder as it was.
    model = build_model(cfg.model, len(data.class_names), cfg.data.image_size)
    check_unfreeze_after(model, cfg.train.finetune.unfreeze_after)
    fingerprint = make_fingerprint(cfg, data)
    plan = plan_resume(Path(cfg.checkpoint.dir), fingerprint, resume)
    phases = plan_phases(cfg)
    done = finished_run(cfg, plan.candidates[0] if plan.candidates else None, phases)
    if done:
        print(f"This run is already complete: {cfg.model.save_path} was saved from checkpoint "
              f"{done}. Nothing to do (raise the epochs to train longer, or +resume=false to start afresh).")
        return {"complete": True, "model": cfg.model.save_path}
    twin = (build_model(cfg.model, len(data.class_names), cfg.data.image_size)
            if cfg.checkpoint.format == "tf_checkpoint" else None)
    pretrained = cfg.model.weights is not None
    unfreeze_after = resolve_unfreeze_after(cfg.train.finetune.unfreeze_after, pretrained)

    def prepare(state: TrainState) -> keras.Model:
        # By the state's own phase, even one now configured with 0 epochs: the
        # optimizer state being restored belongs to that phase's trainable layers.
        phase_cfg = getattr(cfg.train, state.phase)
        set_trainable(model, state.phase, unfreeze_after, pretrained)
        compile_model(model, phase_cfg.optimizer, phase_cfg.lr)
        return model

    restored = restore_newest_usable(plan, prepare)
    state = restored.state if restored else TrainState(phase=phases[0].name)
    if restored:
        state.lineage = state.lineage + [restored.stem]
    summary.print_startup(cfg, data, phases, plan.reason, restored, unfreeze_after)

    validation = validation_batches(data, cfg.data)
    last_logs: dict = restored.manifest.get("logs", {}) if restored else {}
    compiled_for = state.phase if restored else None
    while (phase := advance(state, phases)) is not None:
        if compiled_for != phase.name:
            prepare(state)
            compiled_for = phase.name
        last_logs = fit_epoch(model, phase, state, data, validation, cfg, fingerprint, twin) or last_logs

    metadata = {"class_names": data.class_names, "image_size": cfg.data.image_size,
                "final_checkpoint": latest_stem(cfg), "lineage": state.lineage,
                "best": {"monitor": cfg.checkpoint.monitor, "value": state.best, "checkpoint": state.best_stem},
                "last_logs": last_logs, "config": asdict(cfg)}
    save_final(model, Path(cfg.model.save_path), metadata)
    return summary.print_closing(cfg, state, last_logs, time.time() - started)


def fit_epoch(model, phase: Phase, state: TrainState, data: DataSet, validation, cfg: Config,
              fingerprint: dict, twin) -> dict:
    """Train one epoch of `phase` from state.batch on, then checkpoint as configured."""
    print(f"{phase.name} epoch {state.phase_epoch + 1}/{phase.cfg.epochs} "
          f"(epoch {state.epoch + 1} overall)", flush=True)
    batches = train_batches(data, cfg.data, cfg.train.seed, state.epoch, state.batch)
    # shuffle=False: Batches already shuffles by (seed, epoch). fit() would reorder
    # batches with Python's global `random`, whose state a resumed process does not share.
    history = model.fit(batches, validation_data=validation, epochs=1, shuffle=False,
                        verbose=1 if sys.stdout.isatty() else 2)
    logs = {k: float(v[-1]) for k, v in history.history.items()}
    state.epoch, state.phase_epoch, state.batch = state.epoch + 1, state.phase_epoch + 1, 0
    if state.phase_epoch % cfg.checkpoint.every == 0 or state.phase_epoch == phase.cfg.epochs:
        write_checkpoint(model, state, logs, cfg, fingerprint, twin)
    return logs


def write_checkpoint(model, state: TrainState, logs: dict, cfg: Config, fingerprint: dict, twin) -> None:
    """Commit a checkpoint (recording whether it is the best so far), then prune old ones."""
    stem = checkpoint_stem(cfg.checkpoint, state, logs)
    value = logs.get(cfg.checkpoint.monitor)
    if monitor_improved(cfg, value, state.best):
        state.best, state.best_stem = value, stem
    save_checkpoint(model, cfg.checkpoint, stem, state, logs, fingerprint, twin)
    keep = 1 if cfg.checkpoint.save_best_only else cfg.checkpoint.keep_last
    prune(Path(cfg.checkpoint.dir), keep, state.best_stem)
    print(f"checkpoint: {Path(cfg.checkpoint.dir) / stem} ({cfg.checkpoint.format})", flush=True)


def latest_stem(cfg: Config) -> Optional[str]:
    found = list_checkpoints(Path(cfg.checkpoint.dir))
    return found[-1].stem if found else None


def finished_run(cfg: Config, newest: Optional[Checkpoint], phases: list[Phase]) -> Optional[str]:
    """The newest checkpoint's name if training is done and the final model came from it."""
    if newest is None:
        return None
    state = newest.state
    if advance(state, phases) is not None:
        return None
    meta = read_metadata(Path(cfg.model.save_path))
    return newest.stem if meta and meta.get("final_checkpoint") == newest.stem else None
