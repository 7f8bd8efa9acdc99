"""A kill campaign: SIGKILL a real run at random moments, rerun the same command each time, and
it must end with the weights of an uninterrupted run.

The named hooks (PIPELINE_KILL_AT) kill at the points we thought of; these kills land wherever the
clock says. Each one waits for a landmark of the run (a line it prints, a file it starts writing),
then a seeded random delay, then sends SIGKILL from outside. Landmarks only spread the kills over
the stages whatever the machine's speed: the head phase, start-up and restore, checkpoint writes,
the fine-tune phase (the smoke experiment's top blocks, whose BatchNorm statistics and optimizer
slots train there; test_e2e.py kills a whole-base fine-tune) and the final save. After each kill
the test records what was in progress, from the files a write leaves while it runs and the last
phase line; `pytest -s` prints it, a failure shows it.

The smoke configuration with checkpoints after every batch (3 per epoch, one epoch per phase),
and the default checkpoint settings, asynchronous h5, since they are what users run.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from conftest import REPO, cli_env, final_weights, largest_difference, run_args

pytestmark = pytest.mark.e2e
SEED = 13  # of the kill delays; another seed moves every kill
ARGS = ["checkpoint.every_batches=1"]
EPOCH_END = r"^\d+/\d+ - .*val_accuracy"  # Keras's line at an epoch's end, validation done


@dataclass
class Kill:
    """Wait for line `after` (a regex) of this run and then, if `writing` names one, for a file of that
    glob in the checkpoint folder (or in the model folder for the final save); then kill after a
    random delay of up to `longest` seconds."""

    aim: str
    after: str
    longest: float
    writing: str | None = None


# In order, one per run of the command. Each landmark comes in every run whatever the earlier kills
# saved (a later landmark such as "the next checkpoint line" rather than a particular checkpoint).
CAMPAIGN = [
    Kill("the head phase: its trace and first steps", r"^head epoch", 2.0),
    Kill("a head checkpoint write", r"^head epoch", 0.1, writing=".incoming-*"),
    Kill("the head phase after a mid-epoch checkpoint", r"^checkpoint: ", 1.0),
    Kill("start-up: building the model, restoring the checkpoint", r"^data: checked", 2.0),
    Kill("the epoch-end checkpoint write", EPOCH_END, 0.1, writing=".incoming-*"),
    Kill("the fine-tune phase: its trace and first steps", r"^finetune epoch", 4.0),
    Kill("the fine-tune phase after its first checkpoint", r"^checkpoint: .*transfer_02-", 1.0),
    Kill("the final save", r"^resume: ", 0.1, writing="final"),
]
# What a write in progress leaves: checkpoint.py's scratch folder, intent record, temporary files.
IN_PROGRESS = (".incoming-*", "*.pending.json", ".*.tmp-*")


class Run:
    """One `python -m pipeline` of the campaign; its output read line by line as it comes."""

    def __init__(self, args: list[str]):
        self.started = time.monotonic()
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", *args],
            cwd=REPO,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group: the kill reaches anything it started
        )
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def seen(self, pattern: str) -> bool:
        return any(re.search(pattern, line) for line in list(self.lines))

    def finish(self, timeout: float = 900) -> int:
        self.proc.wait(timeout=timeout)
        self.reader.join()
        return self.proc.returncode

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


def wait_and_kill(run: Run, kill: Kill, delay: float, ckpt: Path, model: Path, timeout: float = 900) -> float | None:
    """SIGKILL `run` `delay` s after `kill`'s landmark: the moment (s since its start), or None if it ended first."""
    deadline = time.monotonic() + timeout
    while run.proc.poll() is None and time.monotonic() < deadline:
        if run.seen(kill.after) and (kill.writing is None or writing(run, kill.writing, ckpt, model)):
            time.sleep(delay)
            moment = time.monotonic() - run.started
            os.killpg(run.proc.pid, signal.SIGKILL)
            run.finish()
            return moment
        time.sleep(0.005)
    return None


def writing(run: Run, pattern: str, ckpt: Path, model: Path) -> bool:
    if pattern == "final":  # model_file/save.py writes the final model under a name with its process id
        return (model / f".final.tmp-{run.proc.pid}.h5").exists()
    return any(ckpt.glob(pattern))


def what_was_hit(run: Run, ckpt: Path, model: Path) -> tuple[str, bool]:
    """(the stage the kill hit, whether a checkpoint write of this run was in progress)."""
    since = time.time() - (time.monotonic() - run.started)  # this run's start, on the files' clock
    left = [p for pattern in IN_PROGRESS for p in ckpt.glob(pattern) if p.stat().st_mtime >= since]
    if (model / f".final.tmp-{run.proc.pid}.h5").exists():
        return "final save", bool(left)
    phases = [line.split()[0] for line in run.lines if re.match(r"^(head|finetune) epoch", line)]
    return (f"{phases[-1]} phase" if phases else "start-up"), bool(left)


