"""One training run at a time per checkpoint folder: an exclusive flock on `<checkpoint.dir>/.lock`.

A second process in the same folder (a double start, an overlapping SLURM
requeue, an orphaned sweep job) would delete the first one's unfinished save
(clean_leftovers), prune its checkpoints and truncate its history.csv. The
lock is taken before any of that and held to the end of the run; the holder's
pid is written into the file so the refusal can name it. The kernel releases a
flock when its holder dies, even by kill -9, so a lock left by a dead run never
blocks the next. Readers (predict, evaluate, export) read committed
checkpoints only and take no lock. TensorFlow-free: the entry point takes it
before TensorFlow starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from pipeline.config import Config
from pipeline.distribute.tf_config import read_worker_role
from pipeline.errors import CheckpointInUse

LOCK_FILE = ".lock"
ATTEMPTS = 10  # a lock file removed by a finishing holder between our open and flock: open the new one


def lock_for_run(cfg: Config) -> contextlib.AbstractContextManager:
    """The lock a training process holds on cfg.checkpoint.dir for its whole run.

    In a multi-worker run only the chief writes checkpoints: the other workers
    only read them (their copies go to a scratch folder) and take no lock.
    Under distribute.local_workers the launching process holds the lock for
    its workers, so the chief runs under its parent's lock.
    """
    directory = Path(cfg.checkpoint.dir)
    if cfg.distribute.strategy == "multi_worker" and os.environ.get("TF_CONFIG"):
        if not read_worker_role().is_chief:
            return contextlib.nullcontext()
        return hold_lock(directory, parent_may_hold=True)
    return hold_lock(directory)


@contextlib.contextmanager
def hold_lock(directory: Path, parent_may_hold: bool = False) -> Iterator[None]:
    """Hold the exclusive lock of `directory` (created if need be) while the block runs.

    Raises CheckpointInUse naming the holder's pid when a live process holds it,
    unless `parent_may_hold` and that process is this one's parent. The lock
    file, and the folders made for it if they stayed empty, are removed at the
    end, so a run that wrote nothing leaves every folder as it was.
    """
    directory = Path(directory)
    made = missing_folders(directory)
    fd = take(directory, parent_may_hold)
    try:
        yield
    finally:
        if fd is not None:
            # Unlinked while still held: a process that opened this file meanwhile
            # sees it is no longer the lock file (take) and opens the new one.
            (directory / LOCK_FILE).unlink(missing_ok=True)
            os.close(fd)
        for folder in made:
            try:
                folder.rmdir()
            except OSError:  # not empty (the run saved something), or gone
                break


def take(directory: Path, parent_may_hold: bool) -> int | None:
    """The locked file's descriptor with this pid written in; None if the parent holds the lock."""
    path = directory / LOCK_FILE
    for _ in range(ATTEMPTS):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # a finishing run removed its empty folder meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_pid(fd)
            os.close(fd)
            if parent_may_hold and holder == os.getppid():
                return None
            who = f"process {holder}" if holder else "another process"
            raise CheckpointInUse(
                f"checkpoint folder {directory} is in use by {who} (another run with the same "
                "checkpoint.dir); wait for it to end or stop it, or set checkpoint.dir to another folder"
            ) from None
        if is_current(fd, path):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)
    raise RuntimeError(f"could not lock {path}: its lock file kept being replaced")


def is_current(fd: int, path: Path) -> bool:
    """Whether `fd` is still the file at `path` (not one a finishing holder unlinked)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):  # the holder has locked but not yet written its pid
        return None


def missing_folders(directory: Path) -> list[Path]:
    """`directory` and its parents that do not exist yet, deepest first."""
    missing = []
    while not directory.exists() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    return missing
