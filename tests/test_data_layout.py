"""The data folder layout read_dataset checks: foreign or missing validation classes, symbolic links, cycles."""

from __future__ import annotations

import shutil
import signal
from contextlib import contextmanager

import pytest
from conftest import data_config

from pipeline.data.dataset import DataError, read_dataset


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: a symlink cycle that is not caught would list files for hours."""

    def give_up(*_):
        raise TimeoutError(f"still indexing after {seconds} s: the symlink cycle was followed")

    previous = signal.signal(signal.SIGALRM, give_up)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_validation_class_training_does_not_have_is_named(data_dir):
    shutil.copytree(data_dir / "validation" / "circle", data_dir / "validation" / "hexagon")
    with pytest.raises(DataError, match=r"validation that .*train does not have: hexagon;"):
        read_dataset(data_config(data_dir))


def test_a_training_class_missing_from_validation_is_a_warning_naming_it(data_dir, capsys):
    shutil.rmtree(data_dir / "validation" / "square")
    data = read_dataset(data_config(data_dir))
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "class(es) square " in warnings[0]
    # labels still follow train/'s order: circle 0, square 1, triangle 2
    assert data.class_names == ["circle", "square", "triangle"]
    assert data.validation.counts(3) == [2, 0, 2]


def test_complete_validation_gives_no_warning(data_dir, capsys):
    read_dataset(data_config(data_dir))
    assert "warning:" not in capsys.readouterr().out


def test_symbolic_links_to_class_folders_and_images_are_followed(tmp_path, data_dir):
    shutil.move(data_dir / "train" / "square", tmp_path / "elsewhere")
    (data_dir / "train" / "square").symlink_to(tmp_path / "elsewhere")
    (data_dir / "train" / "circle" / "more").symlink_to(data_dir / "validation" / "circle")
    data = read_dataset(data_config(data_dir))
    assert data.train.counts(3) == [4 + 2, 4, 4]


@pytest.mark.parametrize(
    "links",
    [
        {"train/circle/loop": "train"},  # back to an ancestor
        {"train/circle/self": "train/circle"},  # back to its own folder
        {"train/circle/a": "validation/circle", "validation/circle/b": "train/circle"},  # through two links
    ],
)
def test_a_symlink_cycle_is_named_not_followed(data_dir, links):
    for link, target in links.items():
        (data_dir / link).symlink_to(data_dir / target)
    with deadline(30), pytest.raises(DataError, match=r"symbolic link .* leads back to a folder above it"):
        read_dataset(data_config(data_dir))


def test_a_self_referencing_link_is_not_a_folder(data_dir):
    (data_dir / "train" / "circle" / "knot").symlink_to(data_dir / "train" / "circle" / "knot")
    with deadline(30):
        assert read_dataset(data_config(data_dir)).train.counts(3) == [4, 4, 4]
