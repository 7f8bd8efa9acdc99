"""How fast the image check decodes (`python -m pipeline.bench --only check`): a cold check over fresh JPEGs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.image_check import ScanStats, scan_images


def write_bench_images(folder: Path, count: int, width: int, height: int) -> list[str]:
    """`count` width x height JPEGs: smooth gradients plus sensor-like noise at quality 90,
    which decode at about the speed of photos of the same size."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    paths = []
    for i in range(count):
        pixels = ramp * rng.random(3, dtype=np.float32) + rng.normal(0, 8, (height, width, 3))
        path = os.path.join(folder, f"{i:05d}.jpg")
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def measure_check_speed(
    count: int = 1000, width: int = 160, height: int = 160, executor: str = "thread", workers: int | None = None
) -> ScanStats:
    """A cold check (no cache) of `count` fresh images; its rate is stats.decoded / stats.seconds.

    Raises if any image fails the check: the rate would then time the error path, not decoding.
    """
    with tempfile.TemporaryDirectory(prefix="image-check-bench-") as tmp:
        paths = write_bench_images(Path(tmp), count, width, height)
        # The limit is the pictures' own size: none counts as broken, and the speed does not depend on it.
        verdicts, stats = scan_images(paths, width * height, None, workers, executor)
    failed = [f"{p}: {v.reason}" for p, v in verdicts.items() if v.reason]
    if failed:
        raise RuntimeError(f"bench images failed the check, so no rate is measured: {failed[:3]}")
    return stats


def report_check_speed() -> None:
    """Print the check's speed with threads and with processes."""
    cores = os.cpu_count() or 1
    for width, height in ((160, 160), (500, 375)):
        for executor, workers in (("thread", 1), ("thread", cores), ("process", cores)):
            stats = measure_check_speed(1000, width, height, executor, workers)
            rate = stats.decoded / stats.seconds
            print(f"image check, {width}x{height} JPEG, {executor} pool of {workers}: {rate:,.0f} images/s", flush=True)
