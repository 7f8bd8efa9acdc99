"""logger=mlflow in real runs: the local store, and a real `mlflow server` on a free localhost port
with a run killed with SIGKILL between a commit and its log and resumed (one MLflow run, each epoch
once), and a server that does not answer (exit 2, nothing written). A kill before a commit, whose
epoch is trained again, the look-up that keeps an epoch from being logged twice, and on_error=warn
(one warning, tracking off) are tested on their own in test_tracking.py: a run without tracking is
what every other end-to-end test runs.

Head phase only (2 epochs of 3 batches) to keep the runs short, as in test_resume_e2e.py.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, cli_env, run_args, run_cli, sweep_args

from pipeline.reports.history import HISTORY, read_history
from pipeline.reports.tracking import METRICS, RUN_FILE

mlflow = pytest.importorskip("mlflow")
pytestmark = pytest.mark.e2e
HEAD_ONLY = ["train.head.epochs=2", "train.finetune.epochs=0"]
# What training decides, compared between runs; lr is the same every epoch and seconds is the clock.
LEARNED = ("loss", "accuracy", "val_loss", "val_accuracy")


def args_for(tmp: Path, data: Path, uri: str, *extra) -> list[str]:
    return run_args(tmp, data, *HEAD_ONLY, "logger=mlflow", f"logger.tracking_uri={uri}", *extra)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def the_run(tmp: Path, uri: str):
    """The MLflow run whose id the run's checkpoint folder keeps, and the client that reads it."""
    client = mlflow.tracking.MlflowClient(uri)
    return client, client.get_run(json.loads((tmp / "ckpt" / RUN_FILE).read_text())["run_id"])


