"""Each job of a sweep trains in a fresh child process.

In one process, every InceptionV3 job leaves memory behind even after
keras.backend.clear_session() and gc: TensorFlow keeps the traced training
functions' captured variable handles, so each job of a sweep peaks higher than
the one before (figures: docs/sweeps-and-clusters.md). A fresh child process per
job returns all of it to the system; the sweep process itself never starts TensorFlow.

The child inherits the terminal, so its output reads as before. It dies with
the sweep process (kill -9 leaves no orphan); SIGTERM/SIGINT are passed on so
the job checkpoints and stops as a single run does.
"""

from __future__ import annotations

import pickle
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from pipeline.atomic_file import replaced
from pipeline.distribute.local_workers import die_with_parent
from pipeline.errors import JobPreempted, JobUserError
from pipeline.process_exit import run_then_end


def run_in_child(config, resume: bool | str | None, run_dir: Path) -> dict:
    """train.run(config, resume, run_dir) in a fresh `python -m pipeline.sweep.job_process`; its outcome,
    or its error re-raised here.

    A plain subprocess, not multiprocessing: inside a joblib (loky) worker,
    multiprocessing's children inherit a start method they cannot load.
    """
    with tempfile.TemporaryDirectory(prefix="pipeline-job-") as scratch:
        request, answer = Path(scratch) / "job.pickle", Path(scratch) / "result.pickle"
        request.write_bytes(pickle.dumps((config, resume, str(run_dir))))
        child = subprocess.Popen(
            [sys.executable, "-m", "pipeline.sweep.job_process", str(request), str(answer)], preexec_fn=die_with_parent
        )

        def forward(signum: int, _frame: object) -> None:
            if child.poll() is None:  # still running: pass it on, so the job checkpoints and stops
                child.send_signal(signum)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            child.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        # (kind, payload): the outcome's dict for "ok", otherwise the message or traceback.
        outcome: tuple[str, Any] = (
            pickle.loads(answer.read_bytes())
            if answer.is_file()
            else ("crash", f"it ended with code {child.returncode} and no result (killed?)")
        )
    kind, payload = outcome
    if kind == "ok":
        return payload
    if kind == "user_error":
        raise JobUserError(payload)
    if kind == "preempted":
        raise JobPreempted(payload)
    raise RuntimeError(f"the job's process failed:\n{payload}")


def train_in_child(request: Path, answer: Path) -> None:
    """The child's side: run the job, leave (kind, payload) in `answer`."""
    from pipeline.quiet import import_tensorflow_quietly
    from pipeline.sweep.memory import peak_memory_mb

    config, resume, run_dir = pickle.loads(request.read_bytes())
    import_tensorflow_quietly()
    from pipeline.errors import USER_ERRORS, Preempted
    from pipeline.train import run

    result: tuple[str, dict | str]
    try:
        result = ("ok", {**run(config, resume, Path(run_dir)), "peak_mb": peak_memory_mb()})
    except Preempted as err:
        result = ("preempted", str(err))
    except USER_ERRORS as err:
        result = ("user_error", str(err))
    except Exception:  # everything else reaches the sweep with its traceback
        result = ("crash", traceback.format_exc())
    with replaced(answer) as partial:  # the parent reads no half-written answer if we die mid-write
        partial.write_bytes(pickle.dumps(result))


if __name__ == "__main__":
    run_then_end(lambda: train_in_child(Path(sys.argv[1]), Path(sys.argv[2])))  # process_exit.py
