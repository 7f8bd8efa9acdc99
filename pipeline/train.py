"""The stages in order: data -> model -> resume plan -> head phase -> fine-tune phase -> final save -> report."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline.backbones import BACKBONES
from pipeline.checkpoints.fingerprint import files_digest, save_file_list
from pipeline.checkpoints.resume import ResumePlan, plan_resume, restore_newest_usable
from pipeline.checkpoints.store import Checkpoint, checkpoint_stem, list_checkpoints, load_weights, space_for, verify
from pipeline.checkpoints.writer import CheckpointWriter, prune_and_announce
from pipeline.config import METRICS, Config, PhaseConfig
from pipeline.data.dataset import AUGMENTATION_KEYS, DataSet, file_list, validation_batches
from pipeline.data.prepare import prepare_data
from pipeline.distribute.strategy import (
    distribute_batches,
    make_strategy,
    prepare_model_for_strategy,
    scratch_folder,
    strategy_scope,
)
from pipeline.distribute.tf_config import WorkerRole, read_worker_role
from pipeline.errors import CheckpointError, DiskFull, Preempted
from pipeline.model import build_model, check_unfreeze_after, compile_model, resolve_unfreeze_after, set_trainable
from pipeline.model_file.load import read_metadata_or_none
from pipeline.model_file.save import save_final
from pipeline.reports import console as summary
from pipeline.reports.history import start_history
from pipeline.reports.report import write_missing_report, write_run_report
from pipeline.reports.tracking import Tracker, start_tracking
from pipeline.state import TrainState
from pipeline.training.batch_saver import BatchSaver, StopFlag
from pipeline.training.cached_phase import Feed, check_cached_cut, make_feed
from pipeline.training.class_balance import class_weights, imbalance_warning
from pipeline.training.early_stopping import (
    StopRule,
    announce_stop,
    count_epoch,
    describe_stops,
    improves,
    resolve_mode,
    start_phase,
    stays_stopped,
)
from pipeline.training.epoch_metrics import last_confusion
from pipeline.training.first_step_timer import FirstStepTimer
from pipeline.training.precision import set_precision

PHASE_ORDER = ("head", "finetune")


@dataclass
class Phase:
    name: str
    cfg: PhaseConfig
    stopping: StopRule


@dataclass
class Session:
    """What the stages of one run share."""

    cfg: Config
    data: DataSet
    model: keras.Model
    fingerprint: dict
    # Where checkpoints and the final model are written: `cfg` itself, except on a
    # non-chief worker of a multi-worker run, whose copies go to a scratch folder.
    outputs: Config
    writer: CheckpointWriter | None = None
    strategy: tf.distribute.Strategy | None = None
    state: TrainState = field(default_factory=TrainState)
    last_logs: dict = field(default_factory=dict)
    stop: StopFlag = field(default_factory=StopFlag)
    feed: Feed | None = None  # what the current phase's fit() runs on (cached_phase.py)
    callbacks: list = field(default_factory=list)  # per-epoch records (history.py), passed to every fit
    class_weights: np.ndarray | None = None  # per class, for the loss (class_balance.py); None: unweighted
    # The last epoch's validation confusion matrix, which the report uses when the final model is that epoch's.
    validated: np.ndarray | None = None

    @property
    def checkpoints(self) -> CheckpointWriter:
        """The checkpoint writer, which restore_or_start makes before any epoch runs."""
        assert self.writer is not None, "restore_or_start makes the writer before training"
        return self.writer

    @property
    def pretrained(self) -> bool:
        return self.cfg.model.weights is not None

    @property
    def unfreeze_after(self) -> str | None:
        return resolve_unfreeze_after(self.cfg.train.finetune.unfreeze_after, self.pretrained, self.cfg.model.name)

    def compile_for_phase(self, state: TrainState) -> keras.Model:
        """Set trainable layers and compile for `state.phase`.

        By the state's own phase, even one now configured with 0 epochs: the
        optimizer state being restored belongs to that phase's trainable layers.
        """
        phase_cfg = getattr(self.cfg.train, state.phase)
        set_trainable(self.model, state.phase, self.unfreeze_after, self.pretrained)
        steps = phase_cfg.epochs * math.ceil(len(self.data.train.filepaths) / self.cfg.data.batch_size)
        compile_model(
            self.model, phase_cfg.optimizer, phase_cfg.lr, phase_cfg.schedule, steps, self.cfg.train.label_smoothing
        )
        return self.model


def configure_tensorflow(cfg: Config) -> None:
    """A clean Keras state, seeds, and op determinism for bit-exact runs and resumes."""
    # Sweep jobs run one after another in one process: free the previous job's graphs and names.
    keras.backend.clear_session()
    keras.utils.set_random_seed(cfg.train.seed)
    grow_gpu_memory()
    set_precision(cfg.train.precision)
    if cfg.train.threads:
        set_threads(tf.config.threading.set_intra_op_parallelism_threads, cfg.train.threads)
    if cfg.train.deterministic:
        tf.config.experimental.enable_op_determinism()
        # Op determinism alone still let two processes end with different weights; one
        # inter-op thread made them agree bit for bit (docs/checkpoints-and-resume.md: Determinism).
        set_threads(tf.config.threading.set_inter_op_parallelism_threads, 1)


def grow_gpu_memory() -> None:
    """Let TensorFlow take GPU memory as it needs it rather than all of it at start, so that
    launcher=parallel jobs can share a device (README: GPUs). A no-op on a CPU."""
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # the runtime has started (a later job of a sweep process): the first job's setting stays
            pass


def set_threads(setter, count: int) -> None:
    """TensorFlow accepts thread settings only before its runtime starts, so a
    later job of the same sweep process keeps the first job's setting."""
    try:
        setter(count)
    except RuntimeError:
        pass


