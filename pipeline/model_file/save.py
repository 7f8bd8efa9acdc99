"""The final model file: written atomically, with its class names and lineage inside.

`model.save('x.h5')` truncates x.h5 the moment it starts, so a kill during the
save would destroy the previous model. We save to a temporary name beside it,
add the metadata as an HDF5 attribute, fsync, and rename over the old file.
A JSON copy of the metadata is written beside it for people and other tools.
Reading it back is load.py's job (read_metadata), for training and the commands alike.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import keras

from pipeline.checkpoints.store import fsync_dir, fsync_file, reach, write_json_atomic
from pipeline.model_file.load import METADATA_ATTR, metadata_path


def save_final(model: keras.Model, path: Path, metadata: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in path.parent.glob(f".{path.stem}.tmp-*.h5"):  # from a killed save
        leftover.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.h5")
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

