"""The feature cache: reused while nothing changed, replaced when something did, never half-trusted."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import data_config

from pipeline.data.dataset import read_dataset, train_batches
from pipeline.training.cached_phase import CachedBatches
from pipeline.training.feature_cache import INCOMING, load_or_compute, make_key


def key_for(data_dir, **changes):
    cfg = data_config(data_dir, **changes)
    return make_key(read_dataset(cfg), cfg, seed=42, cut="pool", view_epochs=[0, 1], weights_digest="w")


class Computer:
    """Writes arrays of the right shapes and counts its calls."""

    def __init__(self, n_train=12, n_validation=6, fail=False):
        self.calls, self.n_train, self.n_validation, self.fail = 0, n_train, n_validation, fail

    def __call__(self, scratch):
        self.calls += 1
        np.save(scratch / "train.npy", np.full((2, self.n_train, 8), float(self.calls), np.float32))
        if self.fail:  # as if killed between the two arrays
            raise KeyboardInterrupt
        np.save(scratch / "validation.npy", np.zeros((self.n_validation, 8), np.float32))


def test_an_entry_is_reused_until_an_image_changes_and_then_replaced(tmp_path, data_dir):
    cache, compute = tmp_path / "cache", Computer()
    first = load_or_compute(cache, key_for(data_dir), compute)
    again = load_or_compute(cache, key_for(data_dir), compute)
    assert compute.calls == 1 and not first.reused and again.reused and again.folder == first.folder
    np.testing.assert_array_equal(again.train, first.train)

    image = min((data_dir / "train" / "circle").glob("*.jpg"))
    image.write_bytes(image.read_bytes() + b"\0")  # same name, new size and mtime
    changed = load_or_compute(cache, key_for(data_dir), compute)
    assert compute.calls == 2 and changed.folder != first.folder
    assert not first.folder.exists(), "the stale entry of the same data and cut is removed"


@pytest.mark.parametrize("change", [{"rotation_range": 5.0}, {"image_size": 80}, {"interpolation": "nearest"}])
def test_augmentation_and_size_are_part_of_the_key(data_dir, change):
    assert key_for(data_dir) != key_for(data_dir, **change)


def test_interrupted_caching_leaves_nothing_that_is_trusted(tmp_path, data_dir):
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        load_or_compute(cache, key_for(data_dir), Computer(fail=True))
    assert [p.name for p in cache.iterdir()] == []
    # what a kill -9 leaves: a scratch folder of a process that no longer exists
    dead = cache / f"{INCOMING}999999999-x"
    dead.mkdir()
    (dead / "train.npy").write_bytes(b"half")
    compute = Computer()
    load_or_compute(cache, key_for(data_dir), compute)
    assert compute.calls == 1 and not dead.exists()


def test_a_damaged_entry_is_computed_again(tmp_path, data_dir):
    cache, compute = tmp_path / "cache", Computer()
    entry = load_or_compute(cache, key_for(data_dir), compute).folder
    with open(entry / "train.npy", "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\xff\xff\xff\xff")
    again = load_or_compute(cache, key_for(data_dir), compute)
    assert compute.calls == 2 and not again.reused and again.train[0, 0, 0] == 2.0


def test_cached_batches_serve_the_uncached_epoch_order(data_dir):
    cfg = data_config(data_dir, batch_size=5)
    data = read_dataset(cfg)
    uncached = train_batches(data, cfg, seed=42, epoch=3, start_batch=1)
    features = np.arange(12, dtype=np.float32)[:, None]  # feature = the image's index
    cached = CachedBatches(features, data.train.labels, 3, 5, uncached.order, start_batch=1)
    assert len(cached) == len(uncached) == 2
    for i in range(len(cached)):
        x, y = cached[i]
        _, y_uncached = uncached[i]
        np.testing.assert_array_equal(y, y_uncached)
        np.testing.assert_array_equal(x[:, 0], uncached.order[(i + 1) * 5 : (i + 2) * 5])
