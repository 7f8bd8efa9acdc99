"""Every error a user can fix, the errors that mean "stopped on SIGTERM", and which is which.

One module, importing nothing, so the entry point can sort an error without
starting TensorFlow: a user error ends with one `error:` line and exit code 2,
a preemption with its message and the shell's code for SIGTERM, anything else
is a bug and keeps its traceback. Each message names the key or the file and
says what to do.
"""

from __future__ import annotations

import errno

# ---- errors a user can fix ------------------------------------------------


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key."""


class DataError(ValueError):
    """A data folder that cannot be trained on; the message names it."""


class LabelFileError(DataError):
    """Bad rows or columns in data.labels_csv / data.validation_csv; the message names file, line and column.

    Found while the config is validated, before the run's folder or checkpoints are written to.
    """


class TooManyPixels(ValueError):
    """An image whose header declares more pixels than data.max_pixels."""

    def __init__(self, width: int, height: int, max_pixels: int):
        self.pixels = width * height
        super().__init__(f"{width}x{height} = {self.pixels:,} pixels, more than data.max_pixels={max_pixels:,}")


class WeightsError(RuntimeError):
    """Pretrained weights that cannot be had; the message says what to do."""


class CheckpointError(RuntimeError):
    """No usable checkpoint where one is needed, or one from another run."""


class IncompatibleCheckpoint(CheckpointError):
    """A checkpoint whose files verify but whose optimizer state does not fit this run's model:
    a setting changed (optimizer, schedule, trainable layers, precision), not damage."""


class DiskFull(RuntimeError):
    """No space left on the device a run writes to; the message names what was being written."""


class CheckpointInUse(RuntimeError):
    """Another live process holds the checkpoint folder's lock (checkpoints/lock.py)."""


class CommandError(ValueError):
    """Bad input to a stand-alone command (predict, evaluate, export); the message names the file or folder."""


class ModelFileError(CommandError):
    """A model path that cannot be used; the message names it."""


class JobUserError(ValueError):
    """A sweep job's child process stopped on an error the user can fix (its message says how)."""


# ---- stopped on SIGTERM ---------------------------------------------------


class Preempted(RuntimeError):
    """Training stopped on SIGTERM after a checkpoint was committed."""


class JobPreempted(RuntimeError):
    """A sweep job's child process checkpointed and stopped on SIGTERM."""


# ---- several machines -----------------------------------------------------


class WorkerFailed(RuntimeError):
    """A worker process ended with a non-zero code; `exit_code` is the one to end with."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# What `python -m pipeline` prints as one `error:` line (exit code 2), and what a
# sweep job's child reports as a user error rather than a crash. TooManyPixels
# never reaches it (the image check turns it into a verdict); CommandError is
# the stand-alone commands' own (cli.run_command).
USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    DataError,
    WeightsError,
    CheckpointError,
    CheckpointInUse,
    DiskFull,
    JobUserError,
)
PREEMPTIONS: tuple[type[Exception], ...] = (Preempted, JobPreempted)


def is_user_error(err: BaseException) -> bool:
    """An error whose message tells the user what to fix: no traceback needed."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:  # writing the run's record (.hydra/, result.json)
        return True
    return isinstance(err, USER_ERRORS)


def is_preemption(err: BaseException) -> bool:
    """Training (or a sweep job) checkpointed and stopped on SIGTERM; the same command continues it."""
    return isinstance(err, PREEMPTIONS)
