"""Multi-worker training: TF_CONFIG, how a global batch is split, and two real
local workers that are killed with SIGKILL and resumed by the same command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import (
    REPO,
    assert_labels_raw_pixels,
    cli_env,
    final_weights,
    from_conf,
    largest_difference,
    run_args,
    run_cli,
)
from hydra.core.override_parser.overrides_parser import OverridesParser

from pipeline.checkpoints.store import list_checkpoints
from pipeline.config import imply_multi_worker, validate_distribute
from pipeline.data.dataset import read_dataset, train_batches
from pipeline.distribute.local_workers import quote
from pipeline.distribute.tf_config import check_tf_config, read_worker_role
from pipeline.errors import ConfigError


def tf_config(index, workers=2, task_type="worker"):
    return json.dumps(
        {
            "cluster": {"worker": [f"127.0.0.1:{2000 + i}" for i in range(workers)]},
            "task": {"type": task_type, "index": index},
        }
    )


@pytest.mark.parametrize("index, chief", [(0, True), (1, False), (2, False)])
def test_worker_zero_is_the_chief(monkeypatch, index, chief):
    monkeypatch.setenv("TF_CONFIG", tf_config(index, workers=3))
    role = read_worker_role()
    assert (role.index, role.count, role.is_chief) == (index, 3, chief)


@pytest.mark.parametrize(
    "value, words",
    [
        (None, "needs TF_CONFIG"),
        ("{not json", "not a valid cluster description"),
        (json.dumps({"cluster": {}}), "not a valid cluster description"),
        (tf_config(5), "does not list"),
    ],
)
def test_bad_tf_config_is_refused_with_the_remedy(monkeypatch, value, words):
    if value is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", value)
    with pytest.raises(ConfigError, match=words):
        check_tf_config(from_conf("distribute", strategy="multi_worker"))


def test_local_workers_alone_mean_multi_worker_and_refuse_mirrored():
    dist = from_conf("distribute", local_workers=2)
    assert imply_multi_worker(dist) and dist.strategy == "multi_worker"
    validate_distribute(dist)
    with pytest.raises(ConfigError, match="distribute.local_workers=2"):
        validate_distribute(from_conf("distribute", strategy="mirrored", local_workers=2))


@pytest.mark.parametrize("batch_size, parts", [(4, 2), (4, 3), (5, 2), (1, 2)])
def test_a_global_batch_is_split_into_equal_weighted_parts(tiny_data, batch_size, parts):
    cfg = from_conf("data", dir=str(tiny_data), image_size=75, batch_size=batch_size, workers=0)
    data = read_dataset(cfg)
    batches = train_batches(data, cfg, seed=3, epoch=1)
    for batch in range(batches.batches_per_epoch):
        whole_x, whole_y = batches[batch]
        shards = [batches.shard(batch, part, parts) for part in range(parts)]
        assert len({len(x) for x, _, _ in shards}) == 1, "every replica gets the same batch size"
        real_x = np.concatenate([x[w > 0] for x, _, w in shards])
        real_y = np.concatenate([y[w > 0] for _, y, w in shards])
        # The weighted images are exactly the single-process batch, in order.
        np.testing.assert_array_equal(real_x, whole_x)
        np.testing.assert_array_equal(real_y, whole_y)


@pytest.mark.parametrize("path", ["/tmp/a b/c", "outputs/data.dir=_x,experiment=smoke", "it's\\odd"])
def test_quoted_paths_survive_hydra_override_parsing(path):
    override = OverridesParser.create().parse_overrides([f"hydra.run.dir={quote(path)}"])[0]
    assert override.value() == path


@pytest.mark.e2e
def test_multi_worker_without_tf_config_fails_fast(tmp_path, tiny_data):
    env = cli_env()
    env.pop("TF_CONFIG", None)
    result = run_cli(*run_args(tmp_path, tiny_data, "distribute=multi_worker"), cwd=REPO, env=env, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "needs TF_CONFIG" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "ckpt").exists()


def child_pids(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in children.read_text().split()] if children.exists() else []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (dead, not yet reaped by its new parent) counts as gone.
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"


# The head phase without dropout, checkpointed after every batch: the configuration in which a
# split feed must reproduce one process (see test_two_local_workers_killed_mid_epoch_...).
HEAD_NO_DROPOUT = ["train.finetune.epochs=0", "model.dropout=0", "checkpoint.every_batches=1"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_data):
    """A plain run of HEAD_NO_DROPOUT, which the strategies' runs are compared with."""
    tmp = tmp_path_factory.mktemp("one_process")
    result = run_cli(*run_args(tmp, tiny_data, *HEAD_NO_DROPOUT), cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp, result


@pytest.mark.e2e
def test_two_local_workers_killed_mid_epoch_resume_to_the_weights_of_one_process_and_fine_tune(
    one_process, tmp_path, tiny_data
):
    """2 workers train HEAD_NO_DROPOUT's head epoch and then a fine-tune epoch; SIGKILL to the
    launcher after the first checkpoint (one batch into the head epoch); the same command resumes
    from it and finishes. Only the chief wrote checkpoints and the model.

    The head epoch's end matches one process: each worker's weighted share of every global batch
    makes, summed over the workers, the step one process makes on the whole batch; only the order
    of the float sums differs (3e-8 measured). Without dropout and with the base frozen, on purpose:
    each worker draws its own dropout mask, and a training base normalises each worker's share by
    its own BatchNorm statistics, whose small differences Adam's first steps make whole; with
    either, the runs differ by about as much as training moves the weights
    (docs/sweeps-and-clusters.md). So the fine-tune epoch is checked for running, not for weights.
    """
    args = [
        *run_args(tmp_path, tiny_data, *HEAD_NO_DROPOUT, "distribute.local_workers=2"),
        "train.finetune.epochs=1",  # after HEAD_NO_DROPOUT's 0: the last value wins
        "checkpoint.keep_last=20",  # keep the head epoch's end for the comparison
    ]
    command = [sys.executable, "-m", "pipeline", *args]
    first = subprocess.Popen(
        command, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    ckpt = tmp_path / "ckpt"
    deadline = time.time() + 900
    workers = []
    while not list(ckpt.glob("*.manifest.json")) and first.poll() is None and time.time() < deadline:
        workers = child_pids(first.pid) or workers
        time.sleep(0.2)
    assert first.poll() is None, f"the run ended before its first checkpoint:\n{first.stdout.read()}"
    assert len(workers) == 2, workers
    first.send_signal(signal.SIGKILL)
    first.wait()
    # The workers die with their launcher: no orphan keeps training or holds a port.
    deadline = time.time() + 30
    while any(alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.5)
    assert not any(alive(pid) for pid in workers), "worker processes outlived the killed launcher"
    committed_before_kill = [c.stem for c in list_checkpoints(ckpt)]
    killed_at = committed_before_kill[-1]
    assert killed_at.startswith("transfer_01-"), committed_before_kill  # in the head epoch

    second = run_cli(*args, cwd=REPO, timeout=900)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out
    assert "starting 2 local workers" in out and f"resume: from checkpoint {killed_at}" in out, out
    assert "finetune epoch 1/1" in out

    model_file = tmp_path / "model" / "final.h5"
    meta = json.loads(model_file.with_suffix(".json").read_text())
    assert meta["lineage"][0] == killed_at and meta["final_checkpoint"].startswith("transfer_02")
    # Only the chief's files: one set of three per announced checkpoint, nothing from worker 1.
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["final.h5", "final.json"]
    announced = [line for line in out.splitlines() if line.startswith("checkpoint: ")]
    written = sorted(p.name for p in ckpt.iterdir() if not p.name.startswith("data-"))  # data-*.json: the file list
    assert len(written) == 3 * (len(announced) + len(committed_before_kill)), (written, announced)
    assert all(p.startswith(("transfer_01-", "transfer_02-")) for p in written), written
    assert (tmp_path / "outputs" / "worker-1.log").is_file()
    assert_labels_raw_pixels(model_file, sorted((tiny_data / "validation").rglob("*.jpg"))[0])

    # The head epoch's end, through a kill and a resume inside it, is one process's.
    (head_end,) = [p for p in ckpt.glob("transfer_01-*.h5") if "-b" not in p.stem]  # the epoch's end, not a batch's
    one = final_weights(one_process[0])
    two = [w.numpy() for w in keras.models.load_model(head_end, compile=False).weights]
    assert largest_difference(one, two) <= 1e-5
    # The control: one process one step short of its end is outside the tolerance, although
    # the cosine schedule gives that last step a quarter of the rate (2.4e-4 measured).
    (one_step_short,) = (one_process[0] / "ckpt").glob("transfer_01-*-b00002.h5")
    short = [w.numpy() for w in keras.models.load_model(one_step_short, compile=False).weights]
    assert largest_difference(one, short) > 10 * 1e-5


@pytest.mark.e2e
def test_mirrored_strategy_trains_like_a_single_process(one_process, tmp_path, tiny_data):
    """distribute=mirrored (one CPU replica here) goes through the same split feed and
    must log the same first epoch as a plain run of the same configuration."""

    def first_epoch_line(stdout):
        line = next(text for text in stdout.splitlines() if "val_accuracy:" in text)
        return {k.strip(): float(v) for k, v in (part.split(":") for part in line.split(" - ")[3:])}

    result = run_cli(*run_args(tmp_path, tiny_data, *HEAD_NO_DROPOUT, "distribute=mirrored"), cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    plain, mirrored = first_epoch_line(one_process[1].stdout), first_epoch_line(result.stdout)
    assert mirrored.keys() == plain.keys()
    for key in plain:
        assert mirrored[key] == pytest.approx(plain[key], abs=2e-4), (key, plain, mirrored)
    assert (tmp_path / "model" / "final.h5").is_file()
