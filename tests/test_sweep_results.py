"""The sweep summary: this sweep's jobs only, from result.json files written whole or not at all."""

from __future__ import annotations

import csv
import errno
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.sweep.results import SUMMARY, SweepSummary, write_result


def sweep(folder: Path, jobs: dict[str, str]) -> list[dict]:
    """One sweep through the Hydra callback: each job writes its result.json; the summary's rows."""
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(folder)}}})
    callback = SweepSummary()
    callback.on_multirun_start(config=config)
    for job, status in jobs.items():
        write_result(folder / job, [job], {"status": status, "best": 0.5})
    callback.on_multirun_end(config=config)
    with open(folder / SUMMARY) as f:
        return list(csv.DictReader(f))


def test_a_failed_job_of_an_earlier_sweep_does_not_fail_the_next(tmp_path):
    with pytest.raises(SystemExit) as ended:
        sweep(tmp_path, {"model.dropout=1.5": "error: model.dropout=1.5 must be in [0, 1)"})
    assert ended.value.code == 2
    rows = sweep(tmp_path, {"model.dropout=0.1": "trained", "model.dropout=0.2": "trained"})
    assert sorted(r["job"] for r in rows) == ["model.dropout=0.1", "model.dropout=0.2"]


def test_a_rerun_summarises_the_jobs_it_ran_again(tmp_path):
    sweep(tmp_path, {"model.dropout=0.1": "trained"})
    rows = sweep(tmp_path, {"model.dropout=0.1": "already complete"})
    assert [(r["job"], r["status"]) for r in rows] == [("model.dropout=0.1", "already complete")]


def test_an_unreadable_result_of_an_older_version_is_skipped(tmp_path, capsys):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "result.json").write_text('{"overrides": ["old"], "sta')  # cut short by a full disk
    rows = sweep(tmp_path, {"model.dropout=0.1": "trained"})
    assert [r["job"] for r in rows] == ["model.dropout=0.1"]
    assert "old/result.json" in capsys.readouterr().out


def test_result_json_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    write_result(tmp_path, ["a=1"], {"status": "trained", "best": 0.5})
    before = (tmp_path / "result.json").read_text()
    real_write_text = Path.write_text

    def disk_full_halfway(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full_halfway)
    with pytest.raises(OSError):
        write_result(tmp_path, ["a=1"], {"status": "trained", "best": 0.9})
    monkeypatch.undo()
    assert (tmp_path / "result.json").read_text() == before
    assert json.loads(before)["best"] == 0.5
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary left behind
