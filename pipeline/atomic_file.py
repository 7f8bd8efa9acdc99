"""Files a reader never sees half-written: written under a temporary name beside the target, then renamed."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replaced(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix, so writers that go by it pick the format);
    once the block ends without error it replaces `path` in one step. A failed write is removed and
    leaves `path` as it was. Not fsynced: for reports and exports, not for checkpoints."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
