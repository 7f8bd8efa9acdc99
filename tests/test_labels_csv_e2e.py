"""Real runs: a shuffled CSV trains to the folders' weights; a bad CSV stops before anything is written;
the flat layout trains. Head phase only (the fine-tune phase reads the same batches)."""

from __future__ import annotations

import random
import shutil

import pytest
from conftest import final_weights, largest_difference, run_args, run_cli
from test_labels_csv import folder_rows, write_csv

pytestmark = pytest.mark.e2e

HEAD_ONLY = ["train.finetune.epochs=0"]
TOLERANCE = 1e-5


def csv_args(at, rows, validation_rows) -> list[str]:
    at.mkdir()
    return [
        f"data.labels_csv={write_csv(at / 'labels.csv', rows)}",
        f"data.validation_csv={write_csv(at / 'validation.csv', validation_rows)}",
    ]


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory, tiny_data):
    """The folder layout, a shuffled CSV of the same images, and that CSV with one training label swapped."""
    base = tmp_path_factory.mktemp("csv_runs")
    rows, validation_rows = folder_rows(tiny_data, "train"), folder_rows(tiny_data, "validation")
    random.Random(7).shuffle(rows)
    random.Random(8).shuffle(validation_rows)
    swapped = [list(row) for row in rows]
    swapped[0][1] = next(name for name in ("circle", "square") if name != swapped[0][1])
    runs = {}
    for name, extra in (
        ("folders", []),
        ("csv", csv_args(base / "csv", rows, validation_rows)),
        ("swapped", csv_args(base / "swapped", swapped, validation_rows)),
    ):
        (base / name).mkdir(exist_ok=True)  # the CSV runs' folders hold their CSV files already
        result = run_cli(*run_args(base / name, tiny_data, *HEAD_ONLY, *extra), cwd=base / name)
        assert result.returncode == 0, result.stdout + result.stderr
        runs[name] = (result, final_weights(base / name))
    return runs


def test_a_shuffled_csv_trains_to_the_weights_of_the_folders(three_runs):
    (folders, folder_weights), (csv_run, csv_weights) = three_runs["folders"], three_runs["csv"]
    assert "data layout: train/<class>/ (train/ holds class folders" in folders.stdout
    assert "data layout: labels from " in csv_run.stdout
    difference = largest_difference(folder_weights, csv_weights)
    print(f"shuffled CSV vs folders: {difference:.3g}")
    assert difference <= TOLERANCE


def test_control_one_swapped_label_is_far_outside_the_tolerance(three_runs):
    difference = largest_difference(three_runs["folders"][1], three_runs["swapped"][1])
    print(f"one swapped label vs folders: {difference:.3g}")
    assert difference > 100 * TOLERANCE


def test_a_bad_csv_is_one_line_per_row_exit_2_and_nothing_written(tmp_path, tiny_data):
    labels = write_csv(tmp_path / "labels.csv", folder_rows(tiny_data, "train") + [["train/circle/gone.jpg", "circle"]])
    result = run_cli(*run_args(tmp_path, tiny_data, f"data.labels_csv={labels}"), cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith(f"error: {labels}:14: column 'path': no such file {tiny_data}/train/circle/gone.jpg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.csv"]  # no ckpt/, outputs/, model/


def test_the_flat_layout_trains_and_says_so(tmp_path, tiny_data):
    flat = shutil.copytree(tiny_data / "train", tmp_path / "flat")
    result = run_cli(*run_args(tmp_path, flat, *HEAD_ONLY, "data.validation_split=0.25"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "data: 9 training images" in result.stdout and "3 validation images" in result.stdout
    assert "data layout: <class>/ directly in data.dir, 25% of each class validates" in result.stdout
    assert (tmp_path / "model" / "final.h5").is_file()
