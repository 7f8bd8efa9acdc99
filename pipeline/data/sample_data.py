"""Write a small, learnable image-classification data set, so a fresh clone trains with no download.

Each image is one filled shape (circle, square or triangle) on a textured
background. Like real photo classes (roses are mostly red, sunflowers yellow),
each class has a typical hue for its shape, varied in hue, saturation and
brightness; position, scale, rotation and background are drawn independently
of the class. Why the colour cue: a randomly initialised InceptionV3 (the
offline case, model.weights=null) learns shape alone too slowly to show anything
in a few epochs, and learns the set well with the hue cue (docs/data.md), so the
out-of-the-box run shows a model that learns within minutes on a CPU. Every
shape covers the same area for a given scale, so pixel counts give nothing away.
The same seed always gives byte-identical files.

    python -m pipeline.sample_data [DIR] [--seed N]
"""

from __future__ import annotations

import argparse
import colorsys
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Class name -> number of polygon sides. A 96-gon is a circle to within 0.1 px at these
# sizes, and drawing every class as a regular polygon keeps one code path for all three.
SIDES = {"circle": 96, "square": 4, "triangle": 3}
# Class name -> typical hue of its shape (0..1 around the colour wheel: red, green, blue).
CLASS_HUES = {"circle": 0.0, "square": 0.33, "triangle": 0.62}
HUE_JITTER = 0.08  # +- this much around the class hue (0.08 of the wheel is about 29 degrees)
SATURATION_RANGE = (0.45, 1.0)
VALUE_RANGE = (0.45, 1.0)
CLASS_NAMES = tuple(SIDES)
# A split's position here goes into each image's seed, so train and validation are different draws.
SPLITS = ("train", "validation")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".gif", ".webp"})

SHAPE_SIZE_RANGE = (0.25, 0.65)  # diameter of the equal-area circle, as a fraction of the image side
EDGE_MARGIN = 0.03  # fraction of the image side kept clear between the shape and the border
MIN_LUMA_GAP = 0.25  # least luma difference (0..1) between the shape and both background colours
TEXTURE_CELLS = (2, 6)  # inclusive range of the noise grid side; fewer cells give smoother blotches
STRIPE_CYCLES = (2.0, 8.0)  # stripes per image side
NOISE_WEIGHT = (0.3, 0.7)  # share of the low-frequency noise in the texture; the rest is gradient or stripes
SENSOR_NOISE = 3.0  # standard deviation of per-pixel grey noise, in 0..255 levels
SUPERSAMPLE = 2  # shapes are drawn this many times larger and shrunk, to anti-alias their edges
JPEG_QUALITY = (80, 95)  # inclusive range
# A run that is killed leaves its partial set under this hidden name, never as train/ or validation/.
STAGING_PREFIX = ".sample-data-partial-"


def write_sample_data(
    root: Path,
    seed: int = 0,
    train_per_class: int = 150,
    validation_per_class: int = 40,
    image_size: int = 160,
) -> dict:
    """Write `root/train/<class>/*.jpg` and `root/validation/<class>/*.jpg`; return counts per split and class.

    Both splits are written into a hidden staging folder inside `root` and renamed into
    place only when complete, so a killed run never leaves a set that looks finished.
    Raises FileExistsError, before drawing anything, if either split already holds files.
    """
    check_arguments(seed, train_per_class, validation_per_class, image_size)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        refuse_existing_split(root / split)
    per_class = {"train": train_per_class, "validation": validation_per_class}
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root))
    try:
        counts = {
            split: write_split(staging / split, seed, split_index, per_class[split], image_size)
            for split_index, split in enumerate(SPLITS)
        }
        move_splits_into_place(staging, root)
    finally:
        # Empty after a success; after a failure this drops the partial images.
        shutil.rmtree(staging, ignore_errors=True)
    return counts


def check_arguments(seed: int, train_per_class: int, validation_per_class: int, image_size: int) -> None:
    """Raise ValueError naming the first argument that cannot give a usable data set."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0 (numpy seeds are non-negative), got {seed}")
    for name, value in (("train_per_class", train_per_class), ("validation_per_class", validation_per_class)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 pixels for a shape to be recognisable, got {image_size}")


def refuse_existing_split(folder: Path) -> None:
    """Raise FileExistsError unless `folder` is absent or an empty real folder: existing data is never touched."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise FileExistsError(f"{folder} already exists and is not a plain folder; move it away to write sample data")
    if folder.is_dir() and any(folder.iterdir()):
        raise FileExistsError(
            f"{folder} already holds files; sample data never overwrites them. "
            "Move or delete that folder, or write the sample data somewhere else."
        )


