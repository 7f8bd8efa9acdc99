"""Folder names of runs and sweep jobs, made from their overrides.

outputs/<name>/, multirun/<name>/, ckpt/<name>/ and model/<name>/ are named from
the command's overrides (Hydra's override_dirname, without the keys that
conf/config.yaml excludes: paths and the epochs), not from the clock, so the
same command finds its folders again. A file name holds at most 255 bytes,
which two absolute paths or a few of Optuna's 17-digit floats exceed: such a
name is shortened (long values keep their end, floats four digits) and ends in
a digest of all the overrides, so it stays unique and the same on every run.
A name that fits is kept as it is, so earlier runs' folders are found again.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

MAX_NAME_BYTES = 255  # NAME_MAX of Linux's and macOS's file systems
VALUE_BYTES = 20  # a longer value keeps its last bytes: a path's last folder or file name
# Left out of job names since sweeps train longer by raising them (conf/config.yaml:
# override_dirname.exclude_keys); older job folders still have them.
EPOCH_KEYS = ("train.head.epochs", "train.finetune.epochs")


def run_name(override_dirname: str) -> str:
    """A folder name for a run from its overrides: one path level, never empty, at most 255 bytes."""
    name = override_dirname.replace("/", "_") or "default"
    if len(name.encode()) <= MAX_NAME_BYTES:
        return name
    digest = ",digest=" + hashlib.sha256(override_dirname.encode()).hexdigest()[:8]
    room = MAX_NAME_BYTES - len(digest)
    short = ",".join(shorten(item) for item in name.split(","))
    if len(short.encode()) > room:  # then the keys too: train.finetune.lr -> finetune.lr
        short = ",".join(shorten(item, key_parts=2) for item in name.split(","))
    return head(short, room) + digest


def shorten(item: str, key_parts: int = 0) -> str:
    """`key=value` with the value made short, and the key cut to its last `key_parts` parts if given.

    A comma inside a value splits it into items here too: the digest keeps such names apart.
    """
    key, equals, value = item.partition("=")
    if key_parts and equals:
        key = ".".join(key.split(".")[-key_parts:])
    if is_long_float(value):
        value = f"{float(value):.4g}"
    elif len(value.encode()) > VALUE_BYTES:
        value = "~" + tail(value, VALUE_BYTES - 1)
    return key + equals + value


def is_long_float(value: str) -> bool:
    try:
        return len(value) > 8 and "." in value and float(value) == float(value)
    except ValueError:
        return False


def head(text: str, size: int) -> str:
    """The first `size` bytes of `text`, not splitting a character."""
    return text.encode()[:size].decode(errors="ignore")


def tail(text: str, size: int) -> str:
    """The last `size` bytes of `text`, not splitting a character."""
    return text.encode()[-size:].decode(errors="ignore")


def without_epochs(name: str) -> str:
    """A job folder name as it is now, from one named before the epochs were left out."""
    kept = [item for item in name.split(",") if item.lstrip("+~").partition("=")[0] not in EPOCH_KEYS]
    return ",".join(kept) or "default"


def adopt_folder_named_with_epochs(folder: Path) -> str | None:
    """Move a sweep job's checkpoints from its folder of before the epochs were left out of names.

    Without this a rerun after the upgrade would start such a job afresh beside
    its own checkpoints. Returns a note for the user, or None when nothing was found.
    """
    folder = Path(folder)
    if folder.exists() or not folder.parent.is_dir():
        return None
    older = sorted(
        p for p in folder.parent.iterdir() if p.is_dir() and p != folder and without_epochs(p.name) == folder.name
    )
    if len(older) > 1:
        return (
            f"{', '.join(map(str, older))} hold this job's checkpoints under names with the epochs; "
            f"this job now uses {folder}: rename the one to continue to that name"
        )
    if not older:
        return None
    os.rename(older[0], folder)
    return f"moved this job's checkpoints from {older[0]} to {folder} (job folders no longer name the epochs)"
