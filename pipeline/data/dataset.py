"""The train and validation generators: files, labels, and batches.

`ImageDataGenerator.flow_from_directory` indexes class folders (class order,
file list; read_dataset picks the layout: train/ folders or flat class
folders), labels_csv.py reads a CSV instead, and the ImageDataGenerator owns
the augmentation settings. Batches are then served by a Keras `PyDataset` whose
content depends only on (seed, epoch, batch index): Keras's own iterator
reseeds NumPy's global generator in call order, so after a resume, or with
parallel workers, it would serve a different order than an uninterrupted run.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import numpy as np
import tensorflow as tf
from PIL import Image, ImageOps

from pipeline.config import DataConfig
from pipeline.data.holdout import hold_out
from pipeline.data.labels_csv import Row, read_label_files
from pipeline.data.sample_data import has_images, write_sample_data
from pipeline.errors import DataError, TooManyPixels

# An explicit TypeAlias, so mypy accepts it in annotations (TensorFlow has no stubs: to mypy it is Any).
ImageDataGenerator: TypeAlias = tf.keras.preprocessing.image.ImageDataGenerator
# The extensions flow_from_directory indexes (any case); other files are not data.
INDEXED_EXTENSIONS = tuple("." + ext for ext in tf.keras.preprocessing.image.DirectoryIterator.white_list_formats)
# Said wherever no images were found: training, predict and evaluate find them alike.
EXTENSIONS_HINT = f"images are found by extension, any case: {' '.join(INDEXED_EXTENSIONS)}"

# Image files that flow_from_directory does not index: named in a warning rather than silently unused.
UNINDEXED_IMAGE_EXTENSIONS = (".gif", ".webp", ".heic", ".heif", ".avif", ".jfif", ".jp2")

# ImageDataGenerator.get_random_transform(seed=...) seeds NumPy's *global*
# generator and then draws from it; two worker threads interleaving there would
# swap each other's draws. The draw is cheap; the warp that follows runs unlocked.
_GLOBAL_RNG_LOCK = threading.Lock()

RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


# data.max_pixels is the one decompression-bomb limit. Pillow's own limit is process-wide
# and would overrule it (a warning above 89 M pixels, a refusal above 179 M even when a
# user allows more), so it is off and decode_image checks the header's size instead.
Image.MAX_IMAGE_PIXELS = None
# Transparent pixels become white: how a viewer or a web page shows a cut-out photo.
ALPHA_BACKGROUND = (255, 255, 255)
# Greyscale wider than 8 bits (16-bit PNG and TIFF; Pillow may open them as "I"),
# taken as 0-65535. Pillow's convert() would clip every level above 255 to white.
WIDE_GREY_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


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
    # What the start-up summary says of the layout, and the rule that chose it (read_dataset).
    layout: str = "train/<class>/ and validation/<class>/"
    # How validation was held out of training: None (named: validation/, data.validation_csv),
    # "first" (flow_from_directory: each class's first files), "seeded" (holdout.py).
    held_out: str | None = None


def load_image(path: str, image_size: int, interpolation: str, max_pixels: int) -> np.ndarray:
    """Decode one image as float32 RGB 0-255 at image_size x image_size (training's loader).

    `interpolation` and `max_pixels` are the run's data.interpolation and data.max_pixels (for a
    trained model, those its metadata records); no default here, so no caller can drift from them.
    """
    return resize_image(decode_image(path, max_pixels), image_size, interpolation)


def decode_image(path: str, max_pixels: int) -> Image.Image:
    """Fully decode one file into upright 8-bit RGB.

    The one decoding path: training (load_image) and the check before training
    (image_check.py) both use it, so an image that passes the check trains.
    EXIF orientation is applied: cameras store pixels sideways plus a tag, and
    the network should see the photo upright, as a person and every viewer do.
    Raises TooManyPixels from the header alone, before anything is decompressed;
    OSError for a truncated file (Pillow's LOAD_TRUNCATED_IMAGES stays False);
    PIL.UnidentifiedImageError for a file that is not an image.
    """
    with Image.open(path) as img:
        if img.width * img.height > max_pixels:
            raise TooManyPixels(img.width, img.height, max_pixels)
        img.load()  # every byte now: a truncated file fails here, not as a half-grey picture
        return to_rgb(ImageOps.exif_transpose(img))


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: greyscale, palette, CMYK, 16-bit, with or without alpha.

    16-bit greyscale is scaled (0-65535 onto 0-255), where convert() would clip
    nearly every pixel to white; transparency is composited onto ALPHA_BACKGROUND,
    where convert() would expose whatever colour the transparent pixels happen to hold.
    """
    if img.mode in WIDE_GREY_MODES:
        levels = np.asarray(img).astype(np.float32)
        img = Image.fromarray(np.clip(np.rint(levels / 257.0), 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        background = Image.new("RGBA", img.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def resize_image(img: Image.Image, image_size: int, interpolation: str) -> np.ndarray:
    """Resize to image_size x image_size (aspect ratio not kept) as float32 0-255."""
    return np.asarray(img.resize((image_size, image_size), RESAMPLING[interpolation]), dtype=np.float32)


def ensure_sample_data(cfg: DataConfig) -> None:
    """Write the built-in sample set when data.dir holds nothing at all (a fresh clone).

    A folder that holds other files but no images is left alone: that is a
    user's folder gone wrong, and read_dataset will say so.
    """
    root = Path(cfg.dir)
    if not cfg.make_sample_if_empty or cfg.labels_csv or has_images(root):
        return
    if root.is_dir() and any(not p.name.startswith(".") for p in root.iterdir()):
        return
    print(f"data: {root} holds no images; writing the built-in sample set there (data.make_sample_if_empty)")
    write_sample_data(root)


# ImageDataGenerator's settings (data.<key>): they decide every augmented view a run trains on,
# so the checkpoint fingerprint and the feature cache's key name them too.
AUGMENTATION_KEYS = (
    "rotation_range",
    "width_shift_range",
    "height_shift_range",
    "shear_range",
    "zoom_range",
    "horizontal_flip",
    "fill_mode",
)


def make_augmenter(cfg: DataConfig, validation_split: float = 0.0) -> ImageDataGenerator:
    return ImageDataGenerator(
        **{key: getattr(cfg, key) for key in AUGMENTATION_KEYS}, validation_split=validation_split
    )


def index_folder(gen: ImageDataGenerator, directory: Path, cfg: DataConfig, classes=None, subset=None):
    """List files and labels the way flow_from_directory sees them."""
    it = gen.flow_from_directory(
        str(directory),
        target_size=(cfg.image_size, cfg.image_size),
        classes=classes,
        class_mode="categorical",
        batch_size=cfg.batch_size,
        shuffle=False,
        follow_links=True,
        subset=subset,
        interpolation="nearest",
    )
    names = sorted(it.class_indices, key=it.class_indices.get)
    return names, Split(list(it.filepaths), np.asarray(it.classes, dtype=np.int64), str(directory))


def read_dataset(cfg: DataConfig) -> DataSet:
    """Index the images and their labels in whichever layout data.dir has (docs/data.md#layout).

    data.labels_csv set: the CSV files. Else a train/ folder holding class folders: train/ and
    validation/ (or flow_from_directory's held-out share of train/). Else the flat layout, every
    folder of data.dir a class, with a seeded per-class held-out share (holdout.py).
    """
    root = Path(cfg.dir)
    if cfg.labels_csv:
        data = read_csv_layout(cfg, root)
    elif has_split_layout(root):
        data = read_split_layout(cfg, root)
    else:
        data = read_flat_layout(cfg, root)
    check_layout(data.class_names, data.train, data.validation)
    warn_missing_validation(data.class_names, data.validation)
    return data


def has_split_layout(root: Path) -> bool:
    """The rule for a folder named train: it is the training side when it holds class folders
    (the split layout); otherwise it is a class of the flat layout (the start-up summary says which)."""
    return (root / "train").is_dir() and bool(class_folders(root / "train", quiet=True))


def read_split_layout(cfg: DataConfig, root: Path) -> DataSet:
    """train/<class>/ and validation/<class>/, or data.validation_split of each class of train/ held out."""
    train_dir, val_dir = root / "train", root / "validation"
    for folder in (train_dir, val_dir):
        check_link_cycles(folder)
    classes = order_classes(class_folders(train_dir), cfg.classes, train_dir)
    check_class_names(classes, train_dir)
    layout = "train/<class>/ (train/ holds class folders, so it is the training side, not a class)"
    if val_dir.is_dir():
        augmenter = make_augmenter(cfg)
        names, train = index_folder(augmenter, train_dir, cfg, classes=classes)
        check_validation_classes(names, val_dir)
        _, validation = index_folder(ImageDataGenerator(), val_dir, cfg, classes=names)
        held_out = None
        layout += " and validation/<class>/"
    else:
        # Same split fraction on both generators, so the two subsets are complementary.
        augmenter = make_augmenter(cfg, cfg.validation_split)
        names, train = index_folder(augmenter, train_dir, cfg, classes=classes, subset="training")
        _, validation = index_folder(
            ImageDataGenerator(validation_split=cfg.validation_split),
            train_dir,
            cfg,
            classes=names,
            subset="validation",
        )
        validation.source = f"{train_dir} (held-out {cfg.validation_split:.0%})"
        # flow_from_directory's split (each class's first files), kept so existing checkpoints still resume.
        held_out = "first"
        layout += f"; no validation/, so the first {cfg.validation_split:.0%} of each class validates"
    for folder in (train_dir, val_dir):
        warn_unindexed_images(folder, names)
    return DataSet(names, train, validation, augmenter, layout, held_out)


def read_flat_layout(cfg: DataConfig, root: Path) -> DataSet:
    """data.dir/<class>/: every (non-hidden) folder is a class; a seeded share of each validates."""
    check_link_cycles(root)
    classes = order_classes(class_folders(root), cfg.classes, root)
    check_class_names(classes, root)
    augmenter = make_augmenter(cfg)
    if len(classes) < 2:  # flow_from_directory would index nothing; say which layouts are read
        raise DataError(
            f"data.dir={cfg.dir!r} holds {len(classes)} class folder(s); expected {root}/<class>/<images> "
            f"or {root}/train/<class>/<images> (at least 2 classes), or set data.labels_csv"
        )
    names, everything = index_folder(augmenter, root, cfg, classes=classes)
    train, validation = split_held_out(everything, root, cfg)
    warn_unindexed_images(root, names)
    layout = f"<class>/ directly in data.dir, {cfg.validation_split:.0%} of each class validates (data.split_seed)"
    if "train" in names:
        layout += "; train/ holds no class folders, so it is the class 'train'"
    return DataSet(names, train, validation, augmenter, layout, "seeded")


def read_csv_layout(cfg: DataConfig, root: Path) -> DataSet:
    """data.labels_csv (and data.validation_csv), checked row by row, in canonical order (labels_csv.py)."""
    labelled = read_label_files(cfg)
    rank = {name: i for i, name in enumerate(labelled.class_names)}

    def split(rows: list[Row], source: str) -> Split:
        paths = [os.path.join(root, row.path) for row in rows]
        return Split(paths, np.asarray([rank[row.label] for row in rows], dtype=np.int64).reshape(-1), source)

    train = split(labelled.train, str(cfg.labels_csv))
    layout = f"labels from {cfg.labels_csv}, paths relative to data.dir"
    if labelled.validation is not None:
        validation, held_out = split(labelled.validation, str(cfg.validation_csv)), None
        layout += f"; validation from {cfg.validation_csv}"
    else:
        train, validation = split_held_out(train, root, cfg)
        held_out = "seeded"
        layout += f"; {cfg.validation_split:.0%} of each class validates (data.split_seed)"
    return DataSet(labelled.class_names, train, validation, make_augmenter(cfg), layout, held_out)


def split_held_out(split: Split, root: Path, cfg: DataConfig) -> tuple[Split, Split]:
    """(training, validation): data.validation_split of each class, chosen by holdout.py, in the same order."""
    relative = [Path(os.path.relpath(path, root)).as_posix() for path in split.filepaths]
    mask = hold_out(relative, split.labels, cfg.validation_split, cfg.split_seed)

    def side(keep: np.ndarray, source: str) -> Split:
        return Split([p for p, k in zip(split.filepaths, keep, strict=True) if k], split.labels[keep], source)

    held = f"{split.source} (held-out {cfg.validation_split:.0%}, data.split_seed={cfg.split_seed})"
    return side(~mask, split.source), side(mask, held)


def order_classes(found: list[str], classes: list[str] | None, where: Path) -> list[str]:
    """The class folders in data.classes's order, which must name exactly those folders; else sorted."""
    if classes is None:
        return found
    missing, extra = [c for c in classes if c not in found], [f for f in found if f not in classes]
    parts = [f"no folder for {', '.join(missing)}"] if missing else []
    parts += [f"folder(s) {', '.join(extra)} not listed"] if extra else []
    if parts:
        raise DataError(f"data.classes must name the class folders of {where} exactly: {'; '.join(parts)}")
    return list(classes)


def file_list(data: DataSet, root: Path) -> dict[str, list]:
    """Every image of each split as [path relative to data.dir, size in bytes, class name], in training order.

    What the checkpoints' fingerprint digests (train.make_fingerprint): relative, so the same
    images in a moved folder or under another mount point list alike; with sizes and classes, so a
    replaced or relabelled file does not. The order is the one the batches' shuffle permutes.
    """

    def rows(split: Split) -> list:
        return [
            [Path(os.path.relpath(path, root)).as_posix(), os.path.getsize(path), data.class_names[label]]
            for path, label in zip(split.filepaths, split.labels.tolist(), strict=True)
        ]

    return {"train": rows(data.train), "validation": rows(data.validation)}


def class_folders(split_dir: Path, quiet: bool = False) -> list[str]:
    """The class folders of train/ or validation/, sorted as flow_from_directory sorts them (links followed).

    Hidden folders (a name starting with '.') are not classes: they hold tool
    state such as Jupyter's .ipynb_checkpoints. They are named and skipped.
    """
    folders = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    hidden = [name for name in folders if name.startswith(".")]
    if hidden and not quiet:
        print(f"data: skipping hidden folder(s) in {split_dir}: {', '.join(hidden)} (not classes)", flush=True)
    return [name for name in folders if not name.startswith(".")]


def check_class_names(names: list[str], split_dir: Path) -> None:
    """Refuse a class name with a tab or a line break: labels.txt holds one name a line and
    predict prints tab-separated rows, so such a name would split into two (or shift a column)."""
    bad = [name for name in names if "\t" in name or name.splitlines() != [name]]
    if bad:
        raise DataError(
            f"class folder name(s) in {split_dir} with a tab or line break: {', '.join(map(repr, bad))}; "
            "rename them (class names are written one a line and in tab-separated columns)"
        )


def check_layout(names: list[str], train: Split, validation: Split) -> None:
    """Refuse fewer than two classes, a training class without images, or no validation images."""
    if len(names) < 2:
        raise DataError(f"{train.source} holds {len(names)} class(es); a classifier needs at least 2")
    empty = [n for n, c in zip(names, train.counts(len(names)), strict=True) if c == 0]
    if empty:
        raise DataError(f"class(es) with no images in {train.source}: {', '.join(empty)} ({EXTENSIONS_HINT})")
    if len(validation.filepaths) == 0:
        raise DataError(f"no validation images in {validation.source}")


def check_validation_classes(names: list[str], val_dir: Path) -> None:
    """Refuse a validation class that training does not have: its images would be silently unused."""
    extra = [name for name in class_folders(val_dir) if name not in names]
    check_class_names(extra, val_dir)
    if extra:
        raise DataError(
            f"class folder(s) in {val_dir} that {val_dir.parent / 'train'} does not have: "
            f"{', '.join(extra)}; rename or remove them (the model can only learn classes in train/)"
        )


def warn_missing_validation(names: list[str], validation: Split) -> None:
    """Warn about training classes with no validation images; their accuracy goes unmeasured."""
    missing = [n for n, c in zip(names, validation.counts(len(names)), strict=True) if c == 0]
    if missing:
        print(
            f"warning: no validation images for class(es) {', '.join(missing)} in {validation.source}; "
            "their accuracy is not measured (labels still follow train/'s class order)"
        )


def warn_unindexed_images(folder: Path, names: list[str]) -> None:
    """Name image files in the class folders that training cannot read (.webp, .gif, ...), by extension."""
    counts: dict[str, int] = {}
    for name in names:
        if (folder / name).is_dir():
            for _, _, files in os.walk(folder / name, followlinks=True):
                for file in files:
                    ext = os.path.splitext(file)[1].lower()
                    if ext in UNINDEXED_IMAGE_EXTENSIONS:
                        counts[ext] = counts.get(ext, 0) + 1
    if counts:
        listed = ", ".join(f"{n} {ext}" for ext, n in sorted(counts.items()))
        print(
            f"warning: {sum(counts.values())} image file(s) in {folder} are not used ({listed}): training reads "
            f"{' '.join(INDEXED_EXTENSIONS)}; convert them (e.g. to .png) to train on them",
            flush=True,
        )


def check_link_cycles(top: Path) -> None:
    """Refuse a symbolic link that leads back to a folder above it.

    flow_from_directory walks with os.walk(followlinks=True), which does not
    notice: it descends until the kernel's limit of 40 links per path, listing
    every image once per lap, and two such links make 2**40 laps.
    """
    pending: list[tuple[str, tuple[str, ...]]] = [(str(top), (os.path.realpath(top),))]  # (folder, real paths above)
    while pending:
        folder, above = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue  # unreadable or missing: os.walk skips it too
        for entry in entries:
            if not is_folder(entry):
                continue
            real = os.path.realpath(entry.path)
            if entry.is_symlink() and real in above:
                raise DataError(
                    f"symbolic link {entry.path} -> {real} leads back to a folder above it, "
                    "so its images would be listed over and over; remove the link"
                )
            pending.append((entry.path, above + (real,)))


def is_folder(entry: os.DirEntry) -> bool:
    """A folder, or a link to one; a broken or self-looping link is not (as os.walk sees it)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


class Batches(tf.keras.utils.PyDataset):
    """Batches of one epoch, keyed to (seed, epoch, batch index) only.

    `start_batch` skips the batches a resumed run already trained on, so a run
    continued mid-epoch sees exactly the batches an uninterrupted one would.
    """

    def __init__(
        self,
        split: Split,
        n_classes: int,
        cfg: DataConfig,
        seed: int,
        epoch: int,
        augmenter: ImageDataGenerator | None,
        shuffle: bool,
        start_batch: int = 0,
        class_weights: np.ndarray | None = None,
    ):
        super().__init__(workers=cfg.workers, use_multiprocessing=False, max_queue_size=4)
        self.split, self.n_classes, self.cfg = split, n_classes, cfg
        self.class_weights = class_weights  # per class, given to the loss as sample weights (class_balance.py)
        self.seed, self.epoch, self.augmenter = seed, epoch, augmenter
        n = len(split.filepaths)
        self.order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        self.batches_per_epoch = math.ceil(n / cfg.batch_size)
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __getitem__(self, index: int):
        picks = self.picks(index + self.start_batch)
        if self.class_weights is None:
            return self.arrays(picks)
        return (*self.arrays(picks), self.class_weights[self.split.labels[picks]])

    def arrays(self, picks: np.ndarray):
        """Pixels and one-hot labels of the images `picks` indexes, in that order."""
        x = np.stack([self.load(int(j)) for j in picks])
        y = np.eye(self.n_classes, dtype=np.float32)[self.split.labels[picks]]
        return x, y

    def picks(self, batch: int) -> np.ndarray:
        return self.order[batch * self.cfg.batch_size : (batch + 1) * self.cfg.batch_size]

    def shard(self, batch: int, part: int, parts: int):
        """Part `part` of `parts` of global batch `batch`, as (x, y, sample weights).

        Every part has the same size, so no replica waits on another with an empty
        batch: a short part is padded with a copy of the batch's first image at weight 0.
        The other images weigh 1, or their class's weight when the batches have class weights.
        """
        picks = self.picks(batch)
        size = -(-len(picks) // parts)
        mine = picks[part * size : (part + 1) * size]
        padded = np.concatenate([mine, np.repeat(picks[:1], size - len(mine))]).astype(int)
        x, y = self.arrays(padded)
        w = (np.arange(size) < len(mine)).astype(np.float32)
        if self.class_weights is not None:
            w = w * self.class_weights[self.split.labels[padded]]
        return x.astype(np.float32), y, w.astype(np.float32)

    def load(self, j: int) -> np.ndarray:
        x = load_image(self.split.filepaths[j], self.cfg.image_size, self.cfg.interpolation, self.cfg.max_pixels)
        if self.augmenter is None:
            return x
        key = int(np.random.SeedSequence([self.seed, self.epoch, j]).generate_state(1)[0])
        with _GLOBAL_RNG_LOCK:
            params = self.augmenter.get_random_transform(x.shape, seed=key)
        return self.augmenter.apply_transform(x, params)


def train_batches(
    data: DataSet,
    cfg: DataConfig,
    seed: int,
    epoch: int,
    start_batch: int = 0,
    class_weights: np.ndarray | None = None,
) -> Batches:
    """One epoch's training batches; with `class_weights`, each batch also carries its images' weights."""
    return Batches(
        data.train,
        len(data.class_names),
        cfg,
        seed,
        epoch,
        data.augmenter,
        shuffle=True,
        start_batch=start_batch,
        class_weights=class_weights,
    )


def validation_batches(data: DataSet, cfg: DataConfig) -> Batches:
    return Batches(data.validation, len(data.class_names), cfg, seed=0, epoch=0, augmenter=None, shuffle=False)
