"""The run report: report.md, curves.png and confusion_matrix.png in the run's output folder.

Written once the final model is saved: the data and its class balance, the
phases, the best epoch, the final metrics, and the confusion matrix of the
final model on the validation set, which it predicts here with the
validation batches training used (so the matrix's accuracy is the last
epoch's val_accuracy). The curves come from history.csv (history.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from pipeline.atomic_file import replaced
from pipeline.backbones import BACKBONES
from pipeline.config import METRICS, Config
from pipeline.data.dataset import DataSet, validation_batches
from pipeline.inference import predict_batch
from pipeline.model import resolve_unfreeze_after
from pipeline.reports.history import HISTORY, TENSORBOARD, read_history
from pipeline.reports.metrics import CORNER, accuracy, class_scores, confusion_matrix
from pipeline.reports.plots import draw_confusion, draw_curves
from pipeline.state import TrainState
from pipeline.training.class_balance import class_weights, describe_weights

REPORT = "report.md"
CURVES = "curves.png"
CONFUSION = "confusion_matrix.png"


def write_run_report(
    report_dir: Path,
    cfg: Config,
    data: DataSet,
    model: keras.Model,
    state: TrainState,
    last_logs: dict,
    validation: tuple[keras.Model, Sequence] | None = None,
    matrix: np.ndarray | None = None,
) -> Path:
    """Draw the figures and write report.md; print where it is.

    `validation` is the (model, batches) pair the last phase validated with: for a
    cached phase, the layers above the cut on the cached validation features, the
    same function of the images without running the frozen layers again. By
    default the full model predicts the validation images. `matrix`, when given,
    is that prediction's confusion matrix already counted (by the last
    validation pass of a model whose weights are the final ones): no second pass.
    """
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    rows = read_history(report_dir / HISTORY)
    draw_curves(rows, report_dir / CURVES)
    if matrix is None:
        scorer, batches = validation or (model, validation_batches(data, cfg.data))
        matrix = validation_confusion(scorer, batches, len(data.class_names), data.validation.labels)
    draw_confusion(matrix, data.class_names, report_dir / CONFUSION, "validation set, final model")
    path = report_dir / REPORT
    with replaced(path) as tmp:
        tmp.write_text(render_report(report_dir, cfg, data, state, last_logs, rows, matrix))
    print(f"report: {path} (+ {CURVES}, {CONFUSION}, {HISTORY}, {TENSORBOARD}/)", flush=True)
    return path


def write_missing_report(report_dir: Path, cfg: Config, data: DataSet, state: TrainState, last_logs: dict) -> None:
    """For a run found already complete: the report, from the saved model, if its own run did not get to write it
    (killed after the final save, or a new output folder). An existing report is left as it is."""
    if (Path(report_dir) / REPORT).exists():
        return
    model = keras.models.load_model(cfg.model.save_path, compile=False)
    write_run_report(report_dir, cfg, data, model, state, last_logs)


def validation_confusion(model: keras.Model, batches: Sequence, n_classes: int, labels: np.ndarray) -> np.ndarray:
    predicted = np.concatenate([np.argmax(predict_batch(model, batches[i][0]), axis=1) for i in range(len(batches))])
    return confusion_matrix(labels, predicted, n_classes)


def render_report(
    report_dir: Path,
    cfg: Config,
    data: DataSet,
    state: TrainState,
    last_logs: dict,
    rows: list[dict],
    matrix: np.ndarray,
) -> str:
    sections = [
        f"# Run report: {report_dir.name}\n\nWritten {time.strftime('%Y-%m-%d %H:%M')}.",
        data_section(cfg, data),
        phases_section(cfg, rows),
        result_section(cfg, state, last_logs, rows),
        confusion_section(matrix, data.class_names),
        files_section(report_dir, cfg),
    ]
    return "\n\n".join(sections) + "\n"


def data_section(cfg: Config, data: DataSet) -> str:
    n = len(data.class_names)
    train, val = data.train.counts(n), data.validation.counts(n)
    source = (
        f"Training images from `{data.train.source}`, validation images from `{data.validation.source}`, "
        f"at {cfg.data.image_size} px."
    )
    lines = ["## Data", "", source, "", "| class | train | share | validation |", "| --- | ---: | ---: | ---: |"]
    total = sum(train)
    lines += [
        f"| {name} | {t} | {t / total:.0%} | {v} |" for name, t, v in zip(data.class_names, train, val, strict=True)
    ]
    lines.append(f"| **total** | **{total}** | | **{sum(val)}** |")
    smallest = min(train)
    ratio = max(train) / smallest if smallest else float("inf")
    balance = "balanced" if ratio <= 1.5 else "imbalanced: accuracy alone flatters the larger classes"
    lines += ["", f"Class balance (largest / smallest training class): {ratio:.2f}, {balance}."]
    t = cfg.train
    weights = describe_weights(t.class_weight, data.class_names, class_weights(t.class_weight, data.class_names, train))
    lines += ["", f"Loss: cross-entropy, label smoothing {t.label_smoothing:g}; class weights {weights}."]
    return "\n".join(lines)


def phases_section(cfg: Config, rows: list[dict]) -> str:
    unfreeze = resolve_unfreeze_after(cfg.train.finetune.unfreeze_after, cfg.model.weights is not None, cfg.model.name)
    weights = cfg.model.weights if cfg.model.weights is not None else "none (random init)"
    lines = [
        "## Phases",
        "",
        f"{BACKBONES[cfg.model.name].display}, weights {weights}, dropout {cfg.model.dropout}.",
        "",
        "| phase | epochs | optimizer | learning rate | schedule | trains | seconds |",
        "| --- | ---: | --- | ---: | --- | --- | ---: |",
    ]
    for name in ("head", "finetune"):
        phase = getattr(cfg.train, name)
        if phase.epochs == 0:
            continue
        trains = (
            "the head (base frozen)"
            if name == "head"
            else (f"layers after {unfreeze}" if unfreeze else "the whole network")
        )
        seconds = sum(r["seconds"] for r in rows if r["phase"] == name and not math.isnan(r["seconds"]))
        lines.append(
            f"| {name} | {phase.epochs} | {phase.optimizer} | {phase.lr:g} | {phase.schedule} "
            f"| {trains} | {seconds:.0f} |"
        )
    return "\n".join(lines)


def result_section(cfg: Config, state: TrainState, last_logs: dict, rows: list[dict]) -> str:
    monitor = cfg.checkpoint.monitor
    epoch = best_epoch(rows, monitor, state.best)
    at = f" at epoch {epoch}" if epoch else ""
    best = "n/a" if state.best is None else f"{state.best:.4f}"
    lines = [
        "## Result",
        "",
        f"- epochs trained: {state.epoch}",
        f"- best {monitor}: {best}{at} (checkpoint `{state.best_stem}`)",
        "- final: " + ", ".join(f"{k} {fmt(last_logs.get(k))}" for k in METRICS),
    ]
    resumes = [r for r in rows if r["resumed_from"]]
    if resumes:
        lines.append(
            "- resumed: " + "; ".join(f"from `{r['resumed_from']}` (after {r['resumed_at']:g} epochs)" for r in resumes)
        )
    return "\n".join(lines)


def best_epoch(rows: list[dict], monitor: str, best: float | None) -> int | None:
    """The epoch whose logged value is the best one (history.csv keeps every digit, so equality holds)."""
    if best is None:
        return None
    return next((r["epoch"] for r in rows if r.get(monitor) == best), None)


def confusion_section(matrix: np.ndarray, names: list[str]) -> str:
    scores = class_scores(matrix)
    present = scores.support > 0  # as the logged val_macro_f1 and val_balanced_accuracy count
    summary = (
        f"Accuracy {accuracy(matrix):.4f} ({int(np.trace(matrix))} of {int(matrix.sum())}), "
        f"macro-F1 {scores.f1[present].mean():.4f}, balanced accuracy {scores.recall[present].mean():.4f}; "
        "rows are the true class, columns the predicted one."
    )
    lines = [
        "## Validation confusion matrix (final model)",
        "",
        summary,
        "",
        f"| {CORNER} | " + " | ".join(names) + " |",
        "| --- | " + " | ".join("---:" for _ in names) + " |",
    ]
    lines += [
        f"| {name} | " + " | ".join(str(int(v)) for v in row) + " |" for name, row in zip(names, matrix, strict=True)
    ]
    lines += ["", "| class | precision | recall | F1 | images |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += [
        f"| {name} | {scores.precision[i]:.3f} | {scores.recall[i]:.3f} | {scores.f1[i]:.3f} "
        f"| {int(scores.support[i])} |"
        for i, name in enumerate(names)
    ]
    lines += ["", f"![confusion matrix]({CONFUSION})"]
    return "\n".join(lines)


def files_section(report_dir: Path, cfg: Config) -> str:
    model = Path(cfg.model.save_path)
    lines = [
        "## Files",
        "",
        f"![training curves]({CURVES})",
        "",
        f"- model: `{model}` (metadata: `{model.with_suffix('.json')}`)",
        f"- checkpoints: `{cfg.checkpoint.dir}/`",
        f"- history, one row per epoch: `{report_dir / HISTORY}`",
        f"- curves: `{report_dir / CURVES}`; confusion matrix: `{report_dir / CONFUSION}`",
        f"- TensorBoard logs: `{report_dir / TENSORBOARD}/` (`make tensorboard`)",
    ]
    return "\n".join(lines)


def fmt(value) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"
