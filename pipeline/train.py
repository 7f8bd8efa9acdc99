"""The stages in order: data -> model -> resume plan -> head phase -> fine-tune phase -> final save."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import keras
import tensorflow as tf

from pipeline.checkpoints.resume import plan_resume, restore_newest_usable
from pipeline.checkpoints.store import (
    Checkpoint,
    CheckpointError,
    DiskFull,
    TrainState,
    checkpoint_stem,
    list_checkpoints,
    space_for,
)
from pipeline.checkpoints.writer import CheckpointWriter, prune_and_announce
from pipeline.config import Config, ConfigError, PhaseConfig
from pipeline.data.dataset import DataError, DataSet, ensure_sample_data, read_dataset, validation_batches
from pipeline.data.image_check import check_images
from pipeline.distribute.strategy import (
    distribute_batches,
    make_strategy,
    prepare_model_for_strategy,
    scratch_folder,
    strategy_scope,
)
from pipeline.distribute.tf_config import WorkerRole, read_worker_role
from pipeline.model import (
    WeightsError,
    build_model,
    check_unfreeze_after,
    compile_model,
    resolve_unfreeze_after,
    set_trainable,
)
from pipeline.model_file.save import read_metadata, save_final
from pipeline.reports import console as summary
from pipeline.reports.history import start_history
from pipeline.reports.report import write_missing_report, write_run_report
from pipeline.training.batch_saver import BatchSaver, Preempted, StopFlag
from pipeline.training.cached_phase import Feed, check_cached_cut, make_feed
from pipeline.training.first_step_timer import FirstStepTimer
from pipeline.training.precision import set_precision

# Errors whose message tells the user what to fix; the entry point prints them without a traceback.
USER_ERRORS = (ConfigError, DataError, WeightsError, CheckpointError, DiskFull)
PHASE_ORDER = ("head", "finetune")


@dataclass
class Phase:
    name: str
    cfg: PhaseConfig


@dataclass
class Session:
    """What the stages of one run share."""

    cfg: Config
    data: DataSet
    model: keras.Model
    fingerprint: dict
    writer: CheckpointWriter
    # Where checkpoints and the final model are written: `cfg` itself, except on a
    # non-chief worker of a multi-worker run, whose copies go to a scratch folder.
    out: Config
    strategy: tf.distribute.Strategy | None = None
    state: TrainState = field(default_factory=TrainState)
    last_logs: dict = field(default_factory=dict)
    stop: StopFlag = field(default_factory=StopFlag)
    feed: Feed | None = None  # what the current phase's fit() runs on (cached_phase.py)
    callbacks: list = field(default_factory=list)  # per-epoch records (history.py), passed to every fit

    @property
    def pretrained(self) -> bool:
        return self.cfg.model.weights is not None

    @property
    def unfreeze_after(self) -> str | None:
        return resolve_unfreeze_after(self.cfg.train.finetune.unfreeze_after, self.pretrained)

    def prepare(self, state: TrainState) -> keras.Model:
        """Set trainable layers and compile for `state.phase`.

        By the state's own phase, even one now configured with 0 epochs: the
        optimizer state being restored belongs to that phase's trainable layers.
        """
        phase_cfg = getattr(self.cfg.train, state.phase)
        set_trainable(self.model, state.phase, self.unfreeze_after, self.pretrained)
        steps = phase_cfg.epochs * math.ceil(len(self.data.train.filepaths) / self.cfg.data.batch_size)
        compile_model(self.model, phase_cfg.optimizer, phase_cfg.lr, phase_cfg.schedule, steps)
        return self.model


def configure_tensorflow(cfg: Config) -> None:
    """A clean Keras state, seeds, and op determinism for bit-exact runs and resumes."""
    # Sweep jobs run one after another in one process: free the previous job's graphs and names.
    keras.backend.clear_session()
    keras.utils.set_random_seed(cfg.train.seed)
    set_precision(cfg.train.precision)
    if cfg.train.threads:
        set_threads(tf.config.threading.set_intra_op_parallelism_threads, cfg.train.threads)
    if cfg.train.deterministic:
        tf.config.experimental.enable_op_determinism()
        # Op determinism alone still let two processes end with different weights; one
        # inter-op thread made them agree bit for bit (docs/checkpoints-and-resume.md: Determinism).
        set_threads(tf.config.threading.set_inter_op_parallelism_threads, 1)


def set_threads(setter, count: int) -> None:
    """TensorFlow accepts thread settings only before its runtime starts, so a
    later job of the same sweep process keeps the first job's setting."""
    try:
        setter(count)
    except RuntimeError:
        pass


