"""Labels from a CSV file: every bad row named by file, line and column; the file order canonical."""

from __future__ import annotations

import csv
import dataclasses
import random
import shutil
from pathlib import Path

import pytest
from conftest import REPO, composed_defaults, data_config, from_conf

from pipeline.config import validate
from pipeline.data.dataset import file_list, read_dataset
from pipeline.data.labels_csv import MAX_LISTED, read_label_files
from pipeline.data.prepare import prepare_data
from pipeline.errors import ConfigError, LabelFileError


def write_csv(path: Path, rows: list, header=("path", "label")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return path


def folder_rows(root: Path, side: str) -> list[list[str]]:
    """[relative path, class] of every image under root/side/<class>/."""
    return [[p.relative_to(root).as_posix(), p.parent.name] for p in sorted((root / side).glob("*/*.jpg"))]


def csv_config(root: Path, at: Path, rows: list, validation_rows: list | None = None, **kw):
    """data_config reading root's images through labels.csv (and validation.csv) written in `at`."""
    labels = write_csv(at / "labels.csv", rows)
    validation = write_csv(at / "validation.csv", validation_rows) if validation_rows is not None else None
    return data_config(root, labels_csv=str(labels), validation_csv=validation and str(validation), **kw)


def problems(cfg) -> list[str]:
    """The error's lines, or [] when the files are good."""
    try:
        read_label_files(cfg)
    except LabelFileError as err:
        return str(err).splitlines()
    return []


def test_a_shuffled_csv_of_the_folders_lists_the_same_files_in_the_same_order(tiny_data, tmp_path):
    rows, validation_rows = folder_rows(tiny_data, "train"), folder_rows(tiny_data, "validation")
    random.Random(3).shuffle(rows)
    random.Random(4).shuffle(validation_rows)
    # Spelled other ways that name the same files: ./, doubled slashes, spaces around the cells.
    rows[0][0], rows[1][0], rows[2][1] = "./" + rows[0][0], rows[1][0].replace("/", "//"), f" {rows[2][1]} "
    cfg = csv_config(tiny_data, tmp_path, rows, validation_rows)
    from_csv, from_folders = read_dataset(cfg), read_dataset(data_config(tiny_data))
    assert from_csv.class_names == from_folders.class_names == ["circle", "square", "triangle"]
    # The fingerprint's file list (paths relative to data.dir, sizes, classes, in training order) is the same,
    # so a run resumes across the switch, and the batches' seeded shuffle permutes the same list.
    assert file_list(from_csv, tiny_data) == file_list(from_folders, tiny_data)
    assert from_csv.train.filepaths == [str(Path(p)) for p in from_folders.train.filepaths]
    assert from_csv.held_out is None and "labels from" in from_csv.layout


def test_data_classes_orders_the_labels(tiny_data, tmp_path):
    cfg = csv_config(tiny_data, tmp_path, folder_rows(tiny_data, "train"), classes=["triangle", "circle", "square"])
    data = read_dataset(cfg)
    assert data.class_names == ["triangle", "circle", "square"]
    assert "/triangle/" in data.train.filepaths[0] and data.train.labels[0] == 0


def test_without_validation_csv_a_seeded_share_of_each_class_validates(tiny_data, tmp_path):
    cfg = csv_config(tiny_data, tmp_path, folder_rows(tiny_data, "train"), validation_split=0.25)
    data = read_dataset(cfg)
    assert data.train.counts(3) == [3, 3, 3] and data.validation.counts(3) == [1, 1, 1]
    assert data.held_out == "seeded" and not set(data.train.filepaths) & set(data.validation.filepaths)


def test_every_bad_row_is_listed_with_file_line_and_column(tiny_data, tmp_path):
    outside = tmp_path / "outside.jpg"
    shutil.copy(tiny_data / "train" / "circle" / "circle_0000.jpg", outside)
    root = tmp_path / "d"
    shutil.copytree(tiny_data, root)
    (root / "train" / "circle" / "link.jpg").symlink_to(outside)
    good = folder_rows(root, "train")[1:4]
    rows = good + [
        ["train/circle/missing.jpg", "circle"],  # line 5
        ["train/circle/circle_0000.jpg", ""],  # line 6
        ["../outside.jpg", "circle"],  # line 7
        [str(outside), "circle"],  # line 8
        ["train/circle/link.jpg", "circle"],  # line 9
        [good[0][0], good[0][1]],  # line 10: the same image again, same label
        ["train/circle", "circle"],  # line 11: a folder
        ["", "circle"],  # line 12
        ["train/square/gone.jpg", "hexagon"],  # line 13: not in data.classes, and no such file
    ]
    cfg = csv_config(root, tmp_path, rows, [[good[1][0], good[1][1]]], classes=["circle", "square", "triangle"])
    lines = problems(cfg)
    labels, validation = cfg.labels_csv, cfg.validation_csv
    assert lines[0].startswith("11 bad rows in the label file(s)")
    expected = [
        f"{labels}:5: column 'path': no such file {root}/train/circle/missing.jpg",
        f"{labels}:6: column 'label': empty label",
        f"{labels}:7: column 'path': '../outside.jpg' is outside data.dir",
        f"{labels}:8: column 'path': '{outside}' is outside data.dir",
        f"{labels}:9: column 'path': 'train/circle/link.jpg' leads outside data.dir, to {outside}",
        f"{labels}:10: column 'path': '{good[0][0]}' is listed twice (also line 2)",
        f"{labels}:11: column 'path': {root}/train/circle is not a file",
        f"{labels}:12: column 'path': empty path",
        f"{labels}:13: column 'label': label 'hexagon' is not in data.classes",
        f"{validation}:2: column 'path': '{good[1][0]}' is listed twice (also {labels}:3)",
    ]
    body = lines[1:]
    for want in expected:
        assert any(line.strip().startswith(want) for line in body), f"{want!r} not in\n" + "\n".join(body)
    # line 13 also names its missing file: two problems of one row, each on its own line
    assert sum(f"{labels}:13:" in line for line in body) == 2 and len(body) == 11


def test_one_bad_row_is_one_line(tiny_data, tmp_path):
    rows = folder_rows(tiny_data, "train") + [["train/circle/nope.jpg", "circle"]]
    (line,) = problems(csv_config(tiny_data, tmp_path, rows))
    assert line.startswith(f"{tmp_path / 'labels.csv'}:14: column 'path': no such file ")
    assert line.endswith("; fix it (nothing was trained)")


def test_the_list_is_capped_with_a_count(tiny_data, tmp_path):
    rows = [[f"train/circle/gone{i}.jpg", "circle"] for i in range(MAX_LISTED + 5)]
    lines = problems(csv_config(tiny_data, tmp_path, folder_rows(tiny_data, "train") + rows))
    assert len(lines) == 1 + MAX_LISTED + 1 and lines[-1].strip() == "... and 5 more"


def test_line_numbers_count_blank_lines_and_quoted_line_breaks(tiny_data, tmp_path):
    text = 'path,label\n\ntrain/circle/circle_0000.jpg,circle\n"train/circle/\n0001.jpg",circle\ntrain/x.jpg,circle\n'
    (tmp_path / "labels.csv").write_text(text)
    lines = problems(data_config(tiny_data, labels_csv=str(tmp_path / "labels.csv")))
    # the quoted path holds a line break: shown escaped, so each bad row stays on one line
    assert lines[1].strip().startswith(f"{tmp_path / 'labels.csv'}:4: column 'path': no such file '{tiny_data}")
    assert lines[1].endswith("\\n0001.jpg'")
    assert lines[2].strip().startswith(f"{tmp_path / 'labels.csv'}:6: column 'path': no such file")


def test_a_missing_column_names_the_columns_found(tiny_data, tmp_path):
    write_csv(tmp_path / "labels.csv", [["train/circle/circle_0000.jpg", "circle"]], header=("file", "class"))
    (line,) = problems(data_config(tiny_data, labels_csv=str(tmp_path / "labels.csv")))
    assert line.startswith(f"{tmp_path / 'labels.csv'}:1: no column 'path', 'label' (data.path_column")
    assert "the header has: 'file', 'class'" in line
    # ...and data.path_column / data.label_column name them
    cfg = data_config(tiny_data, labels_csv=str(tmp_path / "labels.csv"), path_column="file", label_column="class")
    assert len(read_label_files(cfg).train) == 1


def test_an_empty_file_is_named(tiny_data, tmp_path):
    (tmp_path / "labels.csv").write_text("")
    (line,) = problems(data_config(tiny_data, labels_csv=str(tmp_path / "labels.csv")))
    assert line.startswith(f"{tmp_path / 'labels.csv'}:1: empty file")


def test_a_spreadsheets_byte_order_mark_is_not_part_of_the_first_column(tiny_data, tmp_path):
    (tmp_path / "labels.csv").write_bytes(b"\xef\xbb\xbfpath,label\ntrain/circle/circle_0000.jpg,circle\n")
    assert read_label_files(data_config(tiny_data, labels_csv=str(tmp_path / "labels.csv"))).train[0].label == "circle"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"labels_csv": "nowhere.csv"}, r"data.labels_csv='nowhere.csv': no such file"),
        ({"validation_csv": "conftest.py"}, r"data.validation_csv='conftest.py' needs data.labels_csv"),
        ({"label_column": "path"}, r"data.path_column and data.label_column are both 'path'"),
        ({"classes": ["cat"]}, r"data.classes=\['cat'\] must name at least 2"),
        ({"classes": ["cat", "dog", "cat"]}, r"\(repeated: cat\)"),
    ],
)
def test_the_csv_keys_are_checked_with_the_config(changes, message, monkeypatch):
    monkeypatch.chdir(REPO / "tests")
    config = dataclasses.replace(composed_defaults(), data=from_conf("data", **changes))
    with pytest.raises(ConfigError, match=message):
        validate(config)


def test_on_bad_image_skip_skips_images_that_do_not_decode_but_never_bad_rows(tiny_data, tmp_path):
    root = shutil.copytree(tiny_data, tmp_path / "d")
    (root / "train" / "circle" / "broken.jpg").write_text("not an image")
    rows = folder_rows(root, "train")
    cfg = csv_config(root, tmp_path, rows, folder_rows(root, "validation"), on_bad_image="skip")
    data = prepare_data(cfg, tmp_path / "outputs")
    assert data.train.counts(3) == [4, 4, 4] and not any("broken" in p for p in data.train.filepaths)
    bad_row = csv_config(root, tmp_path, rows + [["train/circle/gone.jpg", "circle"]], on_bad_image="skip")
    with pytest.raises(LabelFileError, match="gone.jpg"):
        prepare_data(bad_row, tmp_path / "outputs")
