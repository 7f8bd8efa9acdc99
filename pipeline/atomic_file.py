"""Files a reader never sees half-written: written under a temporary name beside the target, then renamed.

Every atomic write in the pipeline goes through `replaced` (or `write_json`,
built on it). `durable=True` adds the two fsyncs that make the rename survive
a power cut, not only a kill: the file's bytes before the rename, the folder's
entry after it. Checkpoints, the final model and the feature cache need that;
reports and exports, which a rerun rewrites, do not pay for it. Protocols that
commit several files at once (checkpoints, feature cache entries) keep their
own order of steps and use `fsync_file` and `fsync_dir` from here.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def fsync_file(path: Path) -> None:
    """Push a file's bytes to the disk (a rename alone may reach it before them)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Push a folder's entries to the disk: what makes a rename or a new file in it last."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hidden_name(path: Path, tag: str) -> Path:
    """`.<stem>.<tag><suffix>` beside `path`: hidden, with the same last suffix so that writers which go
    by it (Keras, Matplotlib) pick the format."""
    dot = "" if path.name.startswith(".") else "."
    return path.with_name(f"{dot}{path.stem}.{tag}{path.suffix}")


def temporary_path(path: Path) -> Path:
    """The name this process writes `path` under before renaming it into place."""
    return hidden_name(Path(path), f"tmp-{os.getpid()}")


def remove_leftovers(path: Path) -> None:
    """Remove the temporaries of `path` that writers killed mid-write left behind (any process)."""
    path = Path(path)
    pattern = hidden_name(path.with_name(glob.escape(path.name)), "tmp-*")
    for leftover in path.parent.glob(pattern.name):
        remove(leftover)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def replaced(path: Path, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; once the block ends without error it replaces `path`.

    A failed write is removed and leaves `path` as it was. With `durable` the
    file is fsynced before the rename and its folder after it. The block may
    also write a folder: it then replaces an old folder in two renames (the
    old one moved aside first, then deleted), so a kill between them leaves
    the old folder whole under a hidden name rather than at `path`.
    """
    path = Path(path)
    tmp = temporary_path(path)
    remove(tmp)  # a leftover of an earlier process that had our id
    try:
        yield tmp
        if durable:
            if tmp.is_dir():
                raise ValueError(f"durable applies to a file, and {tmp} is a folder")
            fsync_file(tmp)
        if tmp.is_dir() and path.is_dir():
            move_folder_into_place(tmp, path)
        else:
            os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    finally:
        remove(tmp)


def move_folder_into_place(tmp: Path, path: Path) -> None:
    # rename() replaces only an empty folder, so the old one moves aside first.
    old = hidden_name(path, f"old-{os.getpid()}")
    remove(old)
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    finally:
        if path.exists():
            remove(old)
        else:  # the new folder could not move in: the old one goes back
            os.replace(old, path)


def write_json(path: Path, obj: object, durable: bool = False, indent: int | None = 1) -> None:
    """`obj` as JSON at `path` (keys sorted), written atomically; see `replaced` for `durable`."""
    with replaced(path, durable) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, sort_keys=True))
