"""Whole runs for `make bench`, each a real subprocess: the classic recipe, the pipeline's CLI,
and the pipeline started fresh and on resume (seconds to the first training step)."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from statistics import median

from pipeline.bench.probe import EVENT


@dataclass
class Run:
    """One subprocess: its wall time, its output, and the epochs the probe stamped."""

    seconds: float
    returncode: int
    lines: list[str]
    spawned: float  # time.time() just before the process started
    epochs: list[dict] = field(default_factory=list)  # bench-event dicts, each with its "phase"
    stamps: list[float] = field(default_factory=list)  # time.time() at which each of `lines` arrived
    # CPU seconds the process had used when each line arrived, and in all: unlike wall time,
    # hardly changed by other processes on a busy machine (docs/speed.md: reading the bench)
    cpu_stamps: list[float] = field(default_factory=list)
    cpu_seconds: float = 0.0

    @property
    def first_step(self) -> float | None:
        """Seconds from the command to the first finished training step."""
        steps = [e["first_step"] for e in self.epochs if "first_step" in e]
        return steps[0] - self.spawned if steps else None

    def phase_epochs(self, phase: str) -> list[dict]:
        return [e for e in self.epochs if e["phase"] == phase]


def run_process(
    command: list[str], stop_when: Callable[[str, Run], bool] = lambda line, run: False, log: Path | None = None
) -> Run:
    """Run `command`, stamping its output; SIGKILL it as soon as `stop_when(line, run)` holds.

    The output is kept in `log` for a look at what a figure came from.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")
    cpu_before = children_cpu_seconds()
    spawned = time.time()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = Run(0.0, 0, [], spawned)
    phase = "?"
    assert proc.stdout is not None  # stdout=PIPE above
    try:
        for line in proc.stdout:
            run.lines.append(line.rstrip("\n"))
            run.stamps.append(time.time())
            run.cpu_stamps.append(process_cpu_seconds(proc.pid))
            for name in ("head", "finetune"):
                if line.startswith(f"{name} epoch "):  # printed by train.fit_epoch before each fit
                    phase = name
            if line.startswith(EVENT):
                run.epochs.append({**json.loads(line[len(EVENT) :]), "phase": phase})
            if stop_when(line, run):
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait()
    finally:
        proc.kill()
    run.seconds, run.returncode = time.time() - spawned, proc.returncode
    run.cpu_seconds = children_cpu_seconds() - cpu_before
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("\n".join(run.lines) + "\n")
    return run


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process so far (Linux /proc; 0 where there is none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    # after the command name: state is field 3, utime 14, stime 15, cutime 16, cstime 17 (man 5 proc)
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def validation_curve(run: Run, clock: str = "wall") -> list[tuple[float, float]]:
    """(seconds from the command, val_accuracy) for each epoch, from Keras's epoch lines as they arrived.

    Both the pipeline and the classic recipe print Keras's `verbose=2` line after
    each epoch's validation, so this is the same clock for both. clock="cpu":
    the process's CPU seconds at that line instead of the wall clock.
    """
    curve = []
    for i, line in enumerate(run.lines):
        match = VAL_ACCURACY.search(line)
        if match and " - " in line:
            seconds = run.cpu_stamps[i] if clock == "cpu" else run.stamps[i] - run.spawned
            curve.append((seconds, float(match.group(1))))
    return curve


VAL_ACCURACY = re.compile(r"val_accuracy: ([0-9.]+)")


def time_to_accuracy(curve: list[tuple[float, float]], target: float) -> float | None:
    """Seconds from the command to the first epoch whose validation accuracy reaches `target`."""
    return next((seconds for seconds, accuracy in curve if accuracy >= target), None)


def exact_overrides() -> list[str]:
    """The exact, uncached path: what the defaults were before caching became one (docs/speed.md)."""
    return ["train.head.cached_views=0", "train.finetune.cached_views=0", "train.finetune.reuse_head_views=false"]


def scratch_overrides() -> list[str]:
    """From random weights, the classic recipe's cut, and the speed options switched on by hand."""
    return ["model.weights=null", "train.finetune.unfreeze_after=mixed8", *speed_overrides()]


def speed_overrides() -> list[str]:
    """The pipeline's speed options as the bench runs them from random weights (docs/speed.md)."""
    # 2 augmented views computed once at mixed8 and reused by both phases; bf16 where the CPU has it.
    return [
        "train.head.cached_views=2",
        "train.finetune.cached_views=2",
        "train.finetune.reuse_head_views=true",
        f"train.precision={bench_precision()}",
    ]


def bench_precision() -> str:
    """mixed_bfloat16 where the CPU computes bfloat16 natively, else float32."""
    return "mixed_bfloat16" if cpu_has_bf16() else "float32"


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX), where mixed_bfloat16 pays."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pipeline_command(
    data_dir: Path, work: Path, image_size: int, head_epochs: int, finetune_epochs: int, settings: list[str]
) -> list[str]:
    """The pipeline's CLI with the classic recipe's data, size and epochs, plus `settings` (weights and the like)."""
    return [
        sys.executable,
        "-m",
        "pipeline.bench.probe",
        f"data.dir={data_dir}",
        f"data.image_size={image_size}",
        f"train.head.epochs={head_epochs}",
        f"train.finetune.epochs={finetune_epochs}",
        f"checkpoint.dir={work / 'ckpt'}",
        f"model.save_path={work / 'model' / 'final.h5'}",
        f"hydra.run.dir={work / 'outputs'}",
        f"train.cache_dir={work / 'cache'}",  # afresh, in this run's own folder
        *settings,
    ]