def plan_phases(cfg: Config) -> list[Phase]:
    return [Phase(name, getattr(cfg.train, name)) for name in PHASE_ORDER if getattr(cfg.train, name).epochs > 0]


def advance(state: TrainState, phases: list[Phase]) -> Phase | None:
    """Move `state` past finished phases; the phase to train next, or None when all are done."""
    for phase in phases:
        if PHASE_ORDER.index(phase.name) < PHASE_ORDER.index(state.phase):
            continue
        if phase.name != state.phase:
            state.phase, state.phase_epoch, state.batch = phase.name, 0, 0
        if state.phase_epoch < phase.cfg.epochs:
            return phase
    return None


def make_fingerprint(cfg: Config, data: DataSet) -> dict:
    """What must match for a checkpoint to continue this run (not the epochs, which may grow)."""
    return {
        "architecture": "InceptionV3+GAP+dropout+dense",
        "classes": data.class_names,
        "image_size": cfg.data.image_size,
        "dropout": cfg.model.dropout,
        "pretrained": cfg.model.weights is not None,
        "data_dir": str(Path(cfg.data.dir).resolve()),
        "train_images": len(data.train.filepaths),
        "validation_images": len(data.validation.filepaths),
    }


def run(cfg: Config, resume: bool | None = None, report_dir: Path = Path("outputs/default")) -> dict:
    """Train (or continue training) and save the final model; return the closing summary.

    `report_dir` is the run's output folder (Hydra's), for reports such as the bad-image list.
    Under distribute=multi_worker every worker runs this; only the chief's writes are kept.
    """
    configure_tensorflow(cfg)
    strategy = make_strategy(cfg.distribute)
    role = read_worker_role() if cfg.distribute.strategy == "multi_worker" else WorkerRole()
    # A full disk in a write not named below (space_for at each known one) still ends in one line.
    with space_for(), scratch_folder(role) as scratch, strategy_scope(strategy):
        out = cfg
        if strategy:  # every worker must save in step with the others: no background writer
            out = replace(out, checkpoint=replace(out.checkpoint, asynchronous=False))
        if scratch is None:
            return train_and_save(cfg, out, resume, report_dir, strategy)
        out = replace(
            out,
            checkpoint=replace(out.checkpoint, dir=f"{scratch}/ckpt"),
            model=replace(out.model, save_path=f"{scratch}/model.h5"),
        )
        return train_and_save(cfg, out, resume, Path(scratch), strategy, read_only=True)


def train_and_save(
    cfg: Config,
    out: Config,
    resume: bool | None,
    report_dir: Path,
    strategy: tf.distribute.Strategy | None,
    read_only: bool = False,
) -> dict:
    """The stages in order, reading checkpoints from cfg's paths and writing to out's."""
    started = time.time()
    ensure_sample_data(cfg.data)
    # Every image decoded now, in seconds, rather than failing hours into the run.
    data = check_images(read_dataset(cfg.data), cfg.data, report_dir)
    # Built before anything in checkpoint.dir is touched, so weights that cannot
    # be had stop the run with every folder as it was.
    model = build_model(cfg.model, len(data.class_names), cfg.data.image_size)
    check_unfreeze_after(model, cfg.train.finetune.unfreeze_after)
    check_cached_cut(model, cfg)
    fingerprint = make_fingerprint(cfg, data)
    if strategy:
        prepare_model_for_strategy(model, strategy, validation_batches(data, cfg.data))
    plan = plan_resume(Path(cfg.checkpoint.dir), fingerprint, resume, read_only)
    phases = plan_phases(cfg)
    done = finished_run(cfg, plan.candidates[0] if plan.candidates else None, phases)
    if done:
        print(
            f"This run is already complete: {cfg.model.save_path} was saved from checkpoint "
            f"{done.stem}. Nothing to do (raise the epochs to train longer, or +resume=false to start afresh)."
        )
        with space_for(report_dir):
            write_missing_report(report_dir, cfg, data, done.state, done.manifest.get("logs", {}))
        return summary.outcome(
            cfg, done.state, done.manifest.get("logs", {}), time.time() - started, "already complete"
        )
    writer = CheckpointWriter(out.checkpoint, fingerprint, model, prune_and_announce(out.checkpoint))
    session = Session(cfg, data, model, fingerprint, writer, out, strategy)
    restored = restore_newest_usable(plan, session.prepare)
    if restored:
        session.state = restored.state
        session.state.lineage = session.state.lineage + [restored.stem]
        session.last_logs = restored.manifest.get("logs", {})
    else:
        session.state = TrainState(phase=phases[0].name)
    # history.csv and TensorBoard drop what was trained after the restored checkpoint.
    session.callbacks = start_history(
        report_dir,
        lambda: session.state,
        restored.stem if restored else None,
        restored.manifest.get("logs", {}) if restored else None,
    )
    summary.print_startup(cfg, data, phases, plan.reason, restored, session.unfreeze_after)
    train_phases(session, phases, compiled_for=session.state.phase if restored else None)
    save_final(model, Path(out.model.save_path), final_metadata(session))
    feed = session.feed
    scorer = (feed.model, feed.validation) if feed else None
    with space_for(report_dir):
        write_run_report(report_dir, out, data, model, session.state, session.last_logs, scorer)
    return summary.print_closing(out, session.state, session.last_logs, time.time() - started)


