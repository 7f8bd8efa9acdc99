"""The final model file: written atomically, with its class names and lineage inside.

`model.save('x.h5')` truncates x.h5 the moment it starts, so a kill during the
save would destroy the previous model. We save to a temporary name beside it,
add the metadata as an HDF5 attribute, fsync, and rename over the old file.
A JSON copy of the metadata is written beside it for people and other tools.
Reading it back is load.py's job (read_metadata), for training and the commands alike.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import keras

from pipeline.atomic_file import remove_leftovers, replaced, write_json
from pipeline.checkpoints.store import reach, space_for
from pipeline.model_file.load import METADATA_ATTR, metadata_path


def save_final(model: keras.Model, path: Path, metadata: dict) -> None:
    """Save atomically; a full disk raises DiskFull naming `path` and leaves any previous model whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for target in (path, metadata_path(path)):  # temporaries of a killed save
        remove_leftovers(target)
    with space_for(path):
        with replaced(path, durable=True) as tmp:
            model.save(str(tmp), overwrite=True)
            with h5py.File(tmp, "a") as f:
                f.attrs[METADATA_ATTR] = json.dumps(metadata)
            reach("final_before_rename")  # the file is whole, the old model still in place
        write_json(metadata_path(path), metadata, durable=True)
