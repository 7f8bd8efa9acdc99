"""Peak memory of one job, for sweeps that run many jobs in one process.

Linux keeps a process's peak resident size (VmHWM) and lets the process reset
it (writing 5 to /proc/self/clear_refs), so each job's own peak can be read
exactly, without a sampling thread. Elsewhere both functions return None.
"""

from __future__ import annotations

from pathlib import Path


def reset_peak_memory() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory_mb() -> float | None:
    """The peak resident memory since the last reset, in MiB."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)  # reported in kB
    return None
