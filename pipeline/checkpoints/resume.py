"""Deciding where a run starts: fresh, from which checkpoint, or already done.

The checkpoint folder is fixed by the configuration, so the same command finds
its own checkpoints again and resumes with no flag. `+resume=true` insists on a
checkpoint; `+resume=false` moves the old ones aside and starts afresh;
`+resume=anyway` continues from a checkpoint made on data that has changed since.
Checkpoints that fail to verify or load are moved to archive/ once an older one
has been restored, so they never again count as the newest (nor fill the slots
pruning keeps); when none is usable, nothing moves and the run refuses to start.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.checkpoints.fingerprint import (
    DATA_KEYS,
    data_refusal,
    describe_data_change,
    differences,
    settings_refusal,
)
from pipeline.checkpoints.store import (
    MANIFEST,
    Checkpoint,
    archive_all,
    archive_unusable,
    clean_leftovers,
    point_tf_checkpoint,
    restore,
    scan_checkpoints,
    verify,
)
from pipeline.errors import CheckpointError, IncompatibleCheckpoint
from pipeline.state import TrainState

ANYWAY = "anyway"  # +resume=anyway


@dataclass
class ResumePlan:
    candidates: list[Checkpoint] = field(default_factory=list)  # newest first
    reason: str = ""
    overridden: str = ""  # what +resume=anyway passed over, for the model's lineage
    unreadable: list[tuple[Path, str]] = field(default_factory=list)  # manifests that cannot be read, and why
    directory: Path = Path()
    read_only: bool = False  # a non-chief worker: moves nothing


def plan_resume(
    directory: Path, fingerprint: dict, resume: bool | str | None, read_only: bool = False, files: dict | None = None
) -> ResumePlan:
    """Which checkpoints to try, newest first; refuse if the newest is of another configuration.

    The newest checkpoint is the one a resume continues, so its fingerprint
    decides. `files` (the data's file list) names the files that changed.
    `read_only` (a non-chief worker) changes nothing in `directory`: the chief
    archives and cleans it, and committed checkpoints are all a reader trusts.
    """
    directory = Path(directory)
    if resume is False:
        archived = None if read_only else archive_all(directory)
        moved = f"; previous contents moved to {archived}" if archived else ""
        return ResumePlan([], f"starting fresh (+resume=false){moved}", directory=directory, read_only=read_only)
    if not read_only:
        clean_leftovers(directory)
    checkpoints, unreadable = scan_checkpoints(directory)
    if not checkpoints and not unreadable:
        if resume is True:
            raise CheckpointError(
                f"+resume=true, but {directory} holds no committed checkpoint to resume from. "
                f"Run without +resume=true to start, or set checkpoint.dir to the run's folder."
            )
        return ResumePlan([], f"starting fresh: no checkpoints in {directory}", directory=directory)
    if not checkpoints:  # only unreadable manifests: restore_newest_usable refuses, naming them
        return ResumePlan([], "resuming", "", unreadable, directory, read_only)
    newest = checkpoints[-1]
    changed = changes(newest, fingerprint)
    settings = {key: values for key, values in changed.items() if key not in DATA_KEYS}
    if settings:
        raise CheckpointError(settings_refusal(directory, settings))
    overridden = ""
    if changed:  # the data only
        what = describe_data_change(directory, newest.manifest.get("fingerprint", {}), fingerprint, files)
        if resume != ANYWAY:
            raise CheckpointError(data_refusal(directory, what))
        overridden = f"+resume=anyway over changed data: {what}"
        print(f"warning: {overridden}", flush=True)
    # Older checkpoints are fallbacks only where they fit too: after a +resume=anyway,
    # those made on the earlier data are not, unless +resume=anyway is given again.
    fitting = [
        ckpt for ckpt in checkpoints if all(key in DATA_KEYS and resume == ANYWAY for key in changes(ckpt, fingerprint))
    ]
    return ResumePlan(list(reversed(fitting)), "resuming", overridden, unreadable, directory, read_only)


def changes(ckpt: Checkpoint, fingerprint: dict) -> dict[str, tuple]:
    return differences(ckpt.manifest.get("fingerprint", {}), fingerprint, ckpt.state.phase)


def restore_newest_usable(plan: ResumePlan, compile_for_phase: Callable[[TrainState], object]) -> Checkpoint | None:
    """Restore the newest checkpoint that verifies and loads; warn about each that does not.

    `compile_for_phase(state)` readies the model for the checkpoint's phase (trainable
    layers and optimizer) and returns it. Raises if checkpoints exist but none
    is usable (an unreadable manifest counts as one): a run never silently
    starts from scratch over committed work.
    """
    problems, failed = [], []
    for path, why in plan.unreadable:  # its position is unknown, so it is never the one restored
        print(f"warning: skipping checkpoint {path}: unreadable manifest ({why})")
        problems.append(f"{path}: unreadable manifest ({why})")
        failed.append(path)
    for ckpt in plan.candidates:
        reason = verify(ckpt)
        if reason is None:
            try:
                restore(compile_for_phase(ckpt.state), ckpt)
            except IncompatibleCheckpoint as err:
                # Its files verified: a setting changed that this checkpoint's fingerprint does not
                # record (one written before the optimizer was in it). An older one is no answer.
                raise CheckpointError(
                    f"checkpoint {ckpt.stem} does not fit this run: {err}. Nothing was changed. Set "
                    "train.<phase>.optimizer, schedule, unfreeze_after and train.precision back to continue; "
                    f"+resume=false to start afresh (the checkpoints move to {ckpt.path.parent}/archive/); "
                    "or checkpoint.dir=<another folder> to keep both runs"
                ) from err
            except Exception as err:  # any other loader error means damage: try the previous one
                reason = f"cannot be loaded: {err}"
            else:
                set_aside(plan, failed, ckpt)
                return ckpt
        print(f"warning: skipping checkpoint {ckpt.stem}: {reason}")
        problems.append(f"{ckpt.stem}: {reason}")
        failed.append(ckpt.path)
    if problems:
        raise CheckpointError(
            f"none of the {len(problems)} checkpoints in {plan.directory} is usable:\n  "
            + "\n  ".join(problems)
            + "\nTo start afresh (they are moved to archive/, not deleted): +resume=false"
        )
    return None


def set_aside(plan: ResumePlan, failed: list[Path], restored: Checkpoint) -> None:
    """Move the unusable checkpoints newer than `restored` into archive/, saying where."""
    if not failed or plan.read_only:
        return
    target = archive_unusable(plan.directory, failed)
    names = ", ".join(path.name[: -len(MANIFEST)] for path in failed)
    print(f"warning: unusable checkpoints {names} moved to {target} (kept, not deleted)")
    if restored.manifest["format"] == "tf_checkpoint":  # `checkpoint` may name a moved one
        point_tf_checkpoint(plan.directory, restored.stem)
