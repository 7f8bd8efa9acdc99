"""Does a checkpoint belong to this run? Comparing fingerprints, and saying what changed.

The fingerprint (train.make_fingerprint) goes into every manifest: the settings
that shape the run, each named by its config key, and a digest of the data's
file list. The list itself would weigh down every manifest (100,000 images make
some 8 MB of JSON), so it is written once per version of the data, beside the
checkpoints, as `data-<digest>.json`; it serves only to say which files changed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.atomic_file import write_json

# What the data is: a change here may be continued over with +resume=anyway.
DATA_KEYS = ("data", "train_images", "validation_images")
# Keys that keep the names they had before the fingerprint named settings by their config key,
# so that checkpoints written then still compare them; shown to the user by these names.
SHOWN_AS = {
    "image_size": "data.image_size",
    "dropout": "model.dropout",
    "pretrained": "model.weights (pretrained)",
    "classes": "class folders",
}
EXAMPLES_PER_KIND = 2  # files named per kind of change in a refusal; the counts cover the rest


def differences(saved: dict, current: dict, phase: str) -> dict[str, tuple]:
    """{key: (saved value, current value)} for each key of the fingerprint that changed.

    A key missing on either side is unknown, not different: checkpoints written
    before a key joined the fingerprint (or holding one since dropped, such as
    the absolute data_dir) still resume. A phase's settings (`train.<phase>.*`)
    count only for a checkpoint in that phase: the optimizer state it holds is
    that phase's, and a phase not started yet has none.
    """
    return {
        key: (saved[key], current[key])
        for key in sorted(saved.keys() & current.keys())
        if saved[key] != current[key] and applies_to_phase(key, phase)
    }


def applies_to_phase(key: str, phase: str) -> bool:
    parts = key.split(".")
    return not (len(parts) == 3 and parts[0] == "train" and parts[1] != phase)


def settings_refusal(directory: Path, changed: dict[str, tuple]) -> str:
    listed = ", ".join(f"{SHOWN_AS.get(key, key)} {old} -> {new}" for key, (old, new) in changed.items())
    return (
        f"the checkpoints in {directory} were made with other settings: {listed}. Nothing was changed. "
        f"Set them back to continue; +resume=false to start afresh (the checkpoints move to {directory}/archive/); "
        "or checkpoint.dir=<another folder> to keep both runs"
    )


def data_refusal(directory: Path, what: str) -> str:
    return (
        f"the data changed since the checkpoints in {directory} were made: {what}. Nothing was changed. "
        "+resume=anyway continues from the newest checkpoint on the data as it is now (recorded in the "
        f"model's lineage); +resume=false starts afresh (the checkpoints move to {directory}/archive/); "
        "or put the files back as they were"
    )


# ---- the file list -------------------------------------------------------


def files_digest(files: dict) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_list_path(directory: Path, digest: str) -> Path:
    return Path(directory) / f"data-{digest[:16]}.json"


def save_file_list(directory: Path, files: dict) -> None:
    """Keep `files` beside the checkpoints, once per version of the data (named by its digest).

    Best effort: without it a later refusal still names the counts, just not the files.
    """
    digest = files_digest(files)
    path = file_list_path(directory, digest)
    if path.exists():
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"digest": digest, **files}, durable=True, indent=None)
    except OSError as err:
        print(f"warning: could not keep the data's file list in {path}: {err}", flush=True)


def load_file_list(directory: Path, digest: str | None) -> dict | None:
    """The file list saved for `digest`, or None if it is gone or does not match its digest."""
    if not digest:
        return None
    try:
        saved = json.loads(file_list_path(directory, digest).read_text())
        files = {"train": saved["train"], "validation": saved["validation"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return files if files_digest(files) == digest else None


def describe_data_change(directory: Path, saved: dict, current: dict, files: dict | None) -> str:
    """What changed in the data, by file where the checkpoints' file list is still there, else by count."""
    old = load_file_list(directory, saved.get("data"))
    if old is not None and files is not None:
        return compare_file_lists(old, files)
    counts = (
        f"{saved.get('train_images', '?')} -> {current.get('train_images', '?')} training images, "
        f"{saved.get('validation_images', '?')} -> {current.get('validation_images', '?')} validation images"
    )
    return f"{counts} (which files changed is not known: the checkpoints' file list is not in {directory})"


def compare_file_lists(old: dict, new: dict) -> str:
    """'3 files added, 1 removed, 2 relabelled; first few: ...' from two file lists."""
    before, after = by_path(old), by_path(new)
    added = [path for path in after if path not in before]
    removed = [path for path in before if path not in after]
    # A file moved to another class folder: the same name and size under another class.
    arrivals = {moved_key(path, after[path]): path for path in added}
    relabelled = []
    for path in list(removed):
        target = arrivals.pop(moved_key(path, before[path]), None)
        if target is not None:
            relabelled.append(f"{path} -> {target}")
            removed.remove(path)
            added.remove(target)
    kept = [path for path in before if path in after]
    resized = [path for path in kept if before[path][1] != after[path][1]]
    # With data.validation_split, a class's files shift between the splits when its count changes.
    switched = [path for path in kept if before[path][0] != after[path][0]]
    kinds = [
        ("added", added),
        ("removed", removed),
        ("relabelled", relabelled),
        ("changed in size", resized),
        ("moved between training and validation", switched),
    ]
    kinds = [(kind, paths) for kind, paths in kinds if paths]
    if not kinds:
        return "the file list changed (its order)"
    counts = [f"{len(paths)} {kind}" for kind, paths in kinds]
    first_count = len(kinds[0][1])
    counts[0] = f"{first_count} file{'' if first_count == 1 else 's'} {kinds[0][0]}"
    examples = "; ".join(f"{kind} {path}" for kind, paths in kinds for path in paths[:EXAMPLES_PER_KIND])
    return f"{', '.join(counts)}; first few: {examples}"


def by_path(files: dict) -> dict[str, tuple]:
    """{relative path: (split, size, class)}."""
    return {path: (split, size, label) for split, rows in files.items() for path, size, label in rows}


def moved_key(path: str, row: tuple) -> tuple:
    """A file's identity apart from its class folder: train/cat/x.jpg and train/dog/x.jpg of one size match."""
    top, _, rest = path.partition("/")
    return (top, rest.partition("/")[2], row[1])
