"""What a run tells its user: the plan at start, the outcome at the end."""

from __future__ import annotations

from pathlib import Path

from pipeline.backbones import BACKBONES
from pipeline.config import Config
from pipeline.state import TrainState
from pipeline.training.class_balance import describe_weights


def print_startup(cfg: Config, data, phases, reason: str, restored, unfreeze_after, class_weights=None) -> None:
    """The plan: data per class, model, phases, the loss's class weights, checkpoints, and where training starts.

    `class_weights` are train.class_weight's per-class weights (class_balance.py), None when unweighted.
    """
    n = len(data.class_names)
    train_counts, val_counts = data.train.counts(n), data.validation.counts(n)
    lines = [
        f"data: {len(data.train.filepaths)} training images from {data.train.source}, "
        f"{len(data.validation.filepaths)} validation images from {data.validation.source}",
        f"data layout: {data.layout}",
    ]
    lines += [
        f"  {name:<20} train {t:>6}  validation {v:>6}"
        for name, t, v in zip(data.class_names, train_counts, val_counts, strict=True)
    ]
    weights = cfg.model.weights if cfg.model.weights is not None else "none (random init)"
    lines.append(
        f"model: {BACKBONES[cfg.model.name].display} at {cfg.data.image_size} px, weights {weights}, "
        f"head: pooling, dropout {cfg.model.dropout}, softmax over {n} classes"
    )
    lines.append(
        f"loss: cross-entropy, label smoothing {cfg.train.label_smoothing:g}, class weights "
        + describe_weights(cfg.train.class_weight, data.class_names, class_weights)
    )
    for phase in phases:
        what = (
            "base frozen"
            if phase.name == "head"
            else (f"base trained after {unfreeze_after}" if unfreeze_after else "whole base trained")
        )
        lines.append(
            f"phase {phase.name}: {phase.cfg.epochs} epochs, {phase.cfg.optimizer} lr {phase.cfg.lr:g}, {what}"
        )
    lines.append(
        f"checkpoints: {cfg.checkpoint.dir}/{cfg.checkpoint.filename} "
        f"({cfg.checkpoint.format}) every {cfg.checkpoint.every} epoch(s)"
    )
    if restored:
        s = restored.state
        best = f", best {cfg.checkpoint.monitor} so far {s.best:.4f}" if s.best is not None else ""
        lines.append(
            f"resume: from checkpoint {restored.stem} ({s.phase} phase, "
            f"{s.epoch} epochs done{f', {s.batch} batches into the next' if s.batch else ''}{best})"
        )
    else:
        lines.append(f"resume: {reason}")
    print("\n".join(lines), flush=True)


def outcome(cfg: Config, state: TrainState, last_logs: dict, seconds: float, status: str) -> dict:
    """What a run achieved, flat, for sweep summaries and Optuna (which maximises `best`)."""
    return {
        "status": status,
        "monitor": cfg.checkpoint.monitor,
        "best": state.best,
        "best_checkpoint": state.best_stem,
        "last": last_logs.get(cfg.checkpoint.monitor),
        "epochs": state.epoch,
        "seconds": round(seconds, 1),
        "model": cfg.model.save_path,
    }


def print_closing(cfg: Config, state: TrainState, last_logs: dict, seconds: float) -> dict:
    last_acc = last_logs.get("val_accuracy")
    print(
        f"done in {seconds:.0f} s: best {cfg.checkpoint.monitor} {fmt(state.best)} "
        f"(checkpoint {state.best_stem}), last val_accuracy {fmt(last_acc)}"
    )
    print(
        f"saved: {cfg.model.save_path} (+ {Path(cfg.model.save_path).with_suffix('.json')}), "
        f"checkpoints in {cfg.checkpoint.dir}/",
        flush=True,
    )
    return outcome(cfg, state, last_logs, seconds, "trained")


def fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"
