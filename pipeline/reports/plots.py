"""The PNG figures: training curves and a confusion matrix.

Drawn on matplotlib's Agg canvas through `Figure` directly, not pyplot: no
display is needed (servers, ssh) and no global pyplot state is touched, so
sweep jobs in one process cannot draw into each other's figures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline.atomic_file import replaced

PHASE_COLOURS = {"head": "#dbe9f6", "finetune": "#fde6cc"}


def save_figure(fig: Figure, path: Path) -> Path:
    """Under a temporary name, then renamed: a reader never sees half a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def draw_curves(rows: list[dict], path: Path) -> Path:
    """Loss and accuracy per epoch, training and validation, phases shaded, resume points marked."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    epochs = np.array([row["epoch"] for row in rows])
    for ax, metric in zip(fig.subplots(1, 2), ("loss", "accuracy"), strict=True):
        shade_phases(ax, rows)
        if rows:
            ax.plot(epochs, [row[metric] for row in rows], "o-", label=f"training {metric}")
            ax.plot(epochs, [row["val_" + metric] for row in rows], "s--", label=f"validation {metric}")
        else:
            ax.text(0.5, 0.5, "no epochs recorded", ha="center", va="center", transform=ax.transAxes)
        for row in rows:
            if row["resumed_from"]:
                ax.axvline(
                    row["resumed_at"] + 0.5,
                    color="crimson",
                    linestyle=":",
                    linewidth=1.5,
                    label="resumed" if row is first_resume(rows) else None,
                )
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        if rows:
            ax.set_xticks(epochs)
            ax.legend(fontsize="small")
    return save_figure(fig, path)


def first_resume(rows: list[dict]):
    return next((row for row in rows if row["resumed_from"]), None)


def shade_phases(ax, rows: list[dict]) -> None:
    """A band behind each phase's epochs (epoch k spans k-0.5 to k+0.5), named once."""
    named = set()
    for row in rows:
        phase = row["phase"]
        ax.axvspan(
            row["epoch"] - 0.5,
            row["epoch"] + 0.5,
            color=PHASE_COLOURS.get(phase, "#eeeeee"),
            linewidth=0,
            label=f"{phase} phase" if phase not in named else None,
        )
        named.add(phase)


def draw_confusion(matrix: np.ndarray, names: list[str], path: Path, title: str = "confusion matrix") -> Path:
    """Counts in a grid, rows the true class and columns the predicted one, darker for more."""
    n = len(names)
    size = max(4.0, 1.0 + 0.6 * n)
    fig = Figure(figsize=(size + 1, size), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax, shrink=0.8, ticks=MaxNLocator(integer=True))
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = matrix.max(initial=0) / 2
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(int(count)), ha="center", va="center", color="white" if count > threshold else "black")
    return save_figure(fig, path)