def train_phases(session: Session, phases: list[Phase], compiled_for: str | None) -> None:
    """Run the remaining epochs of every phase, recompiling when the phase changes."""
    if session.cfg.distribute.strategy != "multi_worker":
        # Workers would see SIGTERM at different batches and wait on each other
        # forever; a multi-worker run resumes from its last checkpoint instead.
        session.stop.install()
    try:
        while (phase := advance(session.state, phases)) is not None:
            if compiled_for != phase.name:
                session.prepare(session.state)
                compiled_for = phase.name
            if session.feed is None or session.feed.phase != phase.name:
                first_epoch = session.state.epoch - session.state.phase_epoch
                session.feed = make_feed(
                    session.model, session.data, session.cfg, phase.name, first_epoch, session.unfreeze_after
                )
            fit_epoch(session, phase, session.feed)
            if session.stop.raised:  # SIGTERM arrived during validation or the checkpoint
                raise Preempted(
                    f"stopped on SIGTERM after epoch {session.state.epoch}; run the same command to continue"
                )
    finally:
        session.stop.uninstall()
        # The last checkpoint commits (or its error surfaces) before the final save and exit.
        session.writer.wait()


def fit_epoch(session: Session, phase: Phase, feed: Feed) -> None:
    """Train one epoch of `phase` from state.batch on, then checkpoint as configured."""
    cfg, state = session.cfg, session.state
    print(
        f"{phase.name} epoch {state.phase_epoch + 1}/{phase.cfg.epochs} (epoch {state.epoch + 1} overall)", flush=True
    )
    batches = feed.train(state.epoch, state.batch)

    def save_mid_epoch(done: int, logs: dict) -> str:
        state.batch = done
        return write_checkpoint(session, {**logs, "val_loss": float("nan"), "val_accuracy": float("nan")})

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
    state.epoch, state.phase_epoch, state.batch = state.epoch + 1, state.phase_epoch + 1, 0
    disk_full = history_failure(session.callbacks)
    boundary = state.phase_epoch % cfg.checkpoint.every == 0 or state.phase_epoch == phase.cfg.epochs
    # Not with a strategy: workers save in step, and the others' disks are not full.
    if boundary or session.stop.raised or (disk_full and not session.strategy):
        write_checkpoint(session, session.last_logs)
    if disk_full:  # the epoch is checkpointed (or its own error says why not) before the run stops
        session.writer.wait()
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
    cfg, state = session.out, session.state
    session.writer.wait()  # the previous one committed: its name is taken, its error raised here
    stem = checkpoint_stem(cfg.checkpoint, state, logs)
    value = logs.get(cfg.checkpoint.monitor)
    if monitor_improved(cfg, value, state.best):
        state.best, state.best_stem = value, stem
    session.writer.submit(session.model, stem, state, logs, background=not session.stop.raised)
    return stem


def monitor_improved(cfg: Config, value: float | None, best: float | None) -> bool:
    if value is None or value != value:  # NaN: mid-epoch checkpoints have no validation yet
        return False
    if best is None:
        return True
    mode = cfg.checkpoint.mode
    if mode == "auto":
        mode = "max" if "acc" in cfg.checkpoint.monitor else "min"
    return value > best if mode == "max" else value < best


def final_metadata(session: Session) -> dict:
    cfg, state = session.out, session.state
    found = list_checkpoints(Path(cfg.checkpoint.dir))
    return {
        "class_names": session.data.class_names,
        "image_size": cfg.data.image_size,
        "final_checkpoint": found[-1].identity if found else None,
        "lineage": state.lineage,
        "best": {"monitor": cfg.checkpoint.monitor, "value": state.best, "checkpoint": state.best_stem},
        "last_logs": session.last_logs,
        "config": asdict(cfg),
    }


def finished_run(cfg: Config, newest: Checkpoint | None, phases: list[Phase]) -> Checkpoint | None:
    """The newest checkpoint if training is done and the final model came from it."""
    if newest is None or advance(newest.state, phases) is not None:
        return None
    meta = read_metadata(Path(cfg.model.save_path))
    return newest if meta and meta.get("final_checkpoint") == newest.identity else None
