"""The generators: indexing, label order, the held-out split, batches keyed to (seed, epoch, batch)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import data_config
from PIL import Image

from pipeline.data.dataset import (
    Batches,
    DataError,
    ensure_sample_data,
    read_dataset,
    train_batches,
    validation_batches,
)


def test_reads_train_and_validation_in_class_order(tiny_data):
    data = read_dataset(data_config(tiny_data))
    assert data.class_names == ["circle", "square", "triangle"]
    assert data.train.counts(3) == [4, 4, 4] and data.validation.counts(3) == [2, 2, 2]
    # every label agrees with the folder the file is in
    for split in (data.train, data.validation):
        for path, label in zip(split.filepaths, split.labels, strict=True):
            assert f"/{data.class_names[label]}/" in path


def test_hidden_folders_are_not_classes(tmp_path, tiny_data, capsys):
    # Jupyter leaves .ipynb_checkpoints beside the class folders, sometimes with image copies in it
    root = tmp_path / "d"
    shutil.copytree(tiny_data, root)
    for split in ("train", "validation"):
        shutil.copytree(root / split / "circle", root / split / ".ipynb_checkpoints")
    data = read_dataset(data_config(root))
    assert data.class_names == ["circle", "square", "triangle"]
    assert data.train.counts(3) == [4, 4, 4] and data.validation.counts(3) == [2, 2, 2]
    assert not any("/." in path for path in data.train.filepaths + data.validation.filepaths)
    out = capsys.readouterr().out
    assert "skipping hidden folder(s)" in out and ".ipynb_checkpoints (not classes)" in out


def test_image_files_training_cannot_read_are_named(tmp_path, tiny_data, capsys):
    root = tmp_path / "d"
    shutil.copytree(tiny_data, root)
    (root / "train" / "circle" / "photo.webp").write_bytes(b"RIFF")
    (root / "train" / "square" / "anim.GIF").write_bytes(b"GIF89a")
    (root / "train" / "square" / "notes.txt").write_text("not an image")
    data = read_dataset(data_config(root))
    assert data.train.counts(3) == [4, 4, 4]
    out = capsys.readouterr().out
    assert f"warning: 2 image file(s) in {root / 'train'} are not used (1 .gif, 1 .webp)" in out
    assert str(root / "validation") not in out


def test_validation_labels_follow_the_training_class_order(tmp_path, tiny_data):
    # validation/ holding only two of the classes must still label by train's order
    root = tmp_path / "d"
    shutil.copytree(tiny_data, root)
    shutil.rmtree(root / "validation" / "circle")
    data = read_dataset(data_config(root))
    assert sorted(set(data.validation.labels.tolist())) == [1, 2]


def test_without_validation_folder_a_share_of_train_is_held_out(tmp_path, tiny_data):
    root = tmp_path / "d"
    shutil.copytree(tiny_data / "train", root / "train")
    data = read_dataset(data_config(root, validation_split=0.25))
    assert data.validation.counts(3) == [1, 1, 1] and data.train.counts(3) == [3, 3, 3]
    assert not set(data.train.filepaths) & set(data.validation.filepaths)


def test_batches_depend_only_on_seed_epoch_and_index(tiny_data):
    cfg = data_config(tiny_data)
    data = read_dataset(cfg)
    a = train_batches(data, cfg, seed=3, epoch=1)
    b = train_batches(data, cfg, seed=3, epoch=1)
    assert len(a) == 3
    # served out of order, the same batch comes out the same
    xb2, yb2 = b[2]
    _ = b[0]
    xa2, ya2 = a[2]
    np.testing.assert_array_equal(xa2, xb2)
    np.testing.assert_array_equal(ya2, yb2)
    # a resumed epoch that skips one batch serves exactly the rest
    resumed = train_batches(data, cfg, seed=3, epoch=1, start_batch=1)
    assert len(resumed) == 2
    np.testing.assert_array_equal(resumed[1][0], xa2)
    # another epoch shuffles and augments differently
    other = train_batches(data, cfg, seed=3, epoch=2)
    assert not np.array_equal(other[2][0], xa2)


def test_every_training_image_is_seen_once_per_epoch(tiny_data):
    cfg = data_config(tiny_data)
    data = read_dataset(cfg)
    batches = train_batches(data, cfg, seed=0, epoch=0)
    seen = np.concatenate([batches.order[i * 4 : (i + 1) * 4] for i in range(len(batches))])
    assert sorted(seen.tolist()) == list(range(12))
    labels = np.concatenate([batches[i][1].argmax(1) for i in range(len(batches))])
    assert np.bincount(labels).tolist() == [4, 4, 4]


def test_validation_is_raw_pixels_without_augmentation(tiny_data):
    cfg = data_config(tiny_data)  # training augments: rotation, shifts, zoom, flips
    data = read_dataset(cfg)
    x, y = validation_batches(data, cfg)[0]
    assert x.shape == (4, 75, 75, 3) and x.dtype == np.float32
    # The first four files in order, decoded and resized, nothing else: 0-255 (the model rescales),
    # not rotated, shifted, zoomed or flipped.
    files = data.validation.filepaths[:4]
    raw = np.stack(
        [np.asarray(Image.open(f).convert("RGB").resize((75, 75), Image.BILINEAR), np.float32) for f in files]
    )
    np.testing.assert_array_equal(x, raw)
    np.testing.assert_array_equal(y.argmax(1), data.validation.labels[:4])
    # ...and the comparison means something: the same files through training's augmenter come out otherwise.
    augmented = Batches(data.validation, 3, cfg, seed=0, epoch=0, augmenter=data.augmenter, shuffle=False)[0][0]
    assert np.abs(augmented - raw).max() > 10


def test_a_folder_without_classes_names_the_layouts_read(tmp_path):
    with pytest.raises(DataError, match=r"<class>/<images> or .*train/<class>/<images>"):
        read_dataset(data_config(tmp_path))


def test_one_class_is_refused(tmp_path, tiny_data):
    shutil.copytree(tiny_data / "train" / "circle", tmp_path / "train" / "circle")
    with pytest.raises(DataError, match="at least 2"):
        read_dataset(data_config(tmp_path))


def test_empty_class_folder_is_named(tmp_path, tiny_data):
    shutil.copytree(tiny_data, tmp_path / "d")
    (tmp_path / "d" / "train" / "empty_one").mkdir()
    with pytest.raises(DataError, match="empty_one"):
        read_dataset(data_config(tmp_path / "d"))


def test_sample_data_is_written_only_into_an_empty_folder(tmp_path):
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / ".gitkeep").touch()
    ensure_sample_data(data_config(tmp_path / "fresh"))
    assert len(list((tmp_path / "fresh" / "train").rglob("*.jpg"))) == 450
    (tmp_path / "users").mkdir()
    (tmp_path / "users" / "notes.txt").write_text("my photos go here")
    ensure_sample_data(data_config(tmp_path / "users"))
    assert sorted(p.name for p in (tmp_path / "users").iterdir()) == ["notes.txt"]