def metric_points(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every point of every metric, (step, value), in step order: a step logged twice shows twice."""
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in METRICS}


def history_points(tmp: Path) -> dict[str, list[tuple[int, float]]]:
    rows = read_history(tmp / "outputs" / HISTORY)
    return {key: [(row["epoch"], row[key]) for row in rows] for key in METRICS}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, tiny_data):
    """An uninterrupted run into a local SQLite store (logger=mlflow's kind of default), model logged too."""
    tmp = tmp_path_factory.mktemp("local")
    uri = f"sqlite:///{tmp / 'mlruns.db'}"
    result = run_cli(*args_for(tmp, tiny_data, uri, "logger.log_model=true"), cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp, uri


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `mlflow server` with its own SQLite store and artifact folder on a free localhost port."""
    tmp = tmp_path_factory.mktemp("server")
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--backend-store-uri", f"sqlite:///{tmp / 'server.db'}", "--artifacts-destination", str(tmp / "art")]
    command += ["--workers", "1"]
    log = open(tmp / "server.log", "w")
    # Its own session, so the SIGTERM at the end reaches any worker process it starts too.
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=tmp, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # its start-up, on a busy machine
        while True:
            assert process.poll() is None, (tmp / "server.log").read_text()
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, (tmp / "server.log").read_text()
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=5)  # it waits for idle keep-alive connections; its store is a test's to lose
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def test_the_local_store_holds_the_config_overrides_each_epoch_and_the_artifacts(local_run):
    tmp, uri = local_run
    client, run = the_run(tmp, uri)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.image_size"] == "75" and run.data.params["train.head.epochs"] == "2"
    assert run.data.tags["override.logger"] == "mlflow" and run.data.tags["override.experiment"] == "smoke"
    assert metric_points(client, run.info.run_id) == history_points(tmp)
    assert [step for step, _ in metric_points(client, run.info.run_id)["loss"]] == [1, 2]
    artifacts = {a.path for folder in ("report", "model") for a in client.list_artifacts(run.info.run_id, folder)}
    assert artifacts == {
        "report/report.md",
        "report/curves.png",
        "report/confusion_matrix.png",
        "report/history.csv",
        "model/final.h5",
        "model/final.json",
    }
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(tmp / "mlruns")


def test_a_killed_and_resumed_run_is_one_mlflow_run_with_each_epoch_once(server, local_run, tmp_path, tiny_data):
    args = args_for(tmp_path, tiny_data, server)
    # Killed just after epoch 2's checkpoint commits, before its log: history.csv holds epoch 2 (written
    # at the epoch's end), MLflow must not (an epoch is logged once committed, after the commit's last step).
    first = run_cli(*args, cwd=REPO, env=cli_env(PIPELINE_KILL_AT="after_manifest#2"))
    assert first.returncode == -signal.SIGKILL, first.stdout + first.stderr
    assert [row["epoch"] for row in read_history(tmp_path / "outputs" / HISTORY)] == [1, 2]
    client, run = the_run(tmp_path, server)
    assert {key: [s for s, _ in points] for key, points in metric_points(client, run.info.run_id).items()} == {
        key: [1] for key in METRICS
    }
    # Resumed: nothing left to train; the run logs epoch 2, which its restored checkpoint committed.
    second = run_cli(*args, cwd=REPO)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "MLflow: continuing run " + run.info.run_id in second.stdout
    experiment = client.get_experiment_by_name("pipeline")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run.info.run_id]
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    tracked = metric_points(client, run.info.run_id)
    assert tracked == history_points(tmp_path)
    # The same curve as the uninterrupted run's, point for point (resume is exact to 1e-5).
    local_client, local = the_run(*local_run)
    uninterrupted = metric_points(local_client, local.info.run_id)
    for key in LEARNED:
        assert [s for s, _ in tracked[key]] == [s for s, _ in uninterrupted[key]] == [1, 2]
        assert all(abs(a - b) <= 1e-5 for (_, a), (_, b) in zip(tracked[key], uninterrupted[key], strict=True))
    # Control: epochs 1 and 2 differ by far more than the tolerance, so a curve shifted by an epoch would fail.
    assert max(abs(uninterrupted[key][0][1] - uninterrupted[key][1][1]) for key in LEARNED) > 1e-4


def test_a_server_that_does_not_answer_stops_the_run_before_anything_is_written(tmp_path, tiny_data):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = run_cli(*args_for(tmp_path, tiny_data, uri, "logger.timeout=2"), cwd=REPO, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"error: logger.tracking_uri={uri}"), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no ckpt/, outputs/, model/ or cache/


def test_an_optuna_search_names_the_best_and_is_one_experiment_with_one_run_per_trial(tmp_path, tiny_data):
    """`-m hparams_search=optuna logger=mlflow`: Optuna runs its trials and names the best; the sweep's
    jobs land in one MLflow experiment named for the sweep folder, one run per trial, tagged with the
    study and the trial, each with its own epoch once."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = sweep_args(tmp_path, tiny_data, "train.head.epochs=1", "train.finetune.epochs=0", "logger=mlflow")
    result = run_cli(
        "-m",
        "hparams_search=optuna",
        *args,
        f"logger.tracking_uri={uri}",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweeper.storage={storage}",
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert "Best parameters" in output and "Best value" in output
    with open(tmp_path / "multirun" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all("model.dropout=" in r["overrides"] for r in rows)
    assert (tmp_path / "optuna.db").exists()

    client = mlflow.tracking.MlflowClient(uri)
    experiment = client.get_experiment_by_name(f"pipeline/{str(tmp_path / 'multirun').strip('/')}")
    assert experiment is not None, [e.name for e in client.search_experiments()]
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["optuna.trial"] for r in runs) == ["0", "1"]
    assert all(r.data.tags["optuna.study"] == "inception_transfer" for r in runs)
    assert all(r.info.status == "FINISHED" for r in runs)
    # Each job's checkpoint folder names its own run, which holds its one epoch once.
    recorded = {json.loads(p.read_text())["run_id"] for p in (tmp_path / "ckpt").glob(f"*/{RUN_FILE}")}
    assert recorded == {r.info.run_id for r in runs}
    for r in runs:
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val_accuracy")] == [1]
    # The trials tried different settings: each run's parameters are its own job's.
    assert len({r.data.params["model.dropout"] for r in runs}) == 2
