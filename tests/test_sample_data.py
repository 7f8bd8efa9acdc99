"""Tests for pipeline.data.sample_data: layout, decoding, determinism, safety, and that the set needs shape to learn."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import sample_data
from pipeline.data.sample_data import CLASS_NAMES, SPLITS, STAGING_PREFIX, has_images, write_sample_data

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = {"train_per_class": 3, "validation_per_class": 2, "image_size": 48}  # enough to compare, quick to write


@pytest.fixture(scope="module")
def default_set(tmp_path_factory):
    """Write the default set once for the module (tests only read it); return its root and the returned counts."""
    root = tmp_path_factory.mktemp("default") / "data"
    return root, write_sample_data(root)


def read_images(root: Path) -> dict:
    """Return every JPEG under `root` as {relative path: bytes}."""
    return {path.relative_to(root): path.read_bytes() for path in sorted(root.rglob("*.jpg"))}


def start_sample_data_cli(*args: str, **kwargs) -> subprocess.Popen:
    """Start `python -m pipeline.sample_data ARGS` from the repo root, as a user would."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.sample_data", *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_default_set_has_the_promised_layout_and_counts(default_set):
    root, counts = default_set
    per_split = {"train": 150, "validation": 40}
    assert counts == {split: {name: n for name in CLASS_NAMES} for split, n in per_split.items()}
    expected = {
        Path(split, name, f"{name}_{index:04d}.jpg")
        for split, n in per_split.items()
        for name in CLASS_NAMES
        for index in range(n)
    }
    assert set(read_images(root)) == expected
    # No staging folder is left behind after a success.
    assert sorted(path.name for path in root.iterdir()) == ["train", "validation"]


def test_every_file_decodes_as_an_rgb_jpeg_of_the_requested_size(default_set, tmp_path):
    root, _ = default_set
    write_sample_data(tmp_path / "small", **SMALL)
    for folder, side in ((root, 160), (tmp_path / "small", SMALL["image_size"])):
        for path in folder.rglob("*.jpg"):
            with Image.open(path) as image:
                image.load()  # decode fully, not just the header
                assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (side, side)), path


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    first = read_images_after_writing(tmp_path / "a", seed=3)
    again = read_images_after_writing(tmp_path / "b", seed=3)
    other = read_images_after_writing(tmp_path / "c", seed=4)
    assert first == again
    assert first.keys() == other.keys()
    assert all(first[name] != other[name] for name in first)


def read_images_after_writing(root: Path, seed: int) -> dict:
    """Write the small set with `seed` into `root` and return its images."""
    write_sample_data(root, seed=seed, **SMALL)
    return read_images(root)


def test_train_and_validation_are_different_draws(default_set):
    root, _ = default_set
    train = set(read_images(root / "train").values())
    validation = set(read_images(root / "validation").values())
    assert len(train) == 450 and len(validation) == 120  # no duplicates inside a split either
    assert not train & validation


@pytest.mark.parametrize("split", SPLITS)
def test_refuses_to_overwrite_a_split_that_holds_files(tmp_path, split):
    precious = tmp_path / split / "circle" / "mine.jpg"
    precious.parent.mkdir(parents=True)
    precious.write_bytes(b"not to be touched")
    with pytest.raises(FileExistsError, match=str(tmp_path / split)):
        write_sample_data(tmp_path, **SMALL)
    assert precious.read_bytes() == b"not to be touched"
    assert [path.name for path in tmp_path.iterdir()] == [split]  # nothing written, no staging left


def test_writes_into_an_existing_root_with_a_gitkeep_and_an_empty_split(tmp_path):
    (tmp_path / ".gitkeep").touch()
    (tmp_path / "train").mkdir()
    write_sample_data(tmp_path, **SMALL)
    assert (tmp_path / ".gitkeep").exists()
    assert len(read_images(tmp_path)) == 3 * (3 + 2)


