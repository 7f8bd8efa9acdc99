"""Experiment tracking in MLflow (logger=mlflow): one MLflow run per training run, continued on resume.

The MLflow run id is kept with the checkpoints (`<checkpoint.dir>/tracking.json`),
so the same command that resumes training continues the same MLflow run;
`+resume=false` moves the file to archive/ with the checkpoints, so a fresh
start is a new MLflow run. An epoch's metrics are logged only once its
checkpoint has committed (the writer's on_commit), read from history.csv: an
epoch that a kill makes train again never has a point. Before logging, each
step is looked up in what the MLflow run already holds, so an epoch committed
by a run killed before it could log is logged by the resumed run, and none twice.

TensorFlow-free and mlflow-free at import: the entry point checks the tracker
before anything is written, and mlflow stays an optional extra.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from pipeline.atomic_file import write_json
from pipeline.config import Config, LoggerConfig
from pipeline.errors import ConfigError, TrackingError

RUN_FILE = "tracking.json"  # in checkpoint.dir: which MLflow run this training run is
METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds")  # history.csv's columns, logged by epoch
REPORT_FILES = ("report.md", "curves.png", "confusion_matrix.png", "history.csv")
INSTALL = "pip install -e '.[mlflow]' (make installs it)"


# ---- before anything is written (the entry point) -------------------------


def check_tracking(cfg: LoggerConfig) -> LoggerConfig:
    """mlflow importable and the server answering, within `cfg.timeout`; the logger config to run with.

    An unreachable server raises TrackingError, or with on_error=warn says so
    once and returns the config with tracking off.
    """
    if cfg.name == "none":
        return cfg
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise ConfigError(f"logger=mlflow needs the mlflow package, which is not installed: {INSTALL}") from None
    bound_requests(cfg)
    problem = probe(cfg.tracking_uri, cfg.timeout)
    if problem is None:
        return cfg
    if cfg.on_error == "warn":
        print(f"warning: {problem}; training without tracking (logger.on_error=warn)", flush=True)
        return replace(cfg, name="none")
    raise TrackingError(
        f"{problem}. Start it, point logger.tracking_uri elsewhere, or set logger.on_error=warn to train "
        "without tracking. Nothing was written."
    )


def bound_requests(cfg: LoggerConfig) -> None:
    """MLflow's HTTP client reads these: without them a dead server holds a run for minutes (120 s, 7 retries)."""
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(cfg.timeout)
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(cfg.retries)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"


def probe(uri: str, timeout: float) -> str | None:
    """Why the tracking server at `uri` cannot be used, or None; only http(s) servers are asked."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # it answered: a proxy without /health still serves the API
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        return f"logger.tracking_uri={uri}: the tracking server does not answer within {timeout} s ({reason})"


# ---- during the run -------------------------------------------------------


class Tracker:
    """The MLflow run of one training run: params and tags at start, each committed epoch once, artifacts at the end.

    A tracker made with `client=None` does nothing (logger=none, a non-chief worker).
    """

    def __init__(self, cfg: LoggerConfig, client: Any = None, run_id: str = "", report_dir: Path = Path()):
        self.cfg, self.client, self.run_id, self.report_dir = cfg, client, run_id, Path(report_dir)
        self.logged: dict[str, set[int]] = {}  # steps the MLflow run holds, per metric

    @property
    def active(self) -> bool:
        return self.client is not None

    def log_committed_epochs(self, upto: int) -> None:
        """Log history.csv's rows for epochs 1..`upto` (all committed) that the MLflow run does not hold yet."""
        if not self.active:
            return
        from mlflow.entities import Metric

        from pipeline.reports.history import HISTORY, read_history

        now = int(time.time() * 1000)
        metrics = [
            Metric(key, row[key], now, row["epoch"])
            for row in read_history(self.report_dir / HISTORY)
            if row["epoch"] <= upto
            for key in METRICS
            if row[key] == row[key] and row["epoch"] not in self.logged.setdefault(key, set())  # NaN: not measured
        ]
        for start in range(0, len(metrics), 1000):  # MLflow's limit per batch
            self.call(self.client.log_batch, self.run_id, metrics=metrics[start : start + 1000])
        for metric in metrics:
            self.logged[metric.key].add(metric.step)

    def on_commit(self, ckpt) -> None:
        """The writer's on_commit: the checkpoint's completed epochs are safe to show."""
        self.log_committed_epochs(ckpt.state.epoch)

    def finish(self, model_path: Path) -> None:
        """The report, figures and history.csv (and with log_model the final model) as artifacts; run FINISHED."""
        if not self.active:
            return
        for name in REPORT_FILES:
            if (self.report_dir / name).is_file():
                self.call(self.client.log_artifact, self.run_id, str(self.report_dir / name), "report")
        if self.cfg.log_model:
            for path in (model_path, model_path.with_suffix(".json")):  # the .json holds the class names
                if path.is_file():
                    self.call(self.client.log_artifact, self.run_id, str(path), "model")
        self.end("FINISHED")

    def end(self, status: str) -> None:
        """Mark the MLflow run ended; a resumed run sets it RUNNING again."""
        if self.active:
            self.call(self.client.set_terminated, self.run_id, status)

    def end_quietly(self, status: str) -> None:
        """end() on the way out of a failed run: its own error must not hide the run's."""
        try:
            self.end(status)
        except TrackingError:
            pass

    def call(self, method, *args, **kwargs) -> None:
        """One request to MLflow. A failure stops the run (on_error=fail: committed work is safe, and
        the same command continues and logs what is missing) or, with warn, tracking only, said once."""
        from mlflow.exceptions import MlflowException

        try:
            method(*args, **kwargs)
        except (MlflowException, OSError) as err:
            self.give_up(err)

    def give_up(self, err: BaseException) -> None:
        """Raise TrackingError, or with on_error=warn say once that tracking stopped and carry on without it."""
        message = f"MLflow tracking at {self.cfg.tracking_uri} failed: {one_line(err)}"
        if self.cfg.on_error != "warn":
            raise TrackingError(
                f"{message}. Committed work is safe: run the same command to continue (logger.on_error=warn trains on)"
            ) from None
        print(f"warning: {message}; tracking stopped, training goes on (logger.on_error=warn)", flush=True)
        self.client = None


