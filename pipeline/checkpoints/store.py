"""Writing, finding, verifying and restoring checkpoints.

A checkpoint is the model file in the chosen format (loadable the seed's way),
a `.state.npz` with what that file may not hold (optimizer slots and step
count, dropout's random state), and a `.manifest.json` with the training
position, the sha256 of every file and the run's fingerprint. Each file is
written under a temporary name, fsynced and renamed into place; the manifest
goes last and is the commit point, so a kill at any moment leaves either the
whole checkpoint or none of it, and the older ones intact.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline.atomic_file import fsync_dir, fsync_file, replaced, write_json
from pipeline.checkpoints.lock import LOCK_FILE
from pipeline.config import METRICS, CheckpointConfig
from pipeline.errors import CheckpointError, DiskFull, IncompatibleCheckpoint
from pipeline.state import TrainState

SUFFIXES = {"keras": ".keras", "h5": ".h5", "weights_h5": ".weights.h5", "tf_checkpoint": ".ckpt"}
MANIFEST = ".manifest.json"
PENDING = ".pending.json"
PRUNING = ".pruning.json"  # what a manifest is renamed to while its checkpoint's files are deleted
STATE = ".state.npz"
ARCHIVE = "archive"
INCOMING = ".incoming-"


# `.h5` full models are what the seed's users load, on purpose: Keras's "legacy
# format" warning on every such save would only alarm them.
logging.getLogger("absl").addFilter(lambda record: "considered legacy" not in record.getMessage())


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC as Python and h5py raise it (an OSError), or as TensorFlow's writers do (an OpError naming it)."""
    if isinstance(err, OSError):
        return err.errno == errno.ENOSPC
    return isinstance(err, tf.errors.OpError) and os.strerror(errno.ENOSPC) in str(err)


@contextlib.contextmanager
def space_for(path: Path | str | None = None) -> Iterator[None]:
    """Turn a full disk while writing `path` into DiskFull naming it: one `error:` line and exit 2.

    A write that fails this way has left the file it replaces, and every
    committed checkpoint, as they were (temporary names, renamed last).
    """
    try:
        yield
    except Exception as err:
        if not is_disk_full(err):
            raise
        if path is None:  # an unforeseen writer: name its file if the error does, else quote it on one line
            filename = getattr(err, "filename", None)
            path = filename if filename else f"a file of the run ({' '.join(str(err).split())})"
        raise DiskFull(
            f"No space left on device writing {path}. Committed checkpoints are intact; "
            "free space and run the same command to continue."
        ) from err


@dataclass
class Checkpoint:
    stem: str
    manifest: dict
    path: Path  # the manifest's path

    @property
    def state(self) -> TrainState:
        return TrainState(**self.manifest["state"])

    @property
    def identity(self) -> str:
        """Name plus content digest: two runs can write the same name, never the same bytes."""
        digest = hashlib.sha256(json.dumps(self.manifest["files"], sort_keys=True).encode()).hexdigest()
        return f"{self.stem}@{digest[:16]}"


_reached: dict = {}


def reach(point: str) -> None:
    """Test hook at a named step of a save; does nothing unless a test asks.

    `PIPELINE_KILL_AT=<point>[#n]` SIGKILLs this process the n-th time (default
    first) it gets here; `PIPELINE_ENOSPC_AT=<point>[#n]` fails there as a full
    disk would; `PIPELINE_PAUSE_AT=<point>[#n]` prints `paused at <point>` and
    sleeps PAUSE_SECONDS, a window for a test's real signal. The production path
    runs the same code; the hook only lets a test strike inside a save step at an
    exact place rather than at a random moment.
    """
    _reached[point] = _reached.get(point, 0) + 1
    if _asked("PIPELINE_KILL_AT", point):
        os.kill(os.getpid(), signal.SIGKILL)
    if _asked("PIPELINE_PAUSE_AT", point):
        print(f"paused at {point}", flush=True)
        time.sleep(PAUSE_SECONDS)
    if _asked("PIPELINE_ENOSPC_AT", point):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), point)


PAUSE_SECONDS = 5


def _asked(variable: str, point: str) -> bool:
    name, _, nth = os.environ.get(variable, "").partition("#")
    return name == point and _reached[point] == int(nth or 1)


