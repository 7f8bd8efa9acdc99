"""Deciding where a run starts: fresh, from which checkpoint, or already done.

The checkpoint folder is fixed by the configuration, so the same command finds
its own checkpoints again and resumes with no flag. `+resume=true` insists on a
checkpoint; `+resume=false` moves the old ones aside and starts afresh.
Checkpoints that fail to verify or load are moved to archive/ once an older one
has been restored, so they never again count as the newest (nor fill the slots
pruning keeps); when none is usable, nothing moves and the run refuses to start.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.checkpoints.store import (
    MANIFEST,
    Checkpoint,
    CheckpointError,
    TrainState,
    archive_all,
    archive_unusable,
    clean_leftovers,
    fingerprint_differences,
    point_tf_checkpoint,
    restore,
    scan_checkpoints,
    verify,
)


@dataclass
class ResumePlan:
    candidates: list[Checkpoint] = field(default_factory=list)  # newest first
    reason: str = ""
    unreadable: list[tuple[Path, str]] = field(default_factory=list)  # manifests that cannot be read, and why
    directory: Path = Path()
    read_only: bool = False  # a non-chief worker: moves nothing


def plan_resume(directory: Path, fingerprint: dict, resume: bool | None, read_only: bool = False) -> ResumePlan:
    """Which checkpoints to try, newest first; refuse those of another configuration.

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
    changed = sorted(
        {
            line
            for ckpt in checkpoints
            for line in fingerprint_differences(ckpt.manifest.get("fingerprint", {}), fingerprint)
        }
    )
    if changed:
        raise CheckpointError(
            f"the checkpoints in {directory} were made with another configuration:\n  "
            + "\n  ".join(changed)
            + f"\nNothing was changed. To start afresh (old checkpoints are moved to {directory}/archive/): "
            "+resume=false. To keep both runs: checkpoint.dir=<another folder>."
        )
    return ResumePlan(list(reversed(checkpoints)), "resuming", unreadable, directory, read_only)


def restore_newest_usable(plan: ResumePlan, prepare: Callable[[TrainState], object]) -> Checkpoint | None:
    """Restore the newest checkpoint that verifies and loads; warn about each that does not.

    `prepare(state)` readies the model for the checkpoint's phase (trainable
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
                restore(prepare(ckpt.state), ckpt)
            except Exception as err:  # any loader error means: try the previous one
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
