"""Class probabilities for image files, decoded and resized exactly as training does.

The model carries its backbone's scaling inside (model.py), so
what it takes is data.load_image's output: upright RGB, 0-255, resized with
the run's interpolation. Nothing is rescaled here. With test-time augmentation
(tta.py), an image's probabilities are the mean over its views.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.dataset import INDEXED_EXTENSIONS, check_link_cycles, load_image
from pipeline.errors import CommandError, DataError
from pipeline.tta import IDENTITY, View

CHUNK = 32  # images decoded and predicted together


@dataclass
class Labelled:
    path: str
    probabilities: np.ndarray | None = None  # one per class, summing to 1: the mean over the views
    error: str | None = None  # why the file could not be read
    plain: np.ndarray | None = None  # the image's own probabilities (view 0, the image itself)


def predict_batch(model, x: np.ndarray) -> np.ndarray:
    """Probabilities for a batch of pixels; training=False keeps dropout off and BatchNorm in inference mode."""
    return np.asarray(model(x, training=False))


def label_files(
    model,
    paths: Iterable[str],
    image_size: int,
    interpolation: str,
    max_pixels: int,
    views: Sequence[View] = (IDENTITY,),
) -> Iterator[Labelled]:
    """One result per path, in order; a file that cannot be decoded gets its reason and the rest go on.

    Each image is decoded once and its `views` (tta.tta_views; the first is the image itself) predicted.
    """
    chunk: list[Labelled] = []
    pixels: list[np.ndarray] = []
    for path in paths:
        result = Labelled(str(path))
        try:
            pixels.append(load_image(str(path), image_size, interpolation, max_pixels))
        except Exception as err:  # noqa: BLE001 - Pillow raises many kinds for a broken file; each is that file's problem
            result.error = describe_error(err)
        chunk.append(result)
        if len(pixels) == CHUNK:
            yield from finish_chunk(model, chunk, pixels, views)
            chunk, pixels = [], []
    yield from finish_chunk(model, chunk, pixels, views)


def finish_chunk(model, chunk: list[Labelled], pixels: list[np.ndarray], views: Sequence[View]) -> list[Labelled]:
    if pixels:
        # One batch per view, the same size as without views: view 0's batch is exactly
        # the plain prediction's, and only one view's pixels are held at a time.
        per_view = np.stack([predict_batch(model, np.stack([view.apply(x) for x in pixels])) for view in views])
        found = iter(zip(per_view[0], per_view.mean(axis=0), strict=True))
        for result in chunk:
            if result.error is None:
                result.plain, result.probabilities = next(found)
    return chunk


def describe_error(err: Exception) -> str:
    if isinstance(err, FileNotFoundError):
        return "no such file"
    if isinstance(err, IsADirectoryError):
        return "is a folder"
    text = str(err).split("\n")[0] or type(err).__name__
    return f"cannot read image: {text}"


def top_k(probabilities: np.ndarray, k: int) -> list[int]:
    """Class indices of the k highest probabilities, highest first (ties by class order)."""
    return [int(i) for i in np.argsort(-probabilities, kind="stable")[:k]]


def find_images(folder: Path) -> list[str]:
    """Image files under `folder`, sorted, links followed; by extension (any case), as training finds them."""
    try:
        check_link_cycles(folder)  # os.walk would follow a loop 40 levels deep
    except DataError as err:
        raise CommandError(str(err)) from None
    found = [
        os.path.join(root, name)
        for root, _, names in os.walk(folder, followlinks=True)
        for name in names
        if os.path.splitext(name)[1].lower() in INDEXED_EXTENSIONS
    ]
    return sorted(found)