# ---- writing -------------------------------------------------------------


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_model_file(model: keras.Model, fmt: str, target: Path, twin: keras.Model | None) -> None:
    """Write the model in `fmt` at `target` (inside a scratch folder)."""
    if fmt in ("keras", "h5"):
        model.save(str(target))
    elif fmt == "weights_h5":
        model.save_weights(str(target))
    else:
        # The twin is the same architecture without an optimizer, so the
        # checkpoint holds model weights only and `tf.train.Checkpoint(model=m)
        # .restore(...)` works whatever optimizer the reader's model carries.
        if twin is None:
            raise ValueError("checkpoint.format=tf_checkpoint is written from an optimizer-free twin; pass one")
        twin.set_weights(model.get_weights())
        checkpoint = tf.train.Checkpoint(model=twin)
        # write() stores only objects that exist, and save_counter is created on first use: without
        # it TensorFlow's tutorial line `restore(...).assert_existing_objects_matched()` fails on it.
        checkpoint.save_counter.assign(1)
        checkpoint.write(str(target))


def save_state_file(model: keras.Model, target: Path) -> None:
    arrays = {f"opt_{i:05d}": v.numpy() for i, v in enumerate(model.optimizer.variables)}
    for i, gen in enumerate(seed_generators(model)):
        arrays[f"seed_{i:03d}"] = gen.state.numpy()
    with open(target, "wb") as f:
        np.savez(f, **arrays)


def seed_generators(model: keras.Model) -> list:
    """Dropout's random state lives outside model.weights; saved separately for exact resume."""
    return [
        layer.seed_generator for layer in model._flatten_layers() if getattr(layer, "seed_generator", None) is not None
    ]


def checkpoint_stem(cfg: CheckpointConfig, state: TrainState, logs: dict) -> str:
    """The configured filename filled in, made unique if a pattern without {epoch} repeats itself."""
    metrics = {k: logs.get(k, float("nan")) for k in METRICS}
    # Like Keras: a completed epoch is named by its count, a mid-epoch one by the epoch in progress.
    name = cfg.filename.format(epoch=state.epoch + (1 if state.batch else 0), **metrics)
    directory = Path(cfg.dir)
    stem = name if state.batch == 0 else f"{name}-b{state.batch:05d}"
    if (directory / (stem + MANIFEST)).exists() or (directory / (stem + PENDING)).exists():
        stem = f"{stem}-e{state.epoch:03d}b{state.batch:05d}"
    return stem


def save_checkpoint(
    model: keras.Model,
    cfg: CheckpointConfig,
    stem: str,
    state: TrainState,
    logs: dict,
    fingerprint: dict,
    twin: keras.Model | None = None,
) -> Checkpoint:
    """Write one checkpoint atomically as `stem`; return it once committed.

    A failed write (a full disk, say) leaves the older checkpoints as they were
    and raises CheckpointError saying what and where.
    """
    directory = Path(cfg.dir)
    try:
        return write_checkpoint_files(model, cfg, stem, state, logs, fingerprint, twin)
    except (OSError, tf.errors.OpError) as err:
        # TensorFlow's writer (tf_checkpoint) reports a full disk as an OpError; others of its errors are bugs.
        if not (isinstance(err, OSError) or is_disk_full(err)):
            raise
        reason = "No space left on device" if is_disk_full(err) else str(err)
        raise CheckpointError(
            f"{reason}: could not write checkpoint {stem} in {directory}. "
            "The previous checkpoints are intact; free space and run the same "
            "command to continue."
        ) from err


def write_checkpoint_files(
    model: keras.Model,
    cfg: CheckpointConfig,
    stem: str,
    state: TrainState,
    logs: dict,
    fingerprint: dict,
    twin: keras.Model | None,
) -> Checkpoint:
    directory = Path(cfg.dir)
    directory.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=INCOMING, dir=directory))
    try:
        save_model_file(model, cfg.format, scratch / (stem + SUFFIXES[cfg.format]), twin)
        save_state_file(model, scratch / (stem + STATE))
        reach("after_write")
        files = sorted(p.name for p in scratch.iterdir())
        for name_ in files:
            fsync_file(scratch / name_)
        # The intent record lets a later run remove files renamed into place
        # by a run killed before its manifest committed; nothing else is touched.
        write_json(directory / (stem + PENDING), {"files": files}, durable=True)
        digests = {}
        for name_ in files:
            digests[name_] = sha256(scratch / name_)
            os.replace(scratch / name_, directory / name_)
        fsync_dir(directory)
        reach("before_manifest")
        manifest = {
            "version": 1,
            "stem": stem,
            "format": cfg.format,
            "files": digests,
            "state": asdict(state),
            "logs": logs,
            "fingerprint": fingerprint,
            "created": time.time(),
            # Commit order, which pruning and resume go by: after a fallback a newer
            # commit can carry a lower epoch than an older, unusable checkpoint.
            "sequence": 1 + max((commit_order(c)[0] for c in scan_checkpoints(directory)[0]), default=0),
        }
        write_json(directory / (stem + MANIFEST), manifest, durable=True)
        reach("after_manifest")
        (directory / (stem + PENDING)).unlink()
    except BaseException:
        clean_leftovers(directory)  # this save's renamed files and intent record, nothing committed
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if cfg.format == "tf_checkpoint":
        point_tf_checkpoint(directory, stem)
    return Checkpoint(stem, manifest, directory / (stem + MANIFEST))


