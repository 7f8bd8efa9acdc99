"""MLflow tracking's parts against a real local MLflow store (SQLite): exactly-once logging across
processes, the run kept with the checkpoints, bounded probes of a server that does not answer."""

from __future__ import annotations

import dataclasses
import json
import socket
import sys
import time
from pathlib import Path

import pytest
from conftest import composed_defaults
from omegaconf import OmegaConf

from pipeline.__main__ import group_sweep_tracking
from pipeline.checkpoints.store import archive_all
from pipeline.errors import ConfigError, TrackingError
from pipeline.reports.history import HISTORY, write_history
from pipeline.reports.tracking import METRICS, RUN_FILE, Tracker, check_tracking, start_tracking

mlflow = pytest.importorskip("mlflow")


@pytest.fixture(autouse=True)
def request_bounds_restored(monkeypatch):
    """check_tracking sets MLflow's request bounds in os.environ: put them back after each test."""
    for name in (
        "MLFLOW_HTTP_REQUEST_TIMEOUT",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    ):
        monkeypatch.delenv(name, raising=False)


def config_for(uri: str, **logger):
    cfg = composed_defaults()
    return dataclasses.replace(
        cfg, logger=dataclasses.replace(cfg.logger, name="mlflow", tracking_uri=uri, **{"timeout": 1, **logger})
    )


def history_rows(n: int) -> list[dict]:
    """n epochs of distinct values, as history.csv holds them."""
    return [
        {"epoch": e, "phase": "head", "phase_epoch": e, "resumed_from": "", "resumed_at": float("nan")}
        | {key: 0.1 * e + i / 100 for i, key in enumerate(METRICS)}
        for e in range(1, n + 1)
    ]


def mlflow_root(uri: str) -> str:
    """Where a local store at sqlite:///<folder>/mlruns.db keeps its artifacts: <folder>/mlruns."""
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlruns").as_uri()


def steps(client, run_id: str) -> dict[str, list[int]]:
    return {key: sorted(m.step for m in client.get_metric_history(run_id, key)) for key in METRICS}


@pytest.fixture(scope="module")
def local_store(tmp_path_factory):
    """One local store for the module: creating its SQLite schema takes seconds."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlruns.db'}"
    client = mlflow.tracking.MlflowClient(uri)
    client.search_experiments()  # creates the schema now, not inside the first test
    return uri, client


@pytest.fixture
def store(local_store, tmp_path, request):
    """The local store, a run folder with 3 epochs in history.csv, an empty checkpoint folder, and
    logger settings whose experiment is this test's own."""
    (tmp_path / "outputs").mkdir()
    write_history(tmp_path / "outputs" / HISTORY, history_rows(3))
    uri, client = local_store
    return tmp_path, config_for(uri, experiment=request.node.name), client


def test_each_committed_epoch_is_logged_once_across_a_killed_and_resumed_process(store):
    tmp, cfg, client = store
    first = start_tracking(cfg, tmp / "outputs", tmp / "ckpt", fresh=False)
    first.log_committed_epochs(1)
    # Killed after epoch 2's checkpoint committed, before the log: the next process starts from epoch 2.
    second = start_tracking(cfg, tmp / "outputs", tmp / "ckpt", fresh=False)
    assert second.run_id == first.run_id == json.loads((tmp / "ckpt" / RUN_FILE).read_text())["run_id"]
    second.log_committed_epochs(2)
    second.log_committed_epochs(2)  # the same commit seen again (the start-up catch-up, then on_commit)
    # Epoch 3 is in history.csv, its checkpoint not committed (a kill now trains it again): not logged.
    assert steps(client, second.run_id) == {key: [1, 2] for key in METRICS}
    logged = {m.step: m.value for m in client.get_metric_history(second.run_id, "val_loss")}
    assert logged == {row["epoch"]: row["val_loss"] for row in history_rows(2)}
    # Control: a process that did not look up what the run holds logs epoch 2 a second time.
    forgetful = Tracker(cfg.logger, client, second.run_id, tmp / "outputs")
    forgetful.log_committed_epochs(2)
    assert steps(client, second.run_id)["loss"] == [1, 1, 2, 2]


