"""Deciding where a run starts: fresh, from which checkpoint, or already done.

The checkpoint folder is fixed by the configuration, so the same command finds
its own checkpoints again and resumes with no flag. `+resume=true` insists on a
checkpoint; `+resume=false` moves the old ones aside and starts afresh.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.checkpoints.store import (
    Checkpoint,
    archive_all,
    clean_leftovers,
    fingerprint_differences,
    list_checkpoints,
    restore,
    verify,
)
from pipeline.errors import CheckpointError
from pipeline.state import TrainState


@dataclass
class ResumePlan:
    candidates: list[Checkpoint] = field(default_factory=list)  # newest first
    reason: str = ""


def plan_resume(directory: Path, fingerprint: dict, resume: bool | None, read_only: bool = False) -> ResumePlan:
    """Which checkpoints to try, newest first; refuse those of another configuration.

    `read_only` (a non-chief worker) changes nothing in `directory`: the chief
    archives and cleans it, and committed checkpoints are all a reader trusts.
    """
    directory = Path(directory)
    if resume is False:
        archived = None if read_only else archive_all(directory)
        moved = f"; previous contents moved to {archived}" if archived else ""
        return ResumePlan([], f"starting fresh (+resume=false){moved}")
    if not read_only:
        clean_leftovers(directory)
    checkpoints = list_checkpoints(directory)
    if not checkpoints:
        if resume is True:
            raise CheckpointError(
                f"+resume=true, but {directory} holds no committed checkpoint to resume from. "
                f"Run without +resume=true to start, or set checkpoint.dir to the run's folder."
            )
        return ResumePlan([], f"starting fresh: no checkpoints in {directory}")
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
    return ResumePlan(list(reversed(checkpoints)), "resuming")


def restore_newest_usable(plan: ResumePlan, compile_for_phase: Callable[[TrainState], object]) -> Checkpoint | None:
    """Restore the newest checkpoint that verifies and loads; warn about each that does not.

    `compile_for_phase(state)` readies the model for the checkpoint's phase (trainable
    layers and optimizer) and returns it. Raises if checkpoints exist but none
    is usable: a run never silently starts from scratch over committed work.
    """
    problems = []
    for ckpt in plan.candidates:
        reason = verify(ckpt)
        if reason is None:
            try:
                restore(compile_for_phase(ckpt.state), ckpt)
                return ckpt
            except Exception as err:  # any loader error means: try the previous one
                reason = f"cannot be loaded: {err}"
        print(f"warning: skipping checkpoint {ckpt.stem}: {reason}")
        problems.append(f"{ckpt.stem}: {reason}")
    if problems:
        directory = plan.candidates[0].path.parent
        raise CheckpointError(
            f"none of the {len(problems)} checkpoints in {directory} is usable:\n  "
            + "\n  ".join(problems)
            + "\nTo start afresh (they are moved to archive/, not deleted): +resume=false"
        )
    return None