def plan_phases(cfg: Config) -> list[Phase]:
    c, stop = cfg.checkpoint, cfg.train.early_stopping
    rule = StopRule(c.monitor, resolve_mode(c.monitor, c.mode), stop.patience, stop.min_delta)
    return [Phase(name, getattr(cfg.train, name), rule) for name in PHASE_ORDER if getattr(cfg.train, name).epochs > 0]


def advance(state: TrainState, phases: list[Phase]) -> Phase | None:
    """Move `state` past finished phases; the phase to train next, or None when all are done.

    A phase is finished after its epochs, or when it stopped early and the
    configuration keeps it stopped (training/early_stopping.py).
    """
    for phase in phases:
        if PHASE_ORDER.index(phase.name) < PHASE_ORDER.index(state.phase):
            continue
        if phase.name != state.phase:
            start_phase(state, phase.name)
        if state.phase_epoch < phase.cfg.epochs and not stays_stopped(state, phase.stopping, phase.cfg.epochs):
            return phase
    return None


def make_fingerprint(cfg: Config, data: DataSet, files: dict | None = None) -> dict:
    """What must match for a checkpoint to continue this run (compared in checkpoints/fingerprint.py).

    The settings that shape the run, by config key, and the data by a digest of
    `files` (file_list: paths relative to data.dir, sizes, classes), so a moved
    folder resumes and a relabelled one does not. Not the epochs (raise them to
    train longer), the learning rates, nor settings of speed or checkpointing.
    """
    d, t = cfg.data, cfg.train
    files = files if files is not None else file_list(data, Path(d.dir))
    unfreeze_after = resolve_unfreeze_after(t.finetune.unfreeze_after, cfg.model.weights is not None, cfg.model.name)
    return {
        # The backbone (model.name): another one's checkpoints cannot continue this run.
        "architecture": f"{BACKBONES[cfg.model.name].display}+GAP+dropout+dense",
        "classes": data.class_names,
        "image_size": d.image_size,
        "dropout": cfg.model.dropout,
        "pretrained": cfg.model.weights is not None,
        "train_images": len(data.train.filepaths),
        "validation_images": len(data.validation.filepaths),
        "data": files_digest(files),
        # A mid-epoch checkpoint counts batches: another size would skip other images.
        "data.batch_size": d.batch_size,
        "data.interpolation": d.interpolation,
        # Unused where the validation images are named (validation/, data.validation_csv).
        "data.validation_split": d.validation_split if data.held_out else None,
        # Only where it chooses the validation images (holdout.py): a split layout's run ignores it.
        **({"data.split_seed": d.split_seed} if data.held_out == "seeded" else {}),
        **{f"data.{key}": getattr(d, key) for key in AUGMENTATION_KEYS},
        "train.seed": t.seed,
        "train.precision": t.precision,
        # Per phase, compared only for a checkpoint in that phase: its optimizer state must load.
        **{
            f"train.{name}.{key}": getattr(getattr(t, name), key)
            for name in PHASE_ORDER
            for key in ("optimizer", "schedule")
        },
        "train.finetune.unfreeze_after": unfreeze_after or "none",
        # As given (none, balanced or the mapping): balanced's weights follow from the data, digested above.
        "train.class_weight": t.class_weight,
        "train.label_smoothing": t.label_smoothing,
    }


