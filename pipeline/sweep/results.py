"""What a sweep leaves behind: each job's result, and one summary.csv per sweep.

Each job writes result.json into its own output folder; at the end of the
sweep the summary is built from those files, so it works with any launcher
(jobs in this process, in joblib workers, or on a cluster) and a rerun of an
interrupted sweep summarises finished and resumed jobs alike. multirun/ also
holds the jobs of every earlier sweep: each result.json names the sweep that
wrote it (an id the sweep process hands its jobs in the environment), and
the summary lists this sweep's jobs only, so an old failed job cannot fail
every later sweep.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import uuid
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from pipeline.atomic_file import replaced, write_json

RESULT = "result.json"
SUMMARY = "summary.csv"
COLUMNS = ("job", "overrides", "status", "monitor", "best", "last", "epochs", "seconds", "peak_mb", "model")


SWEEP_ID = "PIPELINE_SWEEP_ID"  # set by the sweep process for its jobs (SweepSummary.on_multirun_start)


def write_result(run_dir: Path, overrides: list[str], outcome: dict) -> None:
    """result.json in `run_dir`, replaced in one step: a full disk or a kill leaves the previous one whole."""
    run_dir.mkdir(parents=True, exist_ok=True)
    # Atomic: the summary of a sweep interrupted mid-write must not meet half a file.
    write_json(run_dir / RESULT, {"overrides": overrides, "sweep": os.environ.get(SWEEP_ID), **outcome})


def collect_results(sweep_dir: Path, sweep_id: str | None = None) -> list[dict]:
    """The results under `sweep_dir`; with `sweep_id`, only those of that sweep's jobs."""
    rows = []
    for path in sorted(Path(sweep_dir).glob(f"*/{RESULT}")):
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError) as err:  # an older version wrote it in place and was cut short
            print(f"warning: skipping unreadable {path}: {err}")
            continue
        if sweep_id is not None and result.get("sweep") != sweep_id:
            continue
        rows.append({"job": path.parent.name, **result, "overrides": " ".join(result.get("overrides", []))})
    return rows


def write_summary(sweep_dir: Path, sweep_id: str | None = None) -> list[dict]:
    """summary.csv in the sweep folder, one row per job of the sweep `sweep_id`; printed as a table too."""
    rows = collect_results(sweep_dir, sweep_id)
    with replaced(Path(sweep_dir) / SUMMARY) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print_table(rows)
    print(f"sweep summary: {Path(sweep_dir) / SUMMARY}")
    return rows


def print_table(rows: list[dict]) -> None:
    shown = ("overrides", "status", "best", "last", "epochs", "seconds", "peak_mb")
    cells = [[fmt(row.get(c)) for c in shown] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(shown)]
    for line in [list(shown), *cells]:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)))


def fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))


class SweepSummary(Callback):
    """Hydra callback (conf/config.yaml: hydra.callbacks) that writes the summary at the end of a sweep."""

    sweep_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        # Jobs inherit the environment, whether they run in this process, in
        # joblib's workers (started after this) or as cluster jobs submitted from here.
        self.sweep_id = os.environ[SWEEP_ID] = uuid.uuid4().hex

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        os.environ.pop(SWEEP_ID, None)
        rows = write_summary(Path(config.hydra.sweep.dir), self.sweep_id)
        failed = [row for row in rows if str(row.get("status", "")).startswith("error")]
        if failed:
            print(f"error: {len(failed)} of {len(rows)} jobs failed (see their status above)", file=sys.stderr)
            sys.exit(2)
