"""The final model file: written atomically, with its class names and lineage inside.

`model.save('x.h5')` truncates x.h5 the moment it starts, so a kill during the
save would destroy the previous model. We save to a temporary name beside it,
add the metadata as an HDF5 attribute, fsync, and rename over the old file.
A JSON copy of the metadata is written beside it for people and other tools.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import keras

from pipeline.checkpoints.store import fsync_dir, fsync_file, reach, space_for, write_json_atomic
from pipeline.model_file.load import METADATA_ATTR  # one name for the attribute; model_file reads it without TensorFlow


def metadata_path(model_path: Path) -> Path:
    return Path(model_path).with_suffix(".json")


def save_final(model: keras.Model, path: Path, metadata: dict) -> None:
    """Save atomically; a full disk raises DiskFull naming `path` and leaves any previous model whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in path.parent.glob(f".{path.stem}.tmp-*.h5"):  # from a killed save
        leftover.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.h5")
    with space_for(path):
        try:
            model.save(str(tmp), overwrite=True)
            with h5py.File(tmp, "a") as f:
                f.attrs[METADATA_ATTR] = json.dumps(metadata)
            fsync_file(tmp)
            reach("final_before_rename")
            os.replace(tmp, path)
            fsync_dir(path.parent)
        finally:
            tmp.unlink(missing_ok=True)
        write_json_atomic(metadata_path(path), metadata)


def read_metadata(path: Path) -> dict | None:
    """The metadata stored inside a final model file, or None if absent or unreadable."""
    try:
        with h5py.File(path, "r") as f:
            return json.loads(f.attrs[METADATA_ATTR])
    except (OSError, KeyError, ValueError):
        return None