def run(cfg: Config, resume: bool | str | None = None, report_dir: Path = Path("outputs/default")) -> dict:
    """Train (or continue training) and save the final model; return the closing summary.

    `report_dir` is the run's output folder (Hydra's), for reports such as the bad-image list.
    Under distribute=multi_worker every worker runs this; only the chief's writes are kept.
    """
    configure_tensorflow(cfg)
    strategy = make_strategy(cfg.distribute)
    role = read_worker_role() if cfg.distribute.strategy == "multi_worker" else WorkerRole()
    # A full disk in a write not named below (space_for at each known one) still ends in one line.
    with space_for(), scratch_folder(role) as scratch, strategy_scope(strategy):
        outputs = cfg
        if strategy:  # every worker must save in step with the others: no background writer
            outputs = replace(outputs, checkpoint=replace(outputs.checkpoint, asynchronous=False))
        if scratch is None:
            return train_and_save(cfg, outputs, resume, report_dir, strategy)
        outputs = replace(
            outputs,
            checkpoint=replace(outputs.checkpoint, dir=f"{scratch}/ckpt"),
            model=replace(outputs.model, save_path=f"{scratch}/model.h5"),
        )
        return train_and_save(cfg, outputs, resume, Path(scratch), strategy, read_only=True)


def train_and_save(
    cfg: Config,
    outputs: Config,
    resume: bool | str | None,
    report_dir: Path,
    strategy: tf.distribute.Strategy | None,
    read_only: bool = False,
) -> dict:
    """The stages in order, reading checkpoints from cfg's paths and writing to outputs'."""
    started = time.time()
    data = prepare_data(cfg.data, report_dir)
    weights = weigh_classes(cfg, data)
    model = build_checked_model(cfg, data, strategy)
    files = file_list(data, Path(cfg.data.dir))
    session = Session(cfg, data, model, make_fingerprint(cfg, data, files), outputs, strategy=strategy)
    session.class_weights = weights
    phases = plan_phases(cfg)
    plan = plan_resume(Path(cfg.checkpoint.dir), session.fingerprint, resume, read_only, files)
    done = finished_run(cfg, plan, phases)
    if done:
        return report_already_complete(cfg, data, done, report_dir, started)
    save_file_list(Path(outputs.checkpoint.dir), files)  # what a later refusal compares the data with
    # After the plan (+resume=false archives the MLflow run id with the checkpoints), before any commit.
    tracker = (
        Tracker(cfg.logger)
        if read_only
        else start_tracking(cfg, report_dir, Path(outputs.checkpoint.dir), fresh=not plan.candidates)
    )
    restored = restore_or_start(session, plan, phases, tracker.on_commit)
    # history.csv and TensorBoard drop what was trained after the restored checkpoint.
    session.callbacks = start_history(
        report_dir,
        lambda: session.state,
        restored.stem if restored else None,
        restored.manifest.get("logs", {}) if restored else None,
    )
    # Epochs committed by a run killed before it could log them; none twice (reports/tracking.py).
    tracker.log_committed_epochs(session.state.epoch)
    summary.print_startup(cfg, data, phases, plan.reason, restored, session.unfreeze_after, weights)
    try:
        train_phases(session, phases, compiled_for=session.state.phase if restored else None)
        weights_from = load_final_weights(session)
        save_final(model, Path(outputs.model.save_path), final_metadata(session, weights_from))
        write_report(session, report_dir, weights_from)
    except BaseException as err:
        tracker.end_quietly("KILLED" if isinstance(err, Preempted) else "FAILED")
        raise
    tracker.finish(Path(outputs.model.save_path))
    return summary.print_closing(outputs, session.state, session.last_logs, time.time() - started)


