"""Test-time augmentation: the fixed views, and the mean over them that predict and evaluate print."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, from_conf, run_cli, shifted_by_hand
from PIL import Image

from pipeline.errors import CommandError
from pipeline.model_file.load import ModelInfo
from pipeline.reports.metrics import format_scores, macro_f1
from pipeline.tta import IDENTITY, available_views, compare_tta, half_shift, parse_tta, tta_views

SIZE = 20  # px: a tiny model and images, so the hand computation is quick


def trained_with(**changes) -> dict:
    """The data config a model's metadata records: conf/'s, with `changes`."""
    return dataclasses.asdict(from_conf("data", **changes))


def model_info(augmentation: dict, size: int = SIZE) -> ModelInfo:
    metadata = {"config": {"data": augmentation}} if augmentation else {}
    return ModelInfo(Path("m.h5"), ["a", "b", "c"], size, "bilinear", 1_000_000, metadata)


def picture(seed: int = 0, size: int = SIZE) -> np.ndarray:
    """Distinct values everywhere, so any move of any pixel shows."""
    return np.random.default_rng(seed).uniform(0, 255, (size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("text", ["0", "-1", "1.5", "two", ""])
def test_tta_must_be_a_whole_number_of_views(text):
    with pytest.raises(CommandError, match="^--tta"):
        parse_tta(text)


def test_parse_tta_takes_whole_numbers():
    assert parse_tta("1") == 1 and parse_tta("7") == 7


def test_views_are_fixed_start_with_the_image_and_follow_the_training_augmentation():
    flipped = trained_with(horizontal_flip=True, width_shift_range=0.1, height_shift_range=0.1)
    views = available_views(flipped, 75)
    assert views == available_views(flipped, 75)  # the same list on every call
    assert views[0] == IDENTITY and views[1].name == "mirrored"
    assert len(views) == 10 and len({v.name for v in views}) == 10
    # half of the largest shift training drew: 0.1 x 75 px = 7.5 px -> 4 px
    assert [v.name for v in views[2:6]] == [f"shifted 4 px {d}" for d in ("left", "right", "up", "down")]
    assert all(v.name.startswith("mirrored, ") and v.flip for v in views[6:])
    # trained without flips (digits, text): no view is mirrored
    unflipped = available_views(trained_with(horizontal_flip=False, width_shift_range=0.1, height_shift_range=0.1), 75)
    assert len(unflipped) == 5 and not any(v.flip for v in unflipped)
    # without flips or shifts, or with metadata that predates the data config: only the image
    still = trained_with(horizontal_flip=False, width_shift_range=0.0, height_shift_range=0.0)
    assert available_views(still, 75) == available_views({}, 75) == [IDENTITY]


def test_a_shift_is_half_the_largest_training_drew():
    assert half_shift(0.1, 150) == 8  # 15 px -> 7.5 -> 8
    assert half_shift(0.02, 75) == 1  # 1.5 px: at least one pixel
    assert half_shift(12, 75) == 6  # 1 or more: pixels, as ImageDataGenerator reads it
    assert half_shift(0, 75) == 0


def test_tta_views_are_the_first_n_and_more_than_training_allows_is_refused():
    info = model_info(trained_with(horizontal_flip=True, width_shift_range=0.1, height_shift_range=0.1))
    every = available_views(info.metadata["config"]["data"], SIZE)
    assert tta_views(1, info) == [IDENTITY] and tta_views(3, info) == every[:3]
    with pytest.raises(CommandError, match=r"^--tta 11: the model m\.h5 allows at most 10 view"):
        tta_views(11, info)
    with pytest.raises(CommandError, match="^--tta 2: .* at most 1 view"):
        tta_views(2, model_info({}))


def test_each_view_moves_the_picture_as_its_name_says():
    x = picture()
    views = {v.name: v for v in available_views(trained_with(horizontal_flip=True, fill_mode="nearest"), SIZE)}
    k = int(half_shift(from_conf("data").width_shift_range, SIZE))
    mirror = x[:, ::-1]
    expected = {
        "the image": x,
        "mirrored": mirror,
        f"shifted {k} px left": shifted_by_hand(x, right=-k),
        f"shifted {k} px right": shifted_by_hand(x, right=k),
        f"shifted {k} px up": shifted_by_hand(x, down=-k),
        f"shifted {k} px down": shifted_by_hand(x, down=k),
        f"mirrored, shifted {k} px left": shifted_by_hand(mirror, right=-k),
        f"mirrored, shifted {k} px right": shifted_by_hand(mirror, right=k),
        f"mirrored, shifted {k} px up": shifted_by_hand(mirror, down=-k),
        f"mirrored, shifted {k} px down": shifted_by_hand(mirror, down=k),
    }
    assert sorted(views) == sorted(expected)
    for name, want in expected.items():
        np.testing.assert_allclose(views[name].apply(x), want, atol=1e-3, err_msg=name)
        np.testing.assert_array_equal(views[name].apply(x), views[name].apply(x))  # deterministic
    assert views["the image"].apply(x) is x  # untouched, not even resampled


def test_shifted_views_fill_as_training_filled():
    x = picture()
    left = next(v for v in available_views(trained_with(fill_mode="constant"), SIZE) if "left" in v.name)
    k = int(left.tx)
    filled = left.apply(x)
    assert np.all(filled[:, -k:] == 0)  # constant fills with 0, where nearest repeats the edge
    np.testing.assert_allclose(filled[:, :-k], x[:, k:], atol=1e-3)


@pytest.fixture(scope="module")
def tiny_model():
    """A position-sensitive classifier on SIZE px (no pooling), so every view gives other probabilities."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(x))
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("tta_images")
    paths = []
    for seed in range(5):
        path = folder / f"{seed}.png"  # lossless, at the model's size: decoded as written
        Image.fromarray(picture(seed).astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths


def label(model, paths, views=None):
    from pipeline.inference import label_files

    data = from_conf("data")
    extra = () if views is None else (views,)
    return list(label_files(model, paths, SIZE, data.interpolation, data.max_pixels, *extra))


def test_one_view_is_exactly_the_plain_prediction(tiny_model, image_files):
    from pipeline.data.dataset import load_image
    from pipeline.inference import predict_batch

    data = from_conf("data")
    pixels = np.stack([load_image(p, SIZE, data.interpolation, data.max_pixels) for p in image_files])
    plain = predict_batch(tiny_model, pixels)
    for results in (label(tiny_model, image_files), label(tiny_model, image_files, [IDENTITY])):
        np.testing.assert_array_equal(np.stack([r.probabilities for r in results]), plain)
        np.testing.assert_array_equal(np.stack([r.plain for r in results]), plain)


def test_the_probabilities_are_the_mean_over_the_views(tiny_model, image_files):
    from pipeline.data.dataset import load_image

    data = from_conf("data")
    info = model_info(trained_with(horizontal_flip=True, fill_mode="nearest"))
    views = tta_views(6, info)  # the image, mirrored, shifted left, right, up, down
    k = int(views[2].tx)
    results = label(tiny_model, image_files, views)
    for path, result in zip(image_files, results, strict=True):
        x = load_image(path, SIZE, data.interpolation, data.max_pixels)
        by_hand = [x, x[:, ::-1], *(shifted_by_hand(x, r, d) for r, d in ((-k, 0), (k, 0), (0, -k), (0, k)))]
        each = np.asarray(tiny_model(np.stack(by_hand), training=False))
        np.testing.assert_allclose(result.probabilities, each.mean(axis=0), atol=1e-5)
        np.testing.assert_allclose(result.plain, each[0], atol=1e-6)
    # control: the views change the answer far beyond that tolerance
    moved = max(float(np.abs(r.probabilities - r.plain).max()) for r in results)
    assert moved > 1e-3, moved


@pytest.mark.e2e
def test_predict_tta_prints_the_mean_over_the_views_training_used(tiny_model, image_files, tmp_path):
    """The real command on a model file of the tiny model: its probabilities are the mean by hand."""
    from pipeline.data.dataset import load_image
    from pipeline.model_file.save import save_final

    data = trained_with(horizontal_flip=True, fill_mode="nearest")
    model_file = tmp_path / "tiny.h5"
    save_final(tiny_model, model_file, {"class_names": ["a", "b", "c"], "image_size": SIZE, "config": {"data": data}})
    result = run_cli(
        str(model_file), *image_files, "--tta", "6", "--csv", "--top-k", "3", cwd=REPO, module="pipeline.predict"
    )
    assert result.returncode == 0, result.stderr
    rows = result.stdout.splitlines()[1:]
    assert [row.split(",")[0] for row in rows] == image_files
    k = int(half_shift(data["width_shift_range"], SIZE))
    moved = 0.0
    for path, row in zip(image_files, rows, strict=True):
        cells = row.split(",")[1:7]
        shown = {cells[i]: float(cells[i + 1]) for i in range(0, 6, 2)}  # ranked: back in class order
        x = load_image(path, SIZE, data["interpolation"], data["max_pixels"])
        by_hand = [x, x[:, ::-1], *(shifted_by_hand(x, r, d) for r, d in ((-k, 0), (k, 0), (0, -k), (0, k)))]
        each = np.asarray(tiny_model(np.stack(by_hand), training=False))
        np.testing.assert_allclose([shown[c] for c in "abc"], each.mean(axis=0), atol=1e-4)  # printed to 4 decimals
        moved = max(moved, float(np.abs(each.mean(axis=0) - each[0]).max()))
    assert moved > 1e-3, f"the image alone prints the same: the comparison means nothing ({moved})"


def matrix_of(true, predicted):
    from pipeline.reports.metrics import confusion_matrix

    return confusion_matrix(np.array(true), np.array(predicted), 3)


def test_macro_f1_is_the_macro_average_evaluate_prints():
    matrix = matrix_of([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0])
    assert f"{macro_f1(matrix):6.4f}" == format_scores(matrix, ["a", "b", "c"]).splitlines()[-1].split()[-2]


def test_compare_tta_says_whether_it_helped_on_the_set():
    true = [0, 0, 1, 1, 2, 2]
    alone = matrix_of(true, [0, 1, 1, 1, 2, 0])  # 4/6
    better = matrix_of(true, [0, 0, 1, 1, 2, 0])  # 5/6
    line = compare_tta(alone, better)
    assert line.startswith("TTA helped on this set (6 images): accuracy 0.6667 -> 0.8333 (+0.1667), macro F1 ")
    assert compare_tta(better, alone).startswith("TTA hurt on this set")
    assert compare_tta(alone, alone).startswith("TTA made no difference on this set")
    # the same accuracy, a better macro F1: still helped
    assert compare_tta(matrix_of(true, [0, 0, 0, 0, 2, 2]), matrix_of(true, [0, 1, 1, 0, 2, 2])).startswith(
        "TTA helped"
    )
    # accuracy up, macro F1 down: the rare class is never found any more
    skewed = [0, 0, 0, 0, 1, 2]
    mixed = compare_tta(matrix_of(skewed, [0, 0, 1, 1, 1, 2]), matrix_of(skewed, [0, 0, 0, 0, 0, 2]))
    assert mixed.startswith("TTA helped by one score and hurt by the other on this set (6 images): ")
    assert "accuracy 0.6667 -> 0.8333 (+0.1667), macro F1 0.7222 -> 0.6296 (-0.0926)" in mixed