def move_splits_into_place(staging: Path, root: Path) -> None:
    """Rename each finished split from `staging` into `root`, undoing earlier renames if a later one fails."""
    moved = []
    try:
        for split in SPLITS:
            refuse_existing_split(root / split)  # again: something may have appeared while we drew
            # POSIX rename replaces an empty folder and refuses a non-empty one, so no data is lost.
            os.replace(staging / split, root / split)
            moved.append(split)
    except BaseException:
        # A train/ without its validation/ would look like a data set; hand it back to be discarded.
        for split in moved:
            os.replace(root / split, staging / split)
        raise


def write_split(folder: Path, seed: int, split_index: int, per_class: int, image_size: int) -> dict:
    """Write `per_class` JPEGs for each class under `folder`; return the count per class."""
    counts = {}
    for class_index, class_name in enumerate(CLASS_NAMES):
        class_folder = folder / class_name
        class_folder.mkdir(parents=True)
        for image_index in range(per_class):
            # One generator per image: any image can be redrawn alone, and no global state leaks in.
            rng = np.random.default_rng([seed, split_index, class_index, image_index])
            image = draw_image(rng, class_name, image_size)
            quality = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1], endpoint=True))
            image.save(class_folder / f"{class_name}_{image_index:04d}.jpg", "JPEG", quality=quality)
        counts[class_name] = per_class
    return counts


