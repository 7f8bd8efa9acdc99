"""The train and validation generators: files, labels, and batches.

`ImageDataGenerator.flow_from_directory` indexes the folders (class order,
file list, the validation split) and the ImageDataGenerator owns the
augmentation settings. Batches are then served by a Keras `PyDataset` whose
content depends only on (seed, epoch, batch index): Keras's own iterator
reseeds NumPy's global generator in call order, so after a resume, or with
parallel workers, it would serve a different order than an uninterrupted run.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
import tensorflow as tf

from .config import DataConfig
from .sample_data import has_images, write_sample_data

ImageDataGenerator = tf.keras.preprocessing.image.ImageDataGenerator

# ImageDataGenerator.get_random_transform(seed=...) seeds NumPy's *global*
# generator and then draws from it; two worker threads interleaving there would
# swap each other's draws. The draw is cheap; the warp that follows runs unlocked.
_GLOBAL_RNG_LOCK = threading.Lock()

RESAMPLING = {
    "nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
}


class DataError(ValueError):
    """A data folder that cannot be trained on; the message names it."""


@dataclass
class Split:
    """One side of the data: files, integer labels, and where they came from."""
    filepaths: list[str]
    labels: np.ndarray
    source: str

    def counts(self, n_classes: int) -> list[int]:
        return np.bincount(self.labels, minlength=n_classes).tolist()


@dataclass
class DataSet:
    class_names: list[str]
    train: Split
    validation: Split
    augmenter: ImageDataGenerator


def load_image(path: str, image_size: int, interpolation: str = "bilinear") -> np.ndarray:
    """Decode one image as float32 RGB 0-255 at image_size x image_size.

    EXIF orientation is applied, so the network sees the photo the way a person
    does; alpha is dropped and greyscale, palette and CMYK become RGB.
    """
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        img = img.convert("RGB")
        img = img.resize((image_size, image_size), RESAMPLING[interpolation])
        return np.asarray(img, dtype=np.float32)


def ensure_sample_data(cfg: DataConfig) -> None:
    """Write the built-in sample set when data.dir holds nothing at all (a fresh clone).

    A folder that holds other files but no images is left alone: that is a
    user's folder gone wrong, and read_dataset will say so.
    """
    root = Path(cfg.dir)
    if not cfg.make_sample_if_empty or has_images(root):
        return
    if root.is_dir() and any(not p.name.startswith(".") for p in root.iterdir()):
        return
    print(f"data: {root} holds no images; writing the built-in sample set there (data.make_sample_if_empty)")
    write_sample_data(root)


def make_augmenter(cfg: DataConfig, validation_split: float = 0.0) -> ImageDataGenerator:
    return ImageDataGenerator(
        rotation_range=cfg.rotation_range,
        width_shift_range=cfg.width_shift_range,
        height_shift_range=cfg.height_shift_range,
        shear_range=cfg.shear_range,
        zoom_range=cfg.zoom_range,
        horizontal_flip=cfg.horizontal_flip,
        fill_mode=cfg.fill_mode,
        validation_split=validation_split,
    )


def index_folder(gen: ImageDataGenerator, directory: Path, cfg: DataConfig,
                 classes=None, subset=None):
    """List files and labels the way flow_from_directory sees them."""
    it = gen.flow_from_directory(
        str(directory), target_size=(cfg.image_size, cfg.image_size), classes=classes,
        class_mode="categorical", batch_size=cfg.batch_size, shuffle=False,
        follow_links=True, subset=subset, interpolation="nearest")
    names = sorted(it.class_indices, key=it.class_indices.get)
    return names, Split(list(it.filepaths), np.asarray(it.classes, dtype=np.int64), str(directory))


def read_dataset(cfg: DataConfig) -> DataSet:
    """Index train/ and validation/ (or hold out data.validation_split of train/)."""
    root = Path(cfg.dir)
    train_dir, val_dir = root / "train", root / "validation"
    if not train_dir.is_dir():
        raise DataError(f"data.dir={cfg.dir!r} has no train/ folder; expected "
                        f"{train_dir}/<class>/<images> (and optionally {val_dir}/<class>/...)")
    if val_dir.is_dir():
        augmenter = make_augmenter(cfg)
        names, train = index_folder(augmenter, train_dir, cfg)
        _, validation = index_folder(ImageDataGenerator(), val_dir, cfg, classes=names)
    else:
        # Same split fraction on both generators, so the two subsets are complementary.
        augmenter = make_augmenter(cfg, cfg.validation_split)
        names, train = index_folder(augmenter, train_dir, cfg, subset="training")
        _, validation = index_folder(ImageDataGenerator(validation_split=cfg.validation_split),
                                     train_dir, cfg, classes=names, subset="validation")
        validation.source = f"{train_dir} (held-out {cfg.validation_split:.0%})"
    check_layout(names, train, validation, root)
    return DataSet(names, train, validation, augmenter)


def check_layout(names: list[str], train: Split, validation: Split, root: Path) -> None:
    if len(names) < 2:
        raise DataError(f"{root / 'train'} holds {len(names)} class folder(s); a classifier needs at least 2")
    empty = [n for n, c in zip(names, train.counts(len(names))) if c == 0]
    if empty:
        raise DataError(f"class folder(s) with no images in {root / 'train'}: {', '.join(empty)}")
    if len(validation.filepaths) == 0:
        raise DataError(f"no validation images in {validation.source}")


class Batches(tf.keras.utils.PyDataset):
    """Batches of one epoch, keyed to (seed, epoch, batch index) only.

    `start_batch` skips the batches a resumed run already trained on, so a run
    continued mid-epoch sees exactly the batches an uninterrupted one would.
    """

    def __init__(self, split: Split, n_classes: int, cfg: DataConfig, seed: int, epoch: int,
                 augmenter: ImageDataGenerator | None, shuffle: bool, start_batch: int = 0):
        super().__init__(workers=cfg.workers, use_multiprocessing=False, max_queue_size=4)
        self.split, self.n_classes, self.cfg = split, n_classes, cfg
        self.seed, self.epoch, self.augmenter = seed, epoch, augmenter
        n = len(split.filepaths)
        self.order = (np.random.default_rng([seed, epoch]).permutation(n) if shuffle
                      else np.arange(n))
        self.batches_per_epoch = math.ceil(n / cfg.batch_size)
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __getitem__(self, index: int):
        batch = index + self.start_batch
        picks = self.order[batch * self.cfg.batch_size:(batch + 1) * self.cfg.batch_size]
        x = np.stack([self.load(int(j)) for j in picks])
        y = np.eye(self.n_classes, dtype=np.float32)[self.split.labels[picks]]
        return x, y

    def load(self, j: int) -> np.ndarray:
        x = load_image(self.split.filepaths[j], self.cfg.image_size, self.cfg.interpolation)
        if self.augmenter is None:
            return x
        key = int(np.random.SeedSequence([self.seed, self.epoch, j]).generate_state(1)[0])
        with _GLOBAL_RNG_LOCK:
            params = self.augmenter.get_random_transform(x.shape, seed=key)
        return self.augmenter.apply_transform(x, params)


def train_batches(data: DataSet, cfg: DataConfig, seed: int, epoch: int, start_batch: int = 0) -> Batches:
    return Batches(data.train, len(data.class_names), cfg, seed, epoch, data.augmenter,
                   shuffle=True, start_batch=start_batch)


def validation_batches(data: DataSet, cfg: DataConfig) -> Batches:
    return Batches(data.validation, len(data.class_names), cfg, seed=0, epoch=0,
                   augmenter=None, shuffle=False)