def test_a_failure_midway_leaves_no_split_and_no_staging(tmp_path, monkeypatch):
    real_draw = sample_data.draw_image
    calls = []

    def draw_then_fail(*args):
        calls.append(1)
        if len(calls) > 10:  # past all of train, into validation
            raise RuntimeError("simulated crash")
        return real_draw(*args)

    monkeypatch.setattr(sample_data, "draw_image", draw_then_fail)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_sample_data(tmp_path, **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_a_killed_run_leaves_no_set_that_looks_complete(tmp_path):
    root = tmp_path / "data"
    process = start_sample_data_cli(str(root))
    deadline = time.monotonic() + 60
    # Wait until images are being written, then kill it for real: no cleanup code can run.
    while not any(root.glob(f"{STAGING_PREFIX}*/*/*/*.jpg")):
        assert process.poll() is None, f"finished before it could be killed: {process.communicate()}"
        assert time.monotonic() < deadline, "no image appeared within 60 s"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert any(root.glob(f"{STAGING_PREFIX}*")), "the kill should have left its partial, hidden folder"
    assert not (root / "train").exists() and not (root / "validation").exists()
    assert not has_images(root)  # the hidden partial folder is not data
    write_sample_data(root, **SMALL)  # and it does not block the next run
    assert has_images(root / "train") and has_images(root / "validation")


def test_cli_writes_the_default_set_prints_one_line_and_then_refuses(tmp_path):
    root = tmp_path / "data"
    out, err = start_sample_data_cli(str(root), "--seed", "1").communicate(timeout=120)
    assert out.splitlines() == [
        f"wrote 570 images to {root}: train 450 (circle 150, square 150, triangle 150), "
        "validation 120 (circle 40, square 40, triangle 40)"
    ], err
    refused = start_sample_data_cli(str(root))
    _, err = refused.communicate(timeout=120)
    assert refused.returncode == 1
    assert str(root / "train") in err and "Traceback" not in err


@pytest.mark.parametrize(
    "arguments", [{"seed": -1}, {"train_per_class": 0}, {"validation_per_class": 0}, {"image_size": 8}]
)
def test_rejects_arguments_that_cannot_give_a_data_set(tmp_path, arguments):
    with pytest.raises(ValueError, match=next(iter(arguments))):
        write_sample_data(tmp_path / "data", **arguments)
    assert not (tmp_path / "data").exists()  # checked before anything is created


@pytest.mark.parametrize("name", ["a.jpg", "B.JPEG", "c.Png", "d.bmp", "e.ppm", "f.TIF", "g.tiff", "h.gif", "i.webp"])
def test_has_images_finds_any_image_extension_in_any_case(tmp_path, name):
    deep = tmp_path / "x" / "y"
    deep.mkdir(parents=True)
    (deep / name).touch()
    assert has_images(tmp_path)


def test_has_images_is_false_without_image_files(tmp_path):
    assert not has_images(tmp_path / "missing")
    (tmp_path / ".gitkeep").touch()
    (tmp_path / "notes.txt").touch()
    (tmp_path / "jpg").mkdir()  # a folder named like an extension is not an image
    (tmp_path / "draft.jpg.partial").touch()  # only the last suffix counts
    assert not has_images(tmp_path)


def test_has_images_follows_symlinks_without_looping(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "circle").mkdir(parents=True)
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "loop").symlink_to(root)  # a cycle must not hang the walk
    (root / "broken").symlink_to(tmp_path / "nowhere")
    assert not has_images(root)
    (root / "linked").symlink_to(elsewhere)
    (elsewhere / "circle" / "one.jpg").touch()
    assert has_images(root)


def test_has_images_skips_hidden_folders(tmp_path):
    hidden = tmp_path / f"{STAGING_PREFIX}abc" / "train" / "circle"
    hidden.mkdir(parents=True)
    (hidden / "circle_0000.jpg").touch()
    assert not has_images(tmp_path)


def load_features(root: Path, split: str, feature) -> tuple[np.ndarray, np.ndarray]:
    """Return (features, labels) of a split, one image at a time to keep memory small."""
    features, labels = [], []
    for label, name in enumerate(CLASS_NAMES):
        for path in sorted((root / split / name).glob("*.jpg")):
            with Image.open(path) as image:
                features.append(feature(np.asarray(image, dtype=np.float32) / 255))
            labels.append(label)
    return np.array(features), np.array(labels)


def nearest_centroid_accuracy(root: Path, feature) -> float:
    """Fit per-class mean feature vectors on train (standardised) and return accuracy on validation."""
    train_x, train_y = load_features(root, "train", feature)
    valid_x, valid_y = load_features(root, "validation", feature)
    centre, scale = train_x.mean(axis=0), train_x.std(axis=0) + 1e-8
    train_x, valid_x = (train_x - centre) / scale, (valid_x - centre) / scale
    centroids = np.stack([train_x[train_y == label].mean(axis=0) for label in range(len(CLASS_NAMES))])
    predicted = ((valid_x[:, None, :] - centroids[None]) ** 2).sum(axis=-1).argmin(axis=1)
    return float((predicted == valid_y).mean())


def mean_colour(image: np.ndarray) -> np.ndarray:
    """The mean RGB of an image: all a colour-only classifier could use."""
    return image.mean(axis=(0, 1))


def edge_orientation_harmonics(image: np.ndarray, orders: int = 4) -> np.ndarray:
    """How strongly edge directions repeat every 360/k degrees, for k = 1..orders.

    A triangle's edges point three ways (k = 3), a square's four (k = 4), a circle's
    every way (none). Taking magnitudes makes this blind to rotation, and the image-wide
    sums make it blind to position and scale, so it sees shape and nothing else.
    """
    grey = image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    dy, dx = np.gradient(grey)
    gradient = dx + 1j * dy
    strength = np.abs(gradient) ** 2  # squared, so the shape's sharp edges outweigh the soft texture
    direction = gradient / np.maximum(np.abs(gradient), 1e-6)
    return np.array([abs((strength * direction**k).sum()) for k in range(1, orders + 1)]) / strength.sum()


def test_colour_varies_within_each_class(default_set):
    # the class hue is a cue, as in real photos, but no class is one flat colour
    root, _ = default_set
    features, labels = load_features(root, "train", mean_colour)
    for label in range(len(CLASS_NAMES)):
        spread = features[labels == label].std(axis=0)
        assert spread.max() > 0.04, f"{CLASS_NAMES[label]} images are all about the same colour"


def test_a_simple_shape_feature_does_separate_the_classes(default_set):
    root, _ = default_set
    accuracy = nearest_centroid_accuracy(root, edge_orientation_harmonics)
    # Measured near 98%; the brief asks only for > 70%, this keeps a wide margin below what we get.
    assert accuracy > 0.9, f"edge-orientation features give only {accuracy:.0%}: shapes are not learnable"
