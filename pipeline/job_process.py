"""Each job of a sweep trains in a fresh child process.

Measured: in one process, every InceptionV3 job left about 140 MB behind even
after keras.backend.clear_session() and gc: TensorFlow keeps the traced
training functions' captured variable handles (388 per model), so a 6-job
sweep's last job peaked 69% above its first. A spawned child per job returns
all of it to the system; the sweep process itself never starts TensorFlow.

The child inherits the terminal, so its output reads as before. It dies with
the sweep process (kill -9 leaves no orphan); SIGTERM/SIGINT are passed on so
the job checkpoints and stops as a single run does.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import traceback
from pathlib import Path
from typing import Optional

from .local_workers import die_with_parent


class JobUserError(ValueError):
    """The job stopped on an error the user can fix (its message says how)."""


class JobPreempted(RuntimeError):
    """The job checkpointed and stopped on SIGTERM."""


def run_in_child(config, resume: Optional[bool], run_dir: Path) -> dict:
    """train.run(config, resume, run_dir) in a spawned process; its outcome, or its error re-raised here."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=train_in_child, args=(config, resume, str(run_dir), sender), daemon=False)
    child.start()
    sender.close()
    previous = {sig: signal.signal(sig, lambda signum, _f: child.is_alive() and forward(child, signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        kind, payload = receive(receiver)
    finally:
        child.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if kind == "ok":
        return payload
    if kind == "user_error":
        raise JobUserError(payload)
    if kind == "preempted":
        raise JobPreempted(payload)
    raise RuntimeError(f"the job's process failed (exit code {child.exitcode}):\n{payload}")


def forward(child, signum: int) -> None:
    os.kill(child.pid, signum)


def receive(receiver) -> tuple:
    """The child's (kind, payload), or a crash if it died without sending one (killed, say)."""
    try:
        return receiver.recv()
    except EOFError:
        return "crash", "it ended without a result (killed?)"


def train_in_child(config, resume: Optional[bool], run_dir: str, sender) -> None:
    die_with_parent()
    from .memory import peak_memory_mb
    from .quiet import import_tensorflow_quietly

    import_tensorflow_quietly()
    from .batch_saver import Preempted
    from .train import USER_ERRORS, run

    try:
        outcome = run(config, resume, Path(run_dir))
        sender.send(("ok", {**outcome, "peak_mb": peak_memory_mb()}))
    except Preempted as err:
        sender.send(("preempted", str(err)))
    except USER_ERRORS as err:
        sender.send(("user_error", str(err)))
    except BaseException:  # noqa: BLE001 - everything else reaches the sweep with its traceback
        sender.send(("crash", traceback.format_exc()))
    finally:
        sender.close()
