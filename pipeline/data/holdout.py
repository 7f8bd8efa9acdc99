"""The seeded, per-class held-out share (data.validation_split, data.split_seed): which images validate.

Used where nothing else names the validation images: the flat layout
(data.dir/<class>/) and data.labels_csv without data.validation_csv. The choice
is a pure function of each image's path relative to data.dir, its class, the
share and the seed: not of the file order, the clock, or train.seed. So every
run, and every resume after a kill, holds out the same images; runs that differ
only in train.seed validate on the same images; and adding an image to a class
moves at most one other image of that class between the two sides.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np


def held_out_count(n: int, share: float) -> int:
    """How many of a class's n images validate: share of n, rounded half up, at least 1 and at most n - 1.

    At least 1 so every class with two images is measured; at most n - 1 so every class trains.
    """
    if n < 2:
        return 0
    return min(n - 1, max(1, math.floor(share * n + 0.5)))


def rank_key(relative_path: str, seed: int) -> bytes:
    """The order within a class: a digest of (seed, path), so the order is the same wherever the files are listed."""
    return hashlib.sha256(f"{seed}\0{relative_path}".encode()).digest()


def hold_out(relative_paths: list[str], labels: np.ndarray, share: float, seed: int) -> np.ndarray:
    """A mask over the images, True where an image validates: per class, the held_out_count lowest rank_keys."""
    labels = np.asarray(labels)
    mask = np.zeros(len(relative_paths), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label).tolist()
        members.sort(key=lambda i: rank_key(relative_paths[i], seed))
        mask[members[: held_out_count(len(members), share)]] = True
    return mask
