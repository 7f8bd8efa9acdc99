"""Scores of a classifier on labelled images: confusion matrix, accuracy, precision, recall, F1.

Shared by the run report (on the validation set) and `pipeline.evaluate` (on
any class-per-folder tree), so both count the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CORNER = "true \\ predicted"  # the header above the row names


@dataclass
class ClassScores:
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray  # true images per class


def confusion_matrix(true: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts, rows the true class and columns the predicted one."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(true, dtype=np.int64), np.asarray(predicted, dtype=np.int64)), 1)
    return matrix


def accuracy(matrix: np.ndarray) -> float:
    total = matrix.sum()
    return float(np.trace(matrix) / total) if total else float("nan")


def class_scores(matrix: np.ndarray) -> ClassScores:
    """Per class; 0 where undefined (a class never predicted, or with no images), as scikit-learn's zero_division=0."""
    hits = np.diag(matrix).astype(np.float64)
    predicted, support = matrix.sum(axis=0), matrix.sum(axis=1)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, support, out=np.zeros_like(hits), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(hits), where=both > 0)
    return ClassScores(precision, recall, f1, support)


def macro_f1(matrix: np.ndarray) -> float:
    """The mean F1 of the classes with images (format_scores's `macro avg` F1)."""
    scores = class_scores(matrix)
    present = scores.support > 0
    return float(scores.f1[present].mean()) if present.any() else float("nan")


def format_scores(matrix: np.ndarray, names: list[str]) -> str:
    """Accuracy, then a table of precision, recall, F1 and support per class and their macro average."""
    scores = class_scores(matrix)
    width = max(len("macro avg"), *(len(n) for n in names))
    lines = [
        f"accuracy {accuracy(matrix):.4f} ({int(np.trace(matrix))}/{int(matrix.sum())})",
        f"{'class':<{width}}  precision  recall      f1  support",
    ]
    for i, name in enumerate(names):
        lines.append(
            f"{name:<{width}}  {scores.precision[i]:9.4f}  {scores.recall[i]:6.4f}  "
            f"{scores.f1[i]:6.4f}  {int(scores.support[i]):7d}"
        )
    present = scores.support > 0  # classes without images would drag the average down for nothing
    if present.any():
        lines.append(
            f"{'macro avg':<{width}}  {scores.precision[present].mean():9.4f}  "
            f"{scores.recall[present].mean():6.4f}  {scores.f1[present].mean():6.4f}  "
            f"{int(scores.support.sum()):7d}"
        )
    return "\n".join(lines)


def format_confusion(matrix: np.ndarray, names: list[str]) -> str:
    """The matrix as aligned text: one row per true class, one column per predicted class."""
    width = max(len(CORNER), *(len(n) for n in names))
    cell = max(5, *(len(n) for n in names), len(str(int(matrix.max(initial=0)))))
    lines = [f"{CORNER:<{width}}  " + "  ".join(f"{n:>{cell}}" for n in names)]
    for name, row in zip(names, matrix, strict=True):
        lines.append(f"{name:<{width}}  " + "  ".join(f"{int(v):>{cell}}" for v in row))
    return "\n".join(lines)