def test_a_fresh_start_archives_the_run_id_and_opens_a_new_run(store):
    tmp, cfg, client = store
    old = start_tracking(cfg, tmp / "outputs", tmp / "ckpt", fresh=False)
    archive_all(tmp / "ckpt")  # what +resume=false does with checkpoint.dir
    new = start_tracking(cfg, tmp / "outputs", tmp / "ckpt", fresh=False)
    assert new.run_id != old.run_id
    assert len(client.search_runs([client.get_experiment_by_name(cfg.logger.experiment).experiment_id])) == 2


def test_a_fresh_start_over_a_run_that_holds_epochs_opens_a_new_run(store):
    """Checkpoints removed by hand, tracking.json left: epoch 1 of the new training is not epoch 1 logged before."""
    tmp, cfg, client = store
    old = start_tracking(cfg, tmp / "outputs", tmp / "ckpt", fresh=False)
    assert start_tracking(cfg, tmp / "outputs", tmp / "ckpt", fresh=True).run_id == old.run_id  # nothing logged yet
    old.log_committed_epochs(1)
    new = start_tracking(cfg, tmp / "outputs", tmp / "ckpt", fresh=True)
    assert new.run_id != old.run_id and steps(client, new.run_id)["loss"] == []


def test_params_are_the_flattened_config_and_a_changed_value_on_resume_is_a_tag(store):
    tmp, cfg, client = store
    run_id = start_tracking(cfg, tmp / "outputs", tmp / "ckpt", fresh=False).run_id
    longer = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, finetune=dataclasses.replace(cfg.train.finetune, epochs=12))
    )
    start_tracking(longer, tmp / "outputs", tmp / "ckpt", fresh=False)
    run = client.get_run(run_id)
    assert run.data.params["train.finetune.epochs"] == "10" and run.data.params["data.image_size"] == "150"
    assert run.data.tags["changed.train.finetune.epochs"] == "12"
    assert run.info.artifact_uri.startswith(
        mlflow_root(cfg.logger.tracking_uri)
    )  # the local store keeps its artifacts beside it


def test_without_mlflow_installed_logger_mlflow_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[mlflow\]'"):
        check_tracking(config_for("sqlite:///unused.db").logger)
    assert check_tracking(composed_defaults().logger).name == "none"  # logger=none needs nothing


@pytest.fixture
def silent_server():
    """A port that accepts connections and never answers: the hang a bounded timeout must cut."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_a_server_that_never_answers_is_refused_within_the_timeout(silent_server, capsys):
    started = time.monotonic()
    with pytest.raises(TrackingError, match=r"logger\.tracking_uri=http://127\.0\.0\.1:\d+.*within 1 s"):
        check_tracking(config_for(silent_server).logger)
    assert time.monotonic() - started < 5
    warned = check_tracking(config_for(silent_server, on_error="warn").logger)
    assert warned.name == "none"
    assert capsys.readouterr().out.count("warning:") == 1


def test_a_failure_mid_run_warns_once_with_on_error_warn_and_raises_without(silent_server, capsys):
    cfg = config_for(silent_server, retries=0)
    check_tracking(dataclasses.replace(cfg.logger, on_error="warn"))  # sets MLflow's request bounds
    capsys.readouterr()
    client = mlflow.tracking.MlflowClient(silent_server)
    with pytest.raises(TrackingError, match="run the same command to continue"):
        Tracker(cfg.logger, client, "0" * 32).end("FINISHED")
    tracker = Tracker(dataclasses.replace(cfg.logger, on_error="warn"), client, "0" * 32)
    tracker.end("FINISHED")
    tracker.end("FINISHED")  # tracking has stopped: no second request, no second warning
    assert capsys.readouterr().out.count("warning: MLflow tracking") == 1 and not tracker.active


def test_sweep_jobs_share_one_experiment_per_sweep_and_optuna_trials_are_tagged():
    logger = dataclasses.replace(composed_defaults().logger, tags={"team": "vision"})
    hydra_cfg = OmegaConf.create(
        {
            "sweep": {"dir": "/runs/multirun/lr"},
            "job": {"num": 3},
            "sweeper": {
                "_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
                "study_name": "s",
            },
        }
    )
    group_sweep_tracking(logger, hydra_cfg)
    assert logger.experiment == "pipeline/runs/multirun/lr"
    assert logger.tags == {
        "team": "vision",
        "sweep.dir": "/runs/multirun/lr",
        "sweep.job": "3",
        "optuna.study": "s",
        "optuna.trial": "3",
    }
