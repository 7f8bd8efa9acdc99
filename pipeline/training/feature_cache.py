"""Frozen-layer features computed once and kept on disk: keyed, verified, written atomically.

An entry holds, for one cut through the network (the pooled base output for
the head phase, or the unfreeze layer's output for fine-tuning), the features
of K augmented views of every training image and of every validation image.
Its folder name is the digest of everything the features depend on (the files
with their sizes and mtimes, image size, resize filter, augmentation, seed,
the epochs the views stand for, the frozen layers' weights, precision,
library versions), so any change selects another entry: a stale one is never
looked up. An entry is built in a scratch folder, fsynced, and renamed into
place in one step; a kill at any moment leaves either the whole entry or only
a scratch folder, which a later run removes. The stored key and the sha256 of
every array are checked again on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline.atomic_file import fsync_dir, fsync_file
from pipeline.checkpoints.store import reach, sha256, space_for
from pipeline.config import DataConfig
from pipeline.data.dataset import AUGMENTATION_KEYS, Batches, DataSet

FORMAT_VERSION = 2  # 2: features computed in batches of FEATURE_BATCH
# Images per predict() call of the feature pass: larger than the training batch,
# because the frozen layers run faster per image in bigger calls (docs/speed.md). Each image's augmentation is
# keyed to (seed, epoch, image), so the batch size changes no augmentation;
# it is fixed so that the features do not depend on data.batch_size either.
FEATURE_BATCH = 64
KEY_FILE = "key.json"
ARRAYS = ("train", "validation")
INCOMING = ".incoming-"


@dataclass
class Features:
    """Cached features: train[view, image, ...] and validation[image, ...], labels as in the data set."""

    train: np.ndarray
    validation: np.ndarray
    folder: Path
    reused: bool


def describe_files(paths: list[str]) -> list:
    """Path, size and mtime of each image: what a changed, added or removed file alters."""
    described = []
    for path in paths:
        st = os.stat(path)
        described.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
    return described


def digest_weights(model: keras.Model) -> str:
    """sha256 over every weight (trainable or not: BatchNorm's moving statistics shape features too)."""
    h = hashlib.sha256()
    for weight in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
        h.update(f"{weight.path}:{value.dtype}:{value.shape}".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def make_key(data: DataSet, cfg: DataConfig, seed: int, cut: str, view_epochs: list[int], weights_digest: str) -> dict:
    """Everything the cached features depend on. Equal keys mean equal features."""
    return {
        "version": FORMAT_VERSION,
        "cut": cut,
        "classes": data.class_names,
        "train": describe_files(data.train.filepaths),
        "train_labels": data.train.labels.tolist(),
        "validation": describe_files(data.validation.filepaths),
        "validation_labels": data.validation.labels.tolist(),
        "image_size": cfg.image_size,
        "interpolation": cfg.interpolation,
        "max_pixels": cfg.max_pixels,
        "augmentation": {k: getattr(cfg, k) for k in AUGMENTATION_KEYS},
        "seed": seed,
        # View v is the augmentation an uncached run draws in overall epoch view_epochs[v].
        "view_epochs": view_epochs,
        "weights": weights_digest,
        "precision": keras.mixed_precision.global_policy().name,
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__},
    }


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def entry_name(key: dict) -> str:
    """`<cut>-<digest>`: the cut in the name lets a new entry replace its stale predecessors."""
    return f"{key['cut']}-{key_digest(key)}"


def load_or_compute(cache_dir: Path, key: dict, compute: Callable[[Path], None]) -> Features:
    """The entry for `key`, computed with `compute(scratch_folder)` if absent or damaged.

    `compute` writes train.npy and validation.npy into the folder it is given.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    remove_dead_scratch(cache_dir, INCOMING)
    folder = cache_dir / entry_name(key)
    found = open_entry(folder, key)
    if found is not None:
        return found
    if folder.exists():
        print(f"feature cache: {folder} does not match its key or checksums; computing it again")
        shutil.rmtree(folder, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"{INCOMING}{os.getpid()}-", dir=cache_dir))
    try:
        with space_for(folder):
            compute(scratch)
            commit_entry(scratch, folder, key)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    remove_stale_entries(cache_dir, folder, key)
    features = open_entry(folder, key)
    if features is None:
        raise RuntimeError(f"feature cache entry {folder} failed its own check right after writing")
    features.reused = False
    return features


def commit_entry(scratch: Path, folder: Path, key: dict) -> None:
    """fsync the arrays, write the key with their checksums, rename the folder into place."""
    digests = {}
    for name in ARRAYS:
        fsync_file(scratch / f"{name}.npy")
        digests[name] = sha256(scratch / f"{name}.npy")
    # Inside the scratch folder no temporary name is needed: the folder's rename is the commit.
    (scratch / KEY_FILE).write_text(json.dumps({"key": key, "sha256": digests}))
    fsync_file(scratch / KEY_FILE)
    fsync_dir(scratch)
    reach("cache_before_rename")
    try:
        os.rename(scratch, folder)  # atomic; fails if a concurrent run committed the same entry first
    except OSError:
        if open_entry(folder, key) is None:
            raise
    fsync_dir(folder.parent)


def open_entry(folder: Path, key: dict) -> Features | None:
    """The entry's arrays if its stored key equals `key` and every checksum matches, else None."""
    try:
        stored = json.loads((folder / KEY_FILE).read_text())
        if stored["key"] != json.loads(json.dumps(key)):
            return None
        for name in ARRAYS:
            if sha256(folder / f"{name}.npy") != stored["sha256"][name]:
                return None
        # Memory-mapped: an entry at 299 px can exceed what is worth holding in RAM twice.
        train = np.load(folder / "train.npy", mmap_mode="r")
        validation = np.load(folder / "validation.npy", mmap_mode="r")
    except (OSError, ValueError, KeyError):
        return None
    if train.shape[:2] != (len(key["view_epochs"]), len(key["train"])) or len(validation) != len(key["validation"]):
        return None
    return Features(train, validation, folder, reused=True)


def remove_dead_scratch(parent: Path, prefix: str) -> None:
    """Scratch folders `<prefix><pid>-...` in `parent` whose process has died; a live run's own are left alone.

    Here for the cache's scratch entries, and for multi-worker scratch folders (distribute/strategy.py).
    """
    for scratch in Path(parent).glob(prefix + "*"):
        pid = scratch.name[len(prefix) :].split("-", 1)[0]
        if not (pid.isdigit() and process_alive(int(pid))):
            shutil.rmtree(scratch, ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_entries(cache_dir: Path, keep: Path, key: dict) -> None:
    """Entries for the same cut and data folder with another key: an image or setting changed since."""
    data_dirs = {os.path.dirname(os.path.dirname(p[0])) for p in key["train"][:1]}
    for folder in cache_dir.glob(f"{key['cut']}-*"):
        if folder == keep:
            continue
        try:
            other = json.loads((folder / KEY_FILE).read_text())["key"]
        except (OSError, ValueError, KeyError):
            continue
        other_dirs = {os.path.dirname(os.path.dirname(p[0])) for p in other["train"][:1]}
        if other_dirs == data_dirs and other.get("image_size") == key["image_size"]:
            shutil.rmtree(folder, ignore_errors=True)


def compute_features(
    extractor: keras.Model, data: DataSet, cfg: DataConfig, seed: int, view_epochs: list[int], scratch: Path
) -> None:
    """Run `extractor` (the frozen layers, inference mode) over every view and the validation images.

    View v of image j gets exactly the augmentation data.Batches draws for
    image j in epoch view_epochs[v], so K views of K epochs reproduce an
    uncached run's inputs.
    """
    n_classes, n = len(data.class_names), len(data.train.filepaths)
    cfg = replace(cfg, batch_size=FEATURE_BATCH)
    write_entry(
        scratch,
        (len(view_epochs), n) + tuple(extractor.output.shape[1:]),
        lambda v: predict_float32(
            extractor, Batches(data.train, n_classes, cfg, seed, view_epochs[v], data.augmenter, shuffle=False)
        ),
        lambda: predict_float32(
            extractor, Batches(data.validation, n_classes, cfg, seed=0, epoch=0, augmenter=None, shuffle=False)
        ),
    )


def write_entry(
    scratch: Path, shape: tuple, view: Callable[[int], np.ndarray], validation: Callable[[], np.ndarray]
) -> None:
    """train.npy (shape: views, images, features...) filled view by view, memory-mapped, then validation.npy."""
    train = np.lib.format.open_memmap(scratch / "train.npy", mode="w+", dtype=np.float32, shape=shape)
    for v in range(shape[0]):
        train[v] = view(v)
        reach("cache_view_done")
    train.flush()
    del train
    np.save(scratch / "validation.npy", validation())


def predict_float32(extractor: keras.Model, batches: Batches) -> np.ndarray:
    # training=False is what predict does: frozen layers run BatchNorm on its moving statistics,
    # exactly as they do inside fit() when frozen.
    return np.asarray(extractor.predict(batches, verbose=0), dtype=np.float32)


def derive_features(layers: keras.Model, source: Features, scratch: Path) -> None:
    """Run `layers` (frozen, inference mode) over cached features: an entry for a higher cut from a lower one."""
    write_entry(
        scratch,
        source.train.shape[:2] + tuple(layers.output.shape[1:]),
        lambda v: predict_arrays(layers, source.train[v]),
        lambda: predict_arrays(layers, source.validation),
    )


def predict_arrays(layers: keras.Model, features: np.ndarray) -> np.ndarray:
    """`layers` over `features` in chunks of FEATURE_BATCH (predict_on_batch: no tf.data pipeline to start)."""
    out = []
    for start in range(0, len(features), FEATURE_BATCH):
        chunk = np.asarray(features[start : start + FEATURE_BATCH])
        short = FEATURE_BATCH - len(chunk)
        # Padded to one shape so the function traces once, not again for the last chunk;
        # in inference mode each row's result does not depend on the others.
        if short:
            chunk = np.concatenate([chunk, np.zeros((short,) + chunk.shape[1:], chunk.dtype)])
        out.append(np.asarray(layers.predict_on_batch(chunk), dtype=np.float32)[: FEATURE_BATCH - short])
    return np.concatenate(out)
