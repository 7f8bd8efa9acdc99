"""Test-time augmentation: the fixed views of an image that `predict` and `evaluate` `--tta N` average over.

The views follow the augmentation the model was trained with, as its metadata
records it (data.horizontal_flip, data.width_shift_range, data.height_shift_range,
data.fill_mode): a model trained without flips is never shown a mirror image (on
digits or text left and right matter), and a model trained without shifts is
never shown a shifted one. A shift is half the largest one training drew, made
by training's own transform and filled as training filled it. The list is fixed,
so the same N gives the same views on every call:

    1 the image itself; 2 mirrored (if training flipped);
    3-6 shifted left, right, up, down (if training shifted); 7-10 the mirror shifted the same four ways.

`--tta N` takes the first N views this model allows; more is an error naming --tta
and the number there are. Nothing here imports TensorFlow until a view is applied,
so a bad --tta fails in a second.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from pipeline.errors import CommandError
from pipeline.model_file.load import ModelInfo
from pipeline.reports.metrics import accuracy, macro_f1

TTA_HELP = (
    "average over N fixed views of each image: itself, then the flips and shifts the model was trained with "
    "(default 1, the image alone)"
)


@dataclass(frozen=True)
class View:
    """One fixed view: ImageDataGenerator's transform parameters, named by what they do to the picture."""

    name: str
    flip: bool = False
    # ImageDataGenerator's tx and ty, in pixels. In this Keras, tx moves the picture sideways
    # (+ to the left) and ty up and down (+ upwards), though its documentation says otherwise
    # (keras-team/keras#17398); training draws them the same way, so the views use them as it does.
    tx: float = 0.0
    ty: float = 0.0
    fill_mode: str = "nearest"  # only read when shifted: training's data.fill_mode

    def apply(self, x: np.ndarray) -> np.ndarray:
        """This view of `x` (height, width, 3); the image itself is returned untouched."""
        if not (self.flip or self.tx or self.ty):
            return x
        params = {"tx": self.tx, "ty": self.ty, "flip_horizontal": self.flip}
        return transformer(self.fill_mode).apply_transform(x, params)


IDENTITY = View("the image")


@functools.cache
def transformer(fill_mode: str):
    """Training's transform (data.make_augmenter's class: the same interpolation, fill and cval)."""
    from pipeline.data.dataset import ImageDataGenerator

    return ImageDataGenerator(fill_mode=fill_mode)


def parse_tta(text: str) -> int:
    """--tta's value: a whole number of views, at least 1; CommandError naming --tta otherwise."""
    try:
        n = int(text)
    except ValueError:
        raise CommandError(f"--tta {text}: must be a whole number of views (1 = the image alone)") from None
    if n < 1:
        raise CommandError(f"--tta {text}: must be at least 1 (1 = the image alone)")
    return n


def half_shift(shift_range: float, side: int) -> float:
    """Half the largest shift training drew, in whole pixels (at least 1); 0 if training did not shift.

    As ImageDataGenerator reads a range: below 1 a fraction of the side, otherwise pixels.
    """
    if not shift_range:
        return 0.0
    largest = shift_range * side if shift_range < 1 else shift_range
    return float(max(1, round(largest / 2)))


def available_views(augmentation: dict, image_size: int) -> list[View]:
    """Every view this training's augmentation allows, in the fixed order (the module's docstring)."""
    fill = augmentation.get("fill_mode", "nearest")
    # tx from height_shift_range and ty from width_shift_range, as get_random_transform draws them
    sideways = half_shift(augmentation.get("height_shift_range", 0), image_size)
    upwards = half_shift(augmentation.get("width_shift_range", 0), image_size)
    shifts = []
    if sideways:
        shifts += [(f"shifted {sideways:g} px left", sideways, 0.0), (f"shifted {sideways:g} px right", -sideways, 0.0)]
    if upwards:
        shifts += [(f"shifted {upwards:g} px up", 0.0, upwards), (f"shifted {upwards:g} px down", 0.0, -upwards)]
    views = [IDENTITY, *(View(name, False, tx, ty, fill) for name, tx, ty in shifts)]
    if augmentation.get("horizontal_flip", False):
        # apply_transform shifts, then mirrors: -tx so that the mirror picture moves the way its name says
        mirrored = [View(f"mirrored, {name}", True, -tx, ty, fill) for name, tx, ty in shifts]
        views = [IDENTITY, View("mirrored", flip=True), *views[1:], *mirrored]
    return views


def training_augmentation(info: ModelInfo) -> dict:
    """The data config the model was trained with; empty for metadata that predates it (no flips, no shifts)."""
    return dict((info.metadata.get("config") or {}).get("data") or {})


def tta_views(n: int, info: ModelInfo) -> list[View]:
    """The first n views for this model; CommandError naming --tta if its training allows fewer."""
    views = available_views(training_augmentation(info), info.image_size)
    if n > len(views):
        raise CommandError(
            f"--tta {n}: the model {info.path} allows at most {len(views)} view(s) "
            f"({'; '.join(v.name for v in views)}): only the flips and shifts it was trained with"
        )
    return views[:n]


def describe_views(views: list[View]) -> str:
    return f"mean of {len(views)} views: {'; '.join(v.name for v in views)}"


def compare_tta(alone: np.ndarray, averaged: np.ndarray) -> str:
    """One line: did TTA help on this set? By accuracy and macro F1 of the two confusion matrices."""
    before, after = (accuracy(alone), macro_f1(alone)), (accuracy(averaged), macro_f1(averaged))
    gains = [b - a for a, b in zip(before, after, strict=True)]
    if all(g == 0 for g in gains):
        verdict = "made no difference"
    elif all(g >= 0 for g in gains):
        verdict = "helped"
    elif all(g <= 0 for g in gains):
        verdict = "hurt"
    else:
        verdict = "helped by one score and hurt by the other"
    return (
        f"TTA {verdict} on this set ({int(alone.sum())} images): "
        f"accuracy {before[0]:.4f} -> {after[0]:.4f} ({gains[0]:+.4f}), "
        f"macro F1 {before[1]:.4f} -> {after[1]:.4f} ({gains[1]:+.4f})"
    )