def weigh_classes(cfg: Config, data: DataSet) -> np.ndarray | None:
    """train.class_weight as one weight per class (names checked against the data), after the
    warning that suggests weights for a strongly imbalanced training set trained without them."""
    counts = data.train.counts(len(data.class_names))
    warning = imbalance_warning(cfg.train.class_weight, data.class_names, counts)
    if warning:
        print(warning, flush=True)
    return class_weights(cfg.train.class_weight, data.class_names, counts)


def build_checked_model(cfg: Config, data: DataSet, strategy: tf.distribute.Strategy | None) -> keras.Model:
    """The model, with the settings that name its layers checked against it.

    Built before anything in checkpoint.dir is touched, so weights that cannot
    be had stop the run with every folder as it was.
    """
    model = build_model(cfg.model, len(data.class_names), cfg.data.image_size)
    check_unfreeze_after(model, cfg.train.finetune.unfreeze_after, cfg.model.name)
    check_cached_cut(model, cfg)
    if strategy:
        prepare_model_for_strategy(model, strategy, validation_batches(data, cfg.data))
    return model


def report_already_complete(cfg: Config, data: DataSet, done: Checkpoint, report_dir: Path, started: float) -> dict:
    """A rerun of a finished run: say so, write the report if it is missing, train nothing."""
    stops = describe_stops(done.state)
    longer = "raise train.early_stopping.patience or the epochs" if stops else "raise the epochs"
    print(
        f"This run is already complete{f' ({stops})' if stops else ''}: {cfg.model.save_path} was saved "
        f"from checkpoint {done.stem}. Nothing to do ({longer} to train longer, or +resume=false to start afresh)."
    )
    logs = done.manifest.get("logs", {})
    with space_for(report_dir):
        write_missing_report(report_dir, cfg, data, done.state, logs)
    return summary.outcome(cfg, done.state, logs, time.time() - started, "already complete")


def restore_or_start(
    session: Session, plan: ResumePlan, phases: list[Phase], also_on_commit: Callable[[Checkpoint], None]
) -> Checkpoint | None:
    """Restore the newest usable checkpoint into the session, or start at the first phase; the one restored.

    `also_on_commit(checkpoint)` runs after each later commit, once it is announced (the tracker's log).
    """
    outputs = session.outputs
    announce = prune_and_announce(outputs.checkpoint)

    def on_commit(ckpt: Checkpoint) -> None:
        announce(ckpt)
        also_on_commit(ckpt)

    # Made before the restore, where a fresh run makes it too: building it draws from
    # Keras's seed generators, and a fresh and a resumed run must draw alike (checkpoints/writer.py).
    session.writer = CheckpointWriter(outputs.checkpoint, session.fingerprint, session.model, on_commit)
    restored = restore_newest_usable(plan, session.compile_for_phase)
    if restored is None:
        session.state = TrainState(phase=phases[0].name)
        return None
    session.state = restored.state
    start = f"{restored.stem} ({plan.overridden})" if plan.overridden else restored.stem
    session.state.lineage = session.state.lineage + [start]
    if plan.overridden and session.state.batch:
        # A position inside an epoch means nothing in the changed data's shuffle: that epoch starts over.
        print(f"note: epoch {session.state.epoch + 1} starts over on the changed data", flush=True)
        session.state.batch = 0
    session.last_logs = restored.manifest.get("logs", {})
    return restored