def start_tracking(cfg: Config, report_dir: Path, checkpoint_dir: Path, fresh: bool) -> Tracker:
    """The MLflow run named in checkpoint_dir's tracking.json, continued; or a new one, recorded there.

    Call after the resume plan (which archives tracking.json on +resume=false) and before any epoch.
    `fresh`: training starts from epoch 0, so a recorded run that holds epochs is not continued.
    """
    logger = cfg.logger
    if logger.name == "none":
        return Tracker(logger)
    import mlflow
    from mlflow.tracking import MlflowClient

    quiet_mlflow()
    bound_requests(logger)
    client = MlflowClient(logger.tracking_uri)
    tracker = Tracker(logger, client, "", report_dir)
    try:
        run = continued_run(client, Path(checkpoint_dir) / RUN_FILE, logger.tracking_uri, fresh)
        if run is None:
            run = new_run(client, logger, report_dir.name, Path(checkpoint_dir))
        tracker.run_id = run.info.run_id
        record_config(client, run, cfg, report_dir)
        tracker.logged = {key: {m.step for m in client.get_metric_history(run.info.run_id, key)} for key in METRICS}
    except (mlflow.exceptions.MlflowException, OSError) as err:
        tracker.give_up(err)
    return tracker


def continued_run(client, run_file: Path, uri: str, fresh: bool):
    """The MLflow run a previous process of this training run opened, set RUNNING; None if there is none,
    or if training starts afresh (its checkpoints removed by hand) and the run holds epochs."""
    try:
        recorded = json.loads(run_file.read_text())
    except (OSError, ValueError):
        return None
    if recorded.get("tracking_uri") != uri:
        return None  # recorded elsewhere: that run id means nothing in this store
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(recorded["run_id"])
    except MlflowException:
        print(f"note: MLflow run {recorded['run_id']} ({run_file}) is gone from {uri}; starting a new one")
        return None
    if fresh and run.data.metrics:
        print(f"note: training starts afresh; MLflow run {run.info.run_id} keeps the earlier epochs, a new one starts")
        return None
    client.update_run(run.info.run_id, status="RUNNING")
    print(f"MLflow: continuing run {run.info.run_id} in {uri}", flush=True)
    return run


def new_run(client, logger: LoggerConfig, name: str, checkpoint_dir: Path):
    """A new MLflow run in the configured experiment; its id is written beside the checkpoints before any log."""
    experiment = client.get_experiment_by_name(logger.experiment)
    if experiment is None:
        experiment_id = create_experiment(client, logger)
    else:
        experiment_id = experiment.experiment_id
    run = client.create_run(experiment_id, run_name=name)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    record = {"run_id": run.info.run_id, "experiment_id": experiment_id, "tracking_uri": logger.tracking_uri}
    write_json(checkpoint_dir / RUN_FILE, record, durable=True)
    print(f"MLflow: run {run.info.run_id} in {logger.tracking_uri} (experiment {logger.experiment})", flush=True)
    return run


def create_experiment(client, logger: LoggerConfig) -> str:
    """Created with its artifacts beside a local SQLite store; two sweep jobs may race to create it."""
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(logger.experiment, artifact_location=local_artifact_root(logger.tracking_uri))
    except MlflowException:
        existing = client.get_experiment_by_name(logger.experiment)
        if existing is None:
            raise
        return existing.experiment_id


def local_artifact_root(uri: str) -> str | None:
    """`mlruns/` beside a SQLite store's file, so the local store is one place; a server decides its own."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///") :]).resolve().parent / "mlruns").as_uri()


def record_config(client, run, cfg: Config, report_dir: Path) -> None:
    """The composed config as params (flattened keys), the overrides and logger.tags as tags.

    MLflow's params cannot change: on resume only new keys are logged, and a changed
    value (say, more epochs) is recorded as the tag `changed.<key>`.
    """
    from mlflow.entities import Param, RunTag

    params = flatten(asdict(cfg))
    held = run.data.params
    new = [Param(k, v) for k, v in params.items() if k not in held]
    tags = {f"changed.{k}": v for k, v in params.items() if k in held and held[k] != v}
    overrides = read_overrides(report_dir)
    tags.update({"overrides": " ".join(overrides)} if overrides else {})
    tags.update({f"override.{o.partition('=')[0]}": o.partition("=")[2] for o in overrides})
    tags.update(cfg.logger.tags)
    for start in range(0, len(new), 100):  # MLflow's limit of params per batch
        client.log_batch(run.info.run_id, params=new[start : start + 100])
    client.log_batch(run.info.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """{"data": {"image_size": 75}} -> {"data.image_size": "75"}."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def read_overrides(report_dir: Path) -> list[str]:
    """The command line's overrides, as the entry point recorded them in the run's .hydra/."""
    import yaml

    try:
        return [str(o) for o in yaml.safe_load((Path(report_dir) / ".hydra" / "overrides.yaml").read_text()) or []]
    except (OSError, yaml.YAMLError):
        return []


def quiet_mlflow() -> None:
    """A new SQLite store logs every schema migration at INFO: noise in a training log."""
    for name in ("alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300]