def point_tf_checkpoint(directory: Path, stem: str) -> None:
    """Keep TensorFlow's `checkpoint` file naming the newest, for tf.train.latest_checkpoint."""
    text = f'model_checkpoint_path: "{stem}.ckpt"\nall_model_checkpoint_paths: "{stem}.ckpt"\n'
    with replaced(directory / "checkpoint", durable=True) as tmp:
        tmp.write_text(text)


# ---- finding, pruning, archiving ----------------------------------------


def list_checkpoints(directory: Path) -> list[Checkpoint]:
    """Committed checkpoints, oldest first. An unreadable manifest is skipped with a warning."""
    found, unreadable = scan_checkpoints(directory)
    for path, reason in unreadable:
        print(f"warning: ignoring unreadable checkpoint manifest {path}: {reason}")
    return found


def scan_checkpoints(directory: Path) -> tuple[list[Checkpoint], list[tuple[Path, str]]]:
    """Committed checkpoints in commit order, oldest first; and the manifests that cannot be read, with why."""
    found, unreadable = [], []
    for path in sorted(Path(directory).glob("*" + MANIFEST)):
        try:
            manifest = json.loads(path.read_text())
            # What a resume reads, checked now: a manifest without it is no checkpoint.
            TrainState(**manifest["state"])
            dict(manifest["files"])
            ckpt = Checkpoint(str(manifest["stem"]), manifest, path)
        except (OSError, ValueError, KeyError, TypeError) as err:
            unreadable.append((path, f"{type(err).__name__}: {err}"))
        else:
            found.append(ckpt)
    return sorted(found, key=commit_order), unreadable


def commit_order(ckpt: Checkpoint) -> tuple[int, float]:
    """Checkpoints written before commit sequence numbers existed count as older, by their commit time."""
    return int(ckpt.manifest.get("sequence", 0)), float(ckpt.manifest.get("created", 0))


def clean_leftovers(directory: Path) -> None:
    """Remove what a killed save left behind: scratch folders and uncommitted files."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for scratch in directory.glob(INCOMING + "*"):
        shutil.rmtree(scratch, ignore_errors=True)
    for tmp in directory.glob(".*.tmp-*"):  # atomic_file's temporaries (manifest, intent record, `checkpoint`)
        tmp.unlink(missing_ok=True)
    for pending in directory.glob("*" + PENDING):
        stem = pending.name[: -len(PENDING)]
        if not (directory / (stem + MANIFEST)).exists():
            with contextlib.suppress(OSError, ValueError):
                for name in json.loads(pending.read_text())["files"]:
                    (directory / name).unlink(missing_ok=True)
        pending.unlink(missing_ok=True)
    # A deletion killed midway (prune): finish it, sparing any file a committed manifest names.
    committed = {name for ckpt in scan_checkpoints(directory)[0] for name in ckpt.manifest["files"]}
    for record in directory.glob("*" + PRUNING):
        with contextlib.suppress(OSError, ValueError, KeyError):
            for name in set(json.loads(record.read_text())["files"]) - committed:
                (directory / name).unlink(missing_ok=True)
        record.unlink(missing_ok=True)
    fsync_dir(directory)


def delete_checkpoint(ckpt: Checkpoint) -> None:
    # The manifest is first renamed to a deletion record: from then on the checkpoint
    # is not committed, and a kill midway leaves the record, from which the next
    # start's clean_leftovers deletes the rest (never a manifest naming missing files).
    directory = ckpt.path.parent
    record = directory / (ckpt.stem + PRUNING)
    os.replace(ckpt.path, record)
    fsync_dir(directory)
    for name in ckpt.manifest["files"]:
        (directory / name).unlink(missing_ok=True)
    record.unlink(missing_ok=True)


def prune(directory: Path, keep_last: int, best_stem: str | None, current: str | None = None) -> None:
    """Keep the last `keep_last` committed checkpoints (in commit order), the best one and `current`."""
    checkpoints = list_checkpoints(directory)
    doomed = [c for c in checkpoints[:-keep_last] if c.stem not in (best_stem, current)]
    for ckpt in doomed:
        delete_checkpoint(ckpt)
    if doomed:
        fsync_dir(directory)


def archive_all(directory: Path) -> Path | None:
    """Move everything in `directory` into archive/<time>/ (for +resume=false); delete nothing."""
    directory = Path(directory)
    # The lock stays: a process opening the moved file would hold a lock no one else checks.
    keep = (ARCHIVE, ".gitkeep", LOCK_FILE)
    entries = [p for p in directory.iterdir() if p.name not in keep] if directory.is_dir() else []
    if not entries:
        return None
    target = directory / ARCHIVE / time.strftime("%Y%m%d-%H%M%S")
    while target.exists():
        target = target.with_name(target.name + "_")
    target.mkdir(parents=True)
    for entry in entries:
        os.replace(entry, target / entry.name)
    # Each folder whose entries changed: the moves themselves, the new folder, archive/ if new.
    for changed in (target, target.parent, directory):
        fsync_dir(changed)
    return target


def archive_unusable(directory: Path, manifests: list[Path]) -> Path:
    """Move checkpoints that failed to verify or load into archive/<time>-unusable/; delete nothing.

    Each manifest moves after its files, so a kill midway leaves a manifest
    naming missing files: it fails verification and is moved on the next start.
    """
    directory = Path(directory)
    target = directory / ARCHIVE / (time.strftime("%Y%m%d-%H%M%S") + "-unusable")
    while target.exists():
        target = target.with_name(target.name + "_")
    target.mkdir(parents=True)
    for manifest in manifests:
        for name in checkpoint_files(manifest):
            if (directory / name).is_file():
                os.replace(directory / name, target / name)
        os.replace(manifest, target / manifest.name)
    for changed in (target, target.parent, directory):
        fsync_dir(changed)
    return target


def checkpoint_files(manifest: Path) -> list[str]:
    """The files a manifest lists; for one that cannot be read, the files named as its stem's would be."""
    try:
        return list(dict(json.loads(manifest.read_text())["files"]))
    except (OSError, ValueError, KeyError, TypeError):
        stem = manifest.name[: -len(MANIFEST)]
        named = {stem + suffix for suffix in (*SUFFIXES.values(), STATE)}
        return [p.name for p in manifest.parent.iterdir() if p.name in named or p.name.startswith(stem + ".ckpt.")]