def train_phases(session: Session, phases: list[Phase], compiled_for: str | None) -> None:
    """Run the remaining epochs of every phase, recompiling when the phase changes."""
    if session.cfg.distribute.strategy != "multi_worker":
        # Workers would see SIGTERM at different batches and wait on each other
        # forever; a multi-worker run resumes from its last checkpoint instead.
        session.stop.install()
    try:
        while (phase := advance(session.state, phases)) is not None:
            if compiled_for != phase.name:
                session.compile_for_phase(session.state)
                compiled_for = phase.name
            if session.feed is None or session.feed.phase != phase.name:
                first_epoch = session.state.epoch - session.state.phase_epoch
                session.feed = make_feed(
                    session.model,
                    session.data,
                    session.cfg,
                    phase.name,
                    first_epoch,
                    session.unfreeze_after,
                    session.class_weights,
                )
            fit_epoch(session, phase, session.feed)
            if session.stop.raised:  # SIGTERM arrived in the last batch, validation or the checkpoint
                raise Preempted(
                    f"stopped on SIGTERM after epoch {session.state.epoch}; run the same command to continue"
                )
    finally:
        # The last checkpoint commits (or its error surfaces) before the final save and exit;
        # the handler stays until then, or a SIGTERM meanwhile would kill the write with the process.
        try:
            session.checkpoints.wait()
        finally:
            session.stop.uninstall()
    if session.stop.raised:  # SIGTERM while the last checkpoint was being written: it has committed
        raise Preempted(
            f"stopped on SIGTERM after the last checkpoint committed (epoch {session.state.epoch}); "
            "run the same command to write the final model"
        )


def fit_epoch(session: Session, phase: Phase, feed: Feed) -> None:
    """Train one epoch of `phase` from state.batch on, then checkpoint as configured."""
    cfg, state = session.cfg, session.state
    print(
        f"{phase.name} epoch {state.phase_epoch + 1}/{phase.cfg.epochs} (epoch {state.epoch + 1} overall)", flush=True
    )
    batches = feed.train(state.epoch, state.batch)

    def save_mid_epoch(done: int, logs: dict) -> str:
        state.batch = done
        # No validation yet: every val_ metric is NaN (the name's field, and never the best).
        return write_checkpoint(session, {**logs, **{k: float("nan") for k in METRICS if k.startswith("val_")}})

    saver = BatchSaver(
        save_mid_epoch, cfg.checkpoint.every_batches, state.batch, batches.batches_per_epoch, session.stop
    )
    train_data, validation = batches, feed.validation
    if session.strategy:  # cached phases are refused with distribute (config.py)
        train_data = distribute_batches(batches, session.strategy)
        validation = distribute_batches(feed.validation, session.strategy)
    # shuffle=False: Batches already shuffles by (seed, epoch). fit() would reorder
    # batches with Python's global `random`, whose state a resumed process does not share.
    history = feed.model.fit(
        train_data,
        validation_data=validation,
        epochs=1,
        shuffle=False,
        callbacks=[saver, FirstStepTimer(), *session.callbacks],
        verbose=1 if sys.stdout.isatty() else 2,
    )
    session.last_logs = {k: float(v[-1]) for k, v in history.history.items()}
    # Not under a strategy: reading a multi-worker metric is a collective step every worker would have to join.
    session.validated = None if session.strategy else last_confusion(feed.model)
    state.epoch, state.phase_epoch, state.batch = state.epoch + 1, state.phase_epoch + 1, 0
    value = session.last_logs.get(phase.stopping.monitor)
    stops = count_epoch(state, value, phase.stopping, phase.cfg.epochs)
    if stops:
        print(announce_stop(state, phase.stopping), flush=True)
    disk_full = history_failure(session.callbacks)
    boundary = state.phase_epoch % cfg.checkpoint.every == 0 or state.phase_epoch == phase.cfg.epochs
    # With model.final=best, a new best is always checkpointed, so the final model can be the best epoch.
    new_best = cfg.model.final == "best" and monitor_improved(cfg, value, state.best)
    # Not with a strategy: workers save in step, and the others' disks are not full.
    if boundary or stops or new_best or session.stop.raised or (disk_full and not session.strategy):
        write_checkpoint(session, session.last_logs)
    if disk_full:  # the epoch is checkpointed (or its own error says why not) before the run stops
        session.checkpoints.wait()
        raise disk_full


def history_failure(callbacks: list) -> DiskFull | None:
    """The full disk history.csv or TensorBoard met at this epoch's end (history.EpochRecorder), if any."""
    return next((cb.failed for cb in callbacks if getattr(cb, "failed", None)), None)