def optimizer_slots(model_file: Path) -> dict[str, np.ndarray]:
    """Every optimizer variable a final .h5 holds (its step count, Adam's moments), by variable name."""
    slots: dict[str, np.ndarray] = {}

    def keep(name: str, item) -> None:
        # Without the optimizer's own name (adam, adam_1, ...), which counts the optimizers a process made.
        if isinstance(item, h5py.Dataset):
            slots[name.split("/", 1)[-1]] = item[()]

    with h5py.File(model_file, "r") as f:
        f["optimizer_weights"].visititems(keep)
    return slots


class Reference:
    """The uninterrupted run of the same command, started at once so that it trains beside the
    campaign (much of a run is single-threaded start-up and tracing, which leaves a core idle)."""

    def __init__(self, tmp: Path, data: Path):
        self.tmp = tmp
        self.run = Run(run_args(tmp, data, *ARGS))
        self.done = False

    def result(self) -> Path:
        if not self.done:
            assert self.run.finish() == 0, self.run.output
            self.done = True
        return self.tmp


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data):
    ref = Reference(tmp_path_factory.mktemp("uninterrupted"), tiny_data)
    yield ref
    if ref.run.proc.poll() is None:  # a test failed before it waited
        os.killpg(ref.run.proc.pid, signal.SIGKILL)
        ref.run.finish()


def test_random_sigkills_over_every_stage_end_with_the_uninterrupted_weights(reference, tmp_path, tiny_data):
    args = run_args(tmp_path, tiny_data, *ARGS)
    ckpt, model = tmp_path / "ckpt", tmp_path / "model"
    rng = random.Random(SEED)
    delays = [rng.uniform(0, kill.longest) for kill in CAMPAIGN]
    report, runs, hits = [], [], []
    started, cpu = time.monotonic(), os.times()
    for n, (kill, delay) in enumerate(zip(CAMPAIGN, delays, strict=True), 1):
        run = Run(args)
        runs.append(run)
        moment = wait_and_kill(run, kill, delay, ckpt, model)
        assert moment is not None, "\n".join([*report, f"run {n} ended before kill {n} ({kill.aim}):", run.output])
        stage, in_write = what_was_hit(run, ckpt, model)
        hits.append((stage, in_write))
        report.append(
            f"kill {n}: {moment:6.2f} s into run {n}, {delay:.2f} s after its landmark (aimed at {kill.aim}): "
            f"hit the {stage}{', a checkpoint write in progress' if in_write else ''}; "
            f"last line: {run.lines[-1] if run.lines else '(none)'}"
        )
        print(report[-1], flush=True)
    last = Run(args)
    runs.append(last)
    assert last.finish() == 0, "\n".join([*report, last.output])
    used = os.times()
    report.append(
        f"run {len(runs)} finished; the campaign took {time.monotonic() - started:.0f} s, its runs "
        f"{used.children_user + used.children_system - cpu.children_user - cpu.children_system:.0f} s of CPU"
    )
    print(report[-1], flush=True)
    story = "\n".join(report)

    stages = {stage for stage, _ in hits}
    assert {"head phase", "finetune phase", "final save"} <= stages, story
    assert any(in_write for _, in_write in hits), f"no kill landed in a checkpoint write\n{story}"
    resumed_inside = [r for r in runs if r.seen(r"^resume: from checkpoint transfer_02-\S*-b\d+")]
    assert resumed_inside, f"no run resumed inside the fine-tune phase\n{story}"

    reference_dir = reference.result()
    difference = largest_difference(final_weights(reference_dir), final_weights(tmp_path))
    assert difference <= 1e-5, f"{difference}\n{story}"
    ours, theirs = optimizer_slots(model / "final.h5"), optimizer_slots(reference_dir / "model" / "final.h5")
    assert ours.keys() == theirs.keys()
    assert largest_difference(list(ours.values()), list(theirs.values())) <= 1e-5, story
    assert not [p for pattern in IN_PROGRESS for p in ckpt.glob(pattern)], "a write's leftovers remain"
    assert not list(model.glob(".*tmp*")), "the final save's temporary file remains"


def test_the_comparison_sees_a_single_lost_training_step(reference):
    """The control: the uninterrupted run one batch before its end (its last mid-epoch checkpoint)
    is far more than the tolerance from its end, so a resume that lost or repeated one batch fails."""
    run_dir = reference.result()
    (one_short,) = (run_dir / "ckpt").glob("transfer_02-*-b00002.h5")
    weights = [w.numpy() for w in keras.models.load_model(one_short, compile=False).weights]
    difference = largest_difference(final_weights(run_dir), weights)
    assert difference > 100 * 1e-5, difference