def run_pipeline(
    data_dir: Path, work: Path, image_size: int, head_epochs: int, finetune_epochs: int, settings: list[str]
) -> dict:
    command = pipeline_command(data_dir, work, image_size, head_epochs, finetune_epochs, settings)
    run = run_process(command, log=work / "output.log")
    if run.returncode != 0:
        raise RuntimeError("the pipeline run failed:\n" + "\n".join(run.lines[-30:]))
    result = json.loads((work / "outputs" / "result.json").read_text())
    return {"seconds": run.seconds, "val_accuracy": result["last"], "run": run, **curves(run)}


def run_classic(
    data_dir: Path, image_size: int, head_epochs: int, finetune_epochs: int, log: Path, weights: Path | None = None
) -> dict:
    """The classic recipe, saving as the seed's script does: a full model every epoch and the final .h5."""
    run = run_process(
        [
            sys.executable,
            "-m",
            "pipeline.bench.classic_recipe",
            str(data_dir),
            f"--image-size={image_size}",
            f"--head-epochs={head_epochs}",
            f"--finetune-epochs={finetune_epochs}",
            f"--checkpoint-dir={log.parent / 'classic_ckpt'}",
            *([f"--weights={weights}"] if weights else []),
        ],
        log=log,
    )
    if run.returncode != 0:
        raise RuntimeError("the classic recipe failed:\n" + "\n".join(run.lines[-30:]))
    return {
        "seconds": run.seconds,
        "val_accuracy": json.loads(run.lines[-1])["val_accuracy"],
        **curves(run),
    }


def curves(run: Run) -> dict:
    return {"cpu_seconds": run.cpu_seconds, "curve": validation_curve(run), "cpu_curve": validation_curve(run, "cpu")}


def measure_startup(data_dir: Path, work: Path, image_size: int, settings: list[str]) -> dict:
    """Seconds from the command to the first training step: fresh, then resumed from its checkpoint.

    The fresh run is killed once its first checkpoint has committed (the
    `checkpoint:` line), the resumed one once it has trained a step.
    """
    command = pipeline_command(data_dir, work, image_size, 2, 1, settings)
    fresh = run_process(command, stop_when=lambda line, run: line.startswith("checkpoint:"), log=work / "fresh.log")
    resumed = run_process(command, stop_when=lambda line, run: run.first_step is not None, log=work / "resume.log")
    if fresh.first_step is None or resumed.first_step is None or not any("resume: from" in x for x in resumed.lines):
        raise RuntimeError("start-up runs did not reach a training step:\n" + "\n".join(resumed.lines[-30:]))
    return {"fresh": fresh.first_step, "resume": resumed.first_step}


def steady_epoch_seconds(run: Run, phase: str) -> float | None:
    """Median seconds from one epoch's start to the next's, skipping the first (tracing).

    Epoch start to epoch start includes training, validation and the checkpoint:
    the end-to-end cost of an epoch of that phase.
    """
    starts = [e["start"] for e in run.phase_epochs(phase)]
    gaps = [b - a for a, b in pairwise(starts[1:])]
    return median(gaps) if gaps else None


def epoch_breakdown(run: Run, phase: str) -> dict | None:
    """Median seconds of an epoch's parts, skipping the first epoch (tracing).

    start: fit's set-up until the first step is done; train: the remaining
    steps; validation; between: from the end of fit to the next epoch's start
    (the checkpoint's snapshot, the next fit's preparations).
    """
    epochs = run.phase_epochs(phase)[1:]
    if len(epochs) < 2:
        return None
    parts = {
        "start": [e["first_step"] - e["start"] for e in epochs],
        "train": [e["last_step"] - e["first_step"] for e in epochs],
        "validation": [e["end"] - e["last_step"] for e in epochs],
        "between": [b["start"] - a["end"] for a, b in pairwise(epochs)],
    }
    return {**{k: median(v) for k, v in parts.items()}, "steps": epochs[0]["steps"]}
