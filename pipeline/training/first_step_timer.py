"""How long a run takes from the command to its first training step (imports, checks, build, trace)."""

from __future__ import annotations

import os
import time

import keras

_IMPORTED = time.time()


def seconds_since_start() -> float:
    """Seconds since this process was started (Linux /proc), else since this module was imported."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        # Field 22 of /proc/<pid>/stat is the start time in clock ticks after boot.
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time() - _IMPORTED


class FirstStepTimer(keras.callbacks.Callback):
    """Prints, once per process, when the first training step has finished."""

    reported = False

    def on_train_batch_end(self, batch, logs=None):
        if not FirstStepTimer.reported:
            FirstStepTimer.reported = True
            print(f"first training step done {seconds_since_start():.1f} s after the command started", flush=True)
