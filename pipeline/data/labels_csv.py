"""Labels from a CSV file (data.labels_csv, data.validation_csv): read, check every row, list canonically.

TensorFlow-free, so the entry point checks the files with the config, before
the run's folder or checkpoints are touched; read_dataset reads them again.
A bad row (missing file, empty label, a path outside data.dir, a duplicate) is
never skipped: every one is listed, by file, line and column, in one
LabelFileError. data.on_bad_image=skip is about images that do not decode
(image_check.py), which a row cannot show.

The file order is canonical whatever the rows' order: by class, then by path,
the order flow_from_directory lists class folders in, so a CSV naming the
folder layout's files trains exactly as the folders do (the batches' shuffle
permutes this list), and the fingerprint's file list is the same.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from pipeline.config import DataConfig
from pipeline.errors import LabelFileError

MAX_LISTED = 20  # bad rows printed; the count covers the rest


@dataclass(frozen=True)
class Row:
    """One image of a CSV: its path relative to data.dir (normalised, '/'-separated), its class, where it was read."""

    path: str
    label: str
    file: str
    line: int


@dataclass
class LabelledFiles:
    """What the CSV files say: the class order, training rows, and validation rows (None: hold out)."""

    class_names: list[str]
    train: list[Row]
    validation: list[Row] | None


def read_label_files(cfg: DataConfig) -> LabelledFiles:
    """Read data.labels_csv (and data.validation_csv), check every row, and order the rows canonically.

    Raises LabelFileError listing every bad row (or the file that has no usable header).
    """
    assert cfg.labels_csv is not None
    problems: list[str] = []
    train = read_rows(Path(cfg.labels_csv), cfg, problems)
    validation = read_rows(Path(cfg.validation_csv), cfg, problems) if cfg.validation_csv else None
    classes = list(cfg.classes) if cfg.classes else sorted({row.label for row in train if row.label})
    allowed = "in data.classes" if cfg.classes else f"a class of {cfg.labels_csv}"
    seen: dict[str, Row] = {}  # by normalised path, across both files
    train = check_rows(train, classes, allowed, cfg, seen, problems)
    validation = None if validation is None else check_rows(validation, classes, allowed, cfg, seen, problems)
    if problems:
        raise LabelFileError(describe_problems(problems))
    rank = {name: i for i, name in enumerate(classes)}

    def canonical(rows: list[Row]) -> list[Row]:
        return sorted(rows, key=lambda r: (rank[r.label], r.path))

    return LabelledFiles(classes, canonical(train), None if validation is None else canonical(validation))


def check_rows(
    rows: list[Row], classes: list[str], allowed: str, cfg: DataConfig, seen: dict[str, Row], problems: list[str]
) -> list[Row]:
    """The good rows, with normalised paths; each problem goes to `problems` as file:line: column: what."""
    good = []
    for row in rows:
        found = check_label(row, classes, allowed, cfg.label_column)
        path_problem, normal = check_path(row, Path(cfg.dir), seen, cfg.path_column)
        found += [path_problem] if path_problem else []
        problems += [f"{row.file}:{row.line}: {problem}" for problem in found]
        if not found:
            good.append(replace(row, path=normal))
    return good


def read_rows(path: Path, cfg: DataConfig, problems: list[str]) -> list[Row]:
    """The rows of one CSV file (the header is line 1); a file-level problem goes to `problems`."""
    wanted = [cfg.path_column.strip(), cfg.label_column.strip()]
    try:
        # utf-8-sig: spreadsheets save a byte-order mark that would become part of the first column's name.
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [name.strip() for name in next(reader, [])]
            if not any(header):
                problems.append(f"{path}:1: empty file; expected a header row naming the columns {', '.join(wanted)}")
                return []
            missing = [name for name in wanted if name not in header]
            if missing:
                problems.append(
                    f"{path}:1: no column {', '.join(map(repr, missing))} (data.path_column, data.label_column); "
                    f"the header has: {', '.join(map(repr, header))}"
                )
                return []
            at = [header.index(name) for name in wanted]
            rows = []
            line = reader.line_num + 1  # where the next record starts (a quoted field may span lines)
            for cells in reader:
                if any(cell.strip() for cell in cells):
                    path_cell, label_cell = (cells[i].strip() if i < len(cells) else "" for i in at)
                    rows.append(Row(path_cell, label_cell, str(path), line))
                line = reader.line_num + 1
            return rows
    except (UnicodeDecodeError, csv.Error) as err:
        problems.append(f"{path}: not a readable UTF-8 CSV file ({err})")
    return []


def check_label(row: Row, classes: list[str], allowed: str, column: str) -> list[str]:
    if not row.label:
        return [f"column {column!r}: empty label"]
    if row.label.splitlines() != [row.label] or "\t" in row.label:
        return [f"column {column!r}: label {row.label!r} has a tab or line break (class names are written one a line)"]
    if row.label not in classes:
        return [f"column {column!r}: label {row.label!r} is not {allowed} ({', '.join(classes)})"]
    return []


def check_path(row: Row, root: Path, seen: dict[str, Row], column: str) -> tuple[str | None, str]:
    """(problem or None, the path normalised): an empty path, one outside data.dir (absolute, `..`,
    a link out), a missing file, or one listed before (in either file) is a problem."""
    if not row.path:
        return f"column {column!r}: empty path", ""
    normal = PurePosixPath(os.path.normpath(row.path.replace("\\", "/"))).as_posix()
    if os.path.isabs(normal) or normal.split("/")[0] == "..":
        return (
            f"column {column!r}: {row.path!r} is outside data.dir (paths are relative to data.dir={str(root)!r})",
            normal,
        )
    full = root / normal
    real_root, real = os.path.realpath(root), os.path.realpath(full)
    if os.path.commonpath([real_root, real]) != real_root:
        return f"column {column!r}: {row.path!r} leads outside data.dir, to {real} (a symbolic link)", normal
    if not full.exists():
        return f"column {column!r}: no such file {one_line(full)}", normal
    if not full.is_file():
        return f"column {column!r}: {one_line(full)} is not a file", normal
    first = seen.setdefault(normal, row)
    if first is not row:
        where = f"line {first.line}" if first.file == row.file else f"{first.file}:{first.line}"
        return f"column {column!r}: {row.path!r} is listed twice (also {where}); list each image once", normal
    return None, normal


def one_line(path: Path) -> str:
    """A path as is, or quoted with escapes if it holds a line break or tab: one bad row, one line."""
    text = str(path)
    return repr(text) if text.splitlines() != [text] or "\t" in text else text


def describe_problems(problems: list[str]) -> str:
    """One line for one problem; else a count, then each (the first MAX_LISTED)."""
    if len(problems) == 1:
        return f"{problems[0]}; fix it (nothing was trained)"
    listed = "\n".join(f"  {p}" for p in problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return (
        f"{len(problems)} bad rows in the label file(s), listed below; fix them (nothing was trained)\n{listed}{more}"
    )