# ---- verifying and restoring ---------------------------------------------


def verify(ckpt: Checkpoint) -> str | None:
    """None if every file is present and matches its sha256, else the reason."""
    for name, digest in ckpt.manifest["files"].items():
        path = ckpt.path.parent / name
        if not path.is_file():
            return f"{path} is missing"
        if sha256(path) != digest:
            return f"{path} fails its checksum (truncated or altered)"
    return None


def restore(model: keras.Model, ckpt: Checkpoint) -> None:
    """Load weights, optimizer state and dropout's random state into a compiled model."""
    directory = ckpt.path.parent
    # Built first: a .keras file's own optimizer state then loads cleanly instead
    # of Keras warning that it skipped it (the .state.npz values are set below anyway).
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    load_weights(model, ckpt)
    with np.load(directory / (ckpt.stem + STATE)) as state:
        restore_optimizer(model, [state[k] for k in sorted(state.files) if k.startswith("opt_")])
        saved_seeds = sorted(k for k in state.files if k.startswith("seed_"))
        # Not strict: Dropout(rate=0) has no seed generator, so a resume with another model.dropout
        # may find more or fewer saved states than generators; the ones that pair up are restored.
        for gen, key in zip(seed_generators(model), saved_seeds, strict=False):
            gen.state.assign(state[key])


def load_weights(model: keras.Model, ckpt: Checkpoint) -> None:
    """The checkpoint's model weights into `model`, whatever its format (a weights-only one too)."""
    fmt = ckpt.manifest["format"]
    model_file = ckpt.path.parent / (ckpt.stem + SUFFIXES[fmt])
    if fmt == "tf_checkpoint":
        tf.train.Checkpoint(model=model).restore(str(model_file)).expect_partial()
    else:
        model.load_weights(str(model_file))


def restore_optimizer(model: keras.Model, values: list) -> None:
    variables = model.optimizer.variables
    if len(variables) != len(values):
        raise IncompatibleCheckpoint(
            f"its optimizer state has {len(values)} variables, this run's optimizer "
            f"{len(variables)}: it was made with another optimizer, schedule, precision or other trainable layers"
        )
    for var, value in zip(variables, values, strict=True):
        # The learning rate comes from the configuration, so a user may change it on resume.
        if var.path.endswith("learning_rate"):
            continue
        if tuple(var.shape) != value.shape:
            raise IncompatibleCheckpoint(
                f"optimizer variable {var.path} has shape {tuple(var.shape)}, the checkpoint {value.shape}"
            )
        var.assign(value)
