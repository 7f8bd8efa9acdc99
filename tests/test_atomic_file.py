"""The one atomic write: the target is old or new, never half-written; a failure or a kill leaves nothing behind."""

from __future__ import annotations

import json
import os

import pytest

from pipeline.atomic_file import remove_leftovers, replaced, temporary_path, write_json


def test_a_write_replaces_the_target_only_once_it_is_whole(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("old")
    with replaced(path) as tmp:
        tmp.write_text("new")
        assert tmp.parent == tmp_path and tmp.suffix == ".md" and tmp.name.startswith(".")
        assert path.read_text() == "old"  # nothing visible until the block ends
    assert path.read_text() == "new"
    assert os.listdir(tmp_path) == ["report.md"]


@pytest.mark.parametrize("durable", [False, True])
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, durable):
    path = tmp_path / "model.h5"
    path.write_text("old")
    with pytest.raises(OSError), replaced(path, durable) as tmp:
        tmp.write_text("half")
        raise OSError("disk full")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["model.h5"]


def test_a_folder_replaces_an_old_folder(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with replaced(out) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    assert os.listdir(out) == ["new.txt"] and os.listdir(tmp_path) == ["export"]


def test_durable_json_round_trips_and_a_hidden_target_keeps_one_dot(tmp_path):
    path = tmp_path / ".cache.json"
    write_json(path, {"b": [1, 2], "a": None}, durable=True)
    assert json.loads(path.read_text()) == {"a": None, "b": [1, 2]}
    assert temporary_path(path).name == f".cache.tmp-{os.getpid()}.json"


def test_leftovers_of_a_killed_write_are_removed_and_nothing_else(tmp_path):
    path = tmp_path / "final[1].h5"  # glob characters in the name are taken literally
    killed = [tmp_path / ".final[1].tmp-999999.h5", tmp_path / ".final[1].tmp-888888.h5"]
    kept = [tmp_path / "final[1].h5", tmp_path / "final[1].json", tmp_path / ".final1.tmp-1.h5"]
    for file in killed + kept:
        file.write_text("x")
    (tmp_path / ".final[1].tmp-777777.h5").mkdir()  # a killed folder write
    remove_leftovers(path)
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in kept)