def draw_image(rng: np.random.Generator, class_name: str, size: int) -> Image.Image:
    """Draw one RGB image: a filled shape of `class_name` over a textured background, with mild noise."""
    shape_colour, background_colours = pick_colours(rng, class_name)
    texture = make_texture(rng, size)[..., None]
    background = background_colours[0] + texture * (background_colours[1] - background_colours[0])
    coverage = render_coverage(make_polygon(rng, SIDES[class_name], size), size)[..., None]
    pixels = background + coverage * (shape_colour - background)
    # Grey noise, one draw per pixel: a third of the cost of colour noise, and JPEG's
    # chroma subsampling would blur most colour noise away anyway.
    pixels = pixels * 255 + rng.standard_normal((size, size, 1), dtype=np.float32) * SENSOR_NOISE
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def pick_colours(rng: np.random.Generator, class_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Return a shape colour near the class hue and two background colours on the same side of it in luma.

    Both background colours are at least MIN_LUMA_GAP darker (for a light shape) or
    lighter (for a dark shape), so every blend of them in the texture stays visibly
    apart from the shape, while hues stay free.
    """
    hue = (CLASS_HUES[class_name] + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 1.0
    shape_colour = np.array(
        colorsys.hsv_to_rgb(hue, rng.uniform(*SATURATION_RANGE), rng.uniform(*VALUE_RANGE)), dtype=np.float32
    )
    background_colours = rng.random((2, 3), dtype=np.float32)
    shape_luma = np.float32(luma(shape_colour))  # one colour's luma is a scalar; float32 like the pixels
    if shape_luma >= 0.5:
        background_colours = darken_to(background_colours, shape_luma - MIN_LUMA_GAP)
    else:
        background_colours = lighten_to(background_colours, shape_luma + MIN_LUMA_GAP)
    return shape_colour, background_colours


def luma(colours: np.ndarray) -> np.ndarray:
    """Return the Rec. 601 luma (0..1) of RGB colours in 0..1, along the last axis."""
    return colours @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def darken_to(colours: np.ndarray, max_luma: float | np.floating) -> np.ndarray:
    """Scale each too-bright colour towards black until its luma is `max_luma`; keep the others."""
    current = luma(colours)[..., None]
    return np.where(current > max_luma, colours * (max_luma / np.maximum(current, 1e-6)), colours)


def lighten_to(colours: np.ndarray, min_luma: float | np.floating) -> np.ndarray:
    """Move each too-dark colour towards white until its luma is `min_luma`; keep the others."""
    return 1 - darken_to(1 - colours, 1 - min_luma)  # luma weights sum to 1, so this mirrors darken_to


def make_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Return a size x size field in 0..1: low-frequency noise blended with a gradient or stripes."""
    cells = int(rng.integers(TEXTURE_CELLS[0], TEXTURE_CELLS[1], endpoint=True))
    grid = Image.fromarray(rng.random((cells, cells), dtype=np.float32))
    noise = np.clip(np.asarray(grid.resize((size, size), Image.Resampling.BICUBIC)), 0, 1)
    angle, phase = rng.uniform(0, 2 * np.pi, size=2)
    cycles = rng.uniform(*STRIPE_CYCLES)
    use_stripes = rng.random() < 0.5
    weight = rng.uniform(*NOISE_WEIGHT)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    along = x * np.cos(angle) + y * np.sin(angle)
    if use_stripes:
        pattern = 0.5 + 0.5 * np.sin(2 * np.pi * cycles * along + phase)
    else:
        pattern = (along - along.min()) / np.ptp(along)
    return (weight * noise + (1 - weight) * pattern).astype(np.float32)


def make_polygon(rng: np.random.Generator, sides: int, size: int) -> np.ndarray:
    """Return the (sides, 2) vertices of a randomly scaled, rotated and placed regular polygon.

    The scale sets the diameter of the circle of equal area, so a circle, square and
    triangle of the same scale cover the same number of pixels.
    """
    radius = rng.uniform(*SHAPE_SIZE_RANGE) * size / 2
    circumradius = radius * np.sqrt(2 * np.pi / (sides * np.sin(2 * np.pi / sides)))
    # Rotating by a full 2*pi/sides already covers every distinct pose of the polygon.
    angles = rng.uniform(0, 2 * np.pi / sides) + np.arange(sides) * 2 * np.pi / sides
    points = circumradius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    lowest = size * EDGE_MARGIN - points.min(axis=0)
    highest = size * (1 - EDGE_MARGIN) - points.max(axis=0)
    # SHAPE_SIZE_RANGE keeps even the widest triangle inside, so highest >= lowest; max() guards anyway.
    return points + rng.uniform(lowest, np.maximum(lowest, highest))


def render_coverage(points: np.ndarray, size: int) -> np.ndarray:
    """Return a size x size array in 0..1 of how much of each pixel the polygon covers (anti-aliased)."""
    big = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    ImageDraw.Draw(big).polygon([tuple(point) for point in points * SUPERSAMPLE], fill=255)
    small = big.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255


def has_images(root: Path) -> bool:
    """Say whether the folder tree under `root` holds any image file (by extension, any case).

    Follows symlinks but visits each real folder once, so a link cycle cannot loop forever;
    unreadable folders and broken links count as empty. Hidden folders (name starting
    with '.') are skipped: they hold tool state such as .git, .ipynb_checkpoints or the
    partial set of a killed sample-data run, not data.
    """
    pending = [Path(root)]
    visited = set()
    while pending:
        folder = pending.pop()
        try:
            status = folder.stat()
            if (status.st_dev, status.st_ino) in visited:
                continue
            visited.add((status.st_dev, status.st_ino))
            with os.scandir(folder) as scan:
                entries = list(scan)
        except OSError:
            continue
        for entry in entries:
            if entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                return True
            if entry.is_dir() and not entry.name.startswith("."):
                pending.append(Path(entry.path))
    return False


def describe_counts(root: Path, counts: dict) -> str:
    """Return one line saying how many images went where, per split and class."""
    total = sum(sum(per_class.values()) for per_class in counts.values())
    splits = ", ".join(
        f"{split} {sum(per_class.values())} ({', '.join(f'{name} {n}' for name, n in per_class.items())})"
        for split, per_class in counts.items()
    )
    return f"wrote {total} images to {root}: {splits}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line: an optional target folder and a seed."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.sample_data",
        description="Write a small shapes data set (circle, square, triangle) for training with no download.",
    )
    parser.add_argument(
        "directory",
        nargs="?",
        type=Path,
        default=Path("data"),
        help="folder to hold train/ and validation/ (default: data)",
    )
    parser.add_argument("--seed", type=int, default=0, help="the same seed writes byte-identical files (default: 0)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Write the default sample set into the folder given on the command line; return the exit code."""
    args = parse_args(argv)
    try:
        counts = write_sample_data(args.directory, seed=args.seed)
    except (FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(describe_counts(args.directory, counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