def write_checkpoint(session: Session, logs: dict) -> str:
    """Checkpoint the model as it is now (recording whether it is the best so far).

    With checkpoint.asynchronous the files are written in the background
    (checkpoint_writer.py); the writer prunes old ones and prints the
    `checkpoint:` line once this one has committed.
    """
    cfg, state = session.outputs, session.state
    session.checkpoints.wait()  # the previous one committed: its name is taken, its error raised here
    stem = checkpoint_stem(cfg.checkpoint, state, logs)
    value = logs.get(cfg.checkpoint.monitor)
    if monitor_improved(cfg, value, state.best):
        state.best, state.best_stem = value, stem
    session.checkpoints.submit(session.model, stem, state, logs, background=not session.stop.raised)
    return stem


def monitor_improved(cfg: Config, value: float | None, best: float | None) -> bool:
    """Whether `value` is a new best by checkpoint.monitor (any improvement: min_delta is early stopping's)."""
    return improves(value, best, resolve_mode(cfg.checkpoint.monitor, cfg.checkpoint.mode))


def load_final_weights(session: Session) -> Checkpoint | None:
    """With model.final=best, put the best checkpoint's weights into the model; the checkpoint they came from.

    Verified first: the final file must not claim an epoch whose weights are damaged.
    None with model.final=last, or when no epoch has a monitor value yet.
    """
    cfg, state = session.outputs, session.state
    if cfg.model.final != "best" or state.best_stem is None:
        return None
    best = next((c for c in list_checkpoints(Path(cfg.checkpoint.dir)) if c.stem == state.best_stem), None)
    problem = f"is not in {cfg.checkpoint.dir}" if best is None else verify(best)
    if best is None or problem:
        raise CheckpointError(
            f"model.final=best: the best checkpoint {state.best_stem} {problem}; nothing was saved. "
            "Run with model.final=last to save the last epoch's weights"
        )
    load_weights(session.model, best)
    print(
        f"final model: the weights of the best checkpoint, {best.stem} "
        f"(epoch {best.state.epoch}, {cfg.checkpoint.monitor} {state.best:.4f})",
        flush=True,
    )
    return best


def final_metadata(session: Session, weights_from: Checkpoint | None = None) -> dict:
    """What the final file says about itself; `weights_from` is the checkpoint whose weights it carries (best)."""
    cfg, state = session.outputs, session.state
    found = list_checkpoints(Path(cfg.checkpoint.dir))
    source = weights_from.state if weights_from else state
    return {
        "class_names": session.data.class_names,
        "image_size": cfg.data.image_size,
        "final_checkpoint": found[-1].identity if found else None,
        "lineage": state.lineage,
        "best": {"monitor": cfg.checkpoint.monitor, "value": state.best, "checkpoint": state.best_stem},
        # Which epoch's weights the file holds: model.final=best picks the best checkpoint's.
        "weights": {
            "final": cfg.model.final,
            "checkpoint": weights_from.stem if weights_from else (found[-1].stem if found else None),
            "epoch": source.epoch,
            "phase": source.phase,
        },
        "early_stopping": state.stopped,
        "last_logs": session.last_logs,
        "config": asdict(cfg),
    }


def write_report(session: Session, report_dir: Path, weights_from: Checkpoint | None) -> None:
    """report.md and its figures, scored the way the last phase validated (cached features or images).

    The final model's confusion matrix is the one its last validation counted when the final
    weights are the last epoch's (model.final=last), and predicted again otherwise.
    """
    feed = session.feed
    write_run_report(
        report_dir,
        session.outputs,
        session.data,
        session.model,
        session.state,
        session.last_logs,
        (feed.model, feed.validation) if feed else None,
        session.validated if weights_from is None else None,
    )


def finished_run(cfg: Config, plan: ResumePlan, phases: list[Phase]) -> Checkpoint | None:
    """The newest checkpoint if training is done and the final model came from it, with the weights asked for.

    Training is done when every phase ran its epochs or stopped early (advance);
    a final file of the other model.final (older files: last) is saved again.
    """
    newest = plan.candidates[0] if plan.candidates else None
    if newest is None or advance(newest.state, phases) is not None:
        return None
    meta = read_metadata_or_none(Path(cfg.model.save_path))
    if not meta or meta.get("weights", {}).get("final", "last") != cfg.model.final:
        return None
    return newest if meta.get("final_checkpoint") == newest.identity else None
