"""The flat layout (data.dir/<class>/), its seeded per-class held-out share, and the rule for a folder named train."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
from conftest import data_config

from pipeline.data.dataset import DataError, read_dataset
from pipeline.data.holdout import held_out_count, hold_out


def class_paths(counts: dict[str, int]) -> tuple[list[str], np.ndarray]:
    paths = [f"{name}/img_{i:03d}.jpg" for name, n in counts.items() for i in range(n)]
    labels = np.array([k for k, n in enumerate(counts.values()) for _ in range(n)])
    return paths, labels


def validating(paths, labels, share=0.2, seed=0) -> set[str]:
    return {p for p, v in zip(paths, hold_out(paths, labels, share, seed), strict=True) if v}


@pytest.fixture
def flat_data(tmp_path, tiny_data):
    """tiny_data's training images as data.dir/<class>/ (4 a class), no train/ folder."""
    root = tmp_path / "flat"
    shutil.copytree(tiny_data / "train", root)
    return root


@pytest.mark.parametrize(("n", "share", "count"), [(1, 0.2, 0), (2, 0.2, 1), (4, 0.2, 1), (10, 0.25, 3), (5, 0.99, 4)])
def test_each_class_keeps_a_training_image_and_gives_one_to_validation(n, share, count):
    assert held_out_count(n, share) == count


def test_the_share_is_per_class(tmp_path):
    paths, labels = class_paths({"a": 100, "b": 10, "c": 3})
    held = validating(paths, labels)
    assert [sum(p.startswith(c) for p in held) for c in "abc"] == [20, 2, 1]


def test_the_split_is_a_pure_function_of_paths_and_seed():
    """Not of the order the files are listed in, nor of anything a resume or a rerun could change."""
    paths, labels = class_paths({"a": 30, "b": 20})
    order = list(range(len(paths)))
    random.Random(1).shuffle(order)
    shuffled = validating([paths[i] for i in order], labels[order])
    assert shuffled == validating(paths, labels) == validating(list(paths), labels.copy())
    # control: another seed holds out other images
    assert validating(paths, labels, seed=1) != validating(paths, labels)


def test_adding_an_image_moves_at_most_one_other():
    paths, labels = class_paths({"a": 40})
    before = validating(paths, labels)
    for extra in ("a/new_1.jpg", "a/zzz.jpg", "a/000.jpg"):
        after = validating(paths + [extra], np.append(labels, 0))
        assert len((before ^ after) - {extra}) <= 1


def test_a_flat_folder_of_classes_trains_with_a_seeded_share_held_out(flat_data):
    data = read_dataset(data_config(flat_data, validation_split=0.25))
    assert data.class_names == ["circle", "square", "triangle"]
    assert data.train.counts(3) == [3, 3, 3] and data.validation.counts(3) == [1, 1, 1]
    assert data.held_out == "seeded" and "directly in data.dir" in data.layout
    again = read_dataset(data_config(flat_data, validation_split=0.25))
    assert again.validation.filepaths == data.validation.filepaths
    other_seed = read_dataset(data_config(flat_data, validation_split=0.25, split_seed=5))
    assert other_seed.validation.filepaths != data.validation.filepaths


def test_a_class_named_train_holding_images_is_a_class(flat_data):
    shutil.move(flat_data / "circle", flat_data / "train")
    data = read_dataset(data_config(flat_data))
    assert data.class_names == ["square", "train", "triangle"]
    assert "train/ holds no class folders, so it is the class 'train'" in data.layout


def test_a_train_folder_holding_class_folders_is_the_training_side(tiny_data):
    data = read_dataset(data_config(tiny_data))
    assert data.class_names == ["circle", "square", "triangle"] and data.held_out is None
    assert "train/ holds class folders, so it is the training side, not a class" in data.layout


def test_a_folder_without_class_folders_names_both_layouts(tmp_path):
    (tmp_path / "README.txt").write_text("no images")
    expected = r"holds 0 class folder\(s\); expected .*/<class>/<images> or .*/train/<class>/"
    with pytest.raises(DataError, match=expected):
        read_dataset(data_config(tmp_path))


def test_data_classes_orders_class_folders_and_must_name_them_all(flat_data):
    data = read_dataset(data_config(flat_data, classes=["triangle", "square", "circle"]))
    assert data.class_names == ["triangle", "square", "circle"] and data.train.counts(3) == [3, 3, 3]
    with pytest.raises(DataError, match=r"no folder for hexagon; folder\(s\) circle not listed"):
        read_dataset(data_config(flat_data, classes=["triangle", "square", "hexagon"]))


def test_a_changed_split_seed_refuses_to_resume_by_name(tmp_path, flat_data):
    """Another seed holds out other images: a checkpoint of the old split must not continue silently."""
    from test_fingerprint import config_for, fingerprint_of, write_record

    from pipeline.checkpoints.resume import plan_resume
    from pipeline.errors import CheckpointError

    write_record(tmp_path / "ckpt", fingerprint_of(config_for(flat_data)))
    plan_resume(tmp_path / "ckpt", fingerprint_of(config_for(flat_data)), None)  # the same split resumes
    with pytest.raises(CheckpointError, match=r"data.split_seed 0 -> 3"):
        plan_resume(tmp_path / "ckpt", fingerprint_of(config_for(flat_data, "data.split_seed=3")), None)
