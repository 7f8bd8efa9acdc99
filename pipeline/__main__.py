"""`python -m pipeline [overrides]`: compose the config, validate it, hand off to train.run.

Errors a user can fix (a bad key, a broken folder, missing weights, foreign
checkpoints; pipeline/errors.py lists them) end with one message naming the
culprit and exit code 2, no traceback; HYDRA_FULL_ERROR=1 shows the traceback
for debugging.
"""

import os
import signal
import sys
from pathlib import Path

# TensorFlow's C++ start-up chatter hides the messages that matter.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from pipeline.checkpoints.lock import lock_for_run  # noqa: E402
from pipeline.config import register_config, run_name, to_config  # noqa: E402
from pipeline.data.labels_csv import read_label_files  # noqa: E402
from pipeline.distribute.local_workers import run_local_workers  # noqa: E402
from pipeline.distribute.tf_config import check_tf_config  # noqa: E402
from pipeline.errors import (  # noqa: E402
    ConfigError,
    LabelFileError,
    TrackingError,
    WorkerFailed,
    is_preemption,
    is_user_error,
)
from pipeline.process_exit import run_then_end  # noqa: E402
from pipeline.quiet import import_tensorflow_quietly  # noqa: E402
from pipeline.reports.tracking import check_tracking  # noqa: E402
from pipeline.run_names import adopt_folder_named_with_epochs  # noqa: E402
from pipeline.sweep.job_process import run_in_child  # noqa: E402
from pipeline.sweep.memory import peak_memory_mb, reset_peak_memory  # noqa: E402
from pipeline.sweep.results import write_result  # noqa: E402

register_config()


def parse_resume(value):
    """`+resume=true|false|anyway` adds the key; absent means resume by itself when possible.

    `anyway` continues from a checkpoint made on data that has changed since (resume.py).
    """
    if value is None or isinstance(value, bool) or value == "anyway":
        return value
    raise ConfigError(
        f"resume={value!r} must be true, false or anyway (spelled +resume=true / +resume=false / +resume=anyway)"
    )


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig):
    try:
        resume = parse_resume(cfg.get("resume"))
        config, notes = to_config(cfg)
        if config.data.labels_csv:  # every row, before the run's folder or checkpoints are written to
            read_label_files(config.data)
        give_sweep_job_its_own_paths(config)
        check_tf_config(config.distribute)
        # A tracking server that does not answer stops the run here, with nothing written (reports/tracking.py).
        config.logger = check_tracking(config.logger)
        # Before anything in checkpoint.dir or the run's folder is cleaned or truncated (lock.py).
        with lock_for_run(config):
            outcome = run_training(cfg, config, notes, resume)
            record_result({"peak_mb": peak_memory_mb(), **outcome})  # a launcher reports its chief's
        # What Hydra's sweepers (Optuna) optimise: the best monitored value.
        return outcome["best"] if outcome["best"] is not None else float("nan")
    except WorkerFailed as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except Exception as err:
        if is_preemption(err):
            print(str(err), flush=True)
            sys.exit(128 + signal.SIGTERM)  # the shell's code for "ended by SIGTERM"
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or not is_user_error(err):
            raise
        print(f"error: {err}", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # One bad job must not end the sweep: it is recorded, the others run,
            # and the summary at the end exits non-zero (pipeline/sweep/results.py).
            record_result({"status": f"error: {err}"})
            return float("nan")
        if isinstance(err, (ConfigError, LabelFileError, TrackingError)):
            remove_empty_run_dir()
        sys.exit(2)


def run_training(cfg: DictConfig, config, notes: list[str], resume: bool | None) -> dict:
    """Record the config, then train here, in a child process (a sweep job) or in local workers."""
    record_run_config(cfg)
    for note in notes:
        print(f"note: {note}")
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    reset_peak_memory()
    if HydraConfig.get().mode == RunMode.MULTIRUN and not config.distribute.local_workers:
        return run_in_child(config, resume, run_dir)  # job_process.py: why a child per job
    import_tensorflow_quietly()  # only once the config is known good: bad input fails in a second
    if config.distribute.local_workers and not os.environ.get("TF_CONFIG"):
        return launch_local_workers(config, run_dir)
    from pipeline.train import run

    return run(config, resume, run_dir)


def launch_local_workers(config, run_dir: Path) -> dict:
    """Prepare the data here, before the workers start, so they do not race to write the sample set
    (each worker's own prepare_data then finds it, and the image check's verdicts cached); then run them."""
    from pipeline.data.prepare import prepare_data

    prepare_data(config.data, run_dir)
    return run_local_workers(
        config.distribute.local_workers,
        list(HydraConfig.get().overrides.task),
        config.checkpoint.dir,
        config.model.save_path,
        run_dir,
    )


def record_result(outcome: dict) -> None:
    """result.json in the run's folder, which the sweep summary gathers."""
    hydra_cfg = HydraConfig.get()
    write_result(Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task), outcome)


def record_run_config(cfg: DictConfig) -> None:
    """Write the composed config and the overrides into the run's folder (Hydra's .hydra/)."""
    hydra_cfg = HydraConfig.get()
    record = Path(hydra_cfg.runtime.output_dir) / ".hydra"
    record.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, record / "config.yaml")
    OmegaConf.save(OmegaConf.create(list(hydra_cfg.overrides.task)), record / "overrides.yaml")


def remove_empty_run_dir() -> None:
    """Hydra creates the run folder before the config is validated; a rejected run removes it."""
    folder = Path(HydraConfig.get().runtime.output_dir).resolve()
    cwd = Path.cwd().resolve()
    # The run folder itself, then empty parents Hydra made below the working folder (outputs/).
    while folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent
        if folder == cwd or cwd not in folder.parents:
            break


def give_sweep_job_its_own_paths(config) -> None:
    """In a multirun sweep, each job checkpoints and saves under its own name.

    The name is the job's overrides (Hydra's override_dirname), not the clock,
    so jobs never share files and a rerun of the sweep finds each job's own
    checkpoints, also with more epochs (they are not part of the name). A
    single run keeps ckpt/ and model/ as configured.
    """
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    job = run_name(hydra_cfg.job.override_dirname)
    config.checkpoint.dir = str(Path(config.checkpoint.dir) / job)
    if note := adopt_folder_named_with_epochs(Path(config.checkpoint.dir)):
        print(f"note: {note}")
    save_path = Path(config.model.save_path)
    config.model.save_path = str(save_path.parent / job / save_path.name)
    group_sweep_tracking(config.logger, hydra_cfg)


def group_sweep_tracking(logger, hydra_cfg) -> None:
    """A sweep's jobs are one MLflow experiment, named after the sweep folder; each job is tagged
    with its number, which for an Optuna sweep is its trial's."""
    logger.experiment = f"{logger.experiment}/{str(hydra_cfg.sweep.dir).strip('/')}"  # no `//` for an absolute dir
    logger.tags = {**logger.tags, "sweep.dir": str(hydra_cfg.sweep.dir), "sweep.job": str(hydra_cfg.job.num)}
    sweeper = str(hydra_cfg.sweeper.get("_target_", ""))
    if "optuna" in sweeper.lower():
        logger.tags["optuna.study"] = str(hydra_cfg.sweeper.get("study_name"))
        logger.tags["optuna.trial"] = str(hydra_cfg.job.num)


if __name__ == "__main__":
    run_then_end(main)  # process_exit.py: no 3 s of teardown after the work is done
