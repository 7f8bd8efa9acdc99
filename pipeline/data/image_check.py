"""The check before training: decode every image once, so a broken file stops the run
in its first seconds instead of killing it hours into an epoch.

Every file read_dataset indexed (train and validation) is decoded in full by
data.decode_image, training's own decoding path, so an image that passes here
trains. Each file gets a verdict: fine, or one reason from REASONS. With
data.on_bad_image=fail the run stops listing every bad file; with skip it
trains without them and lists them in a warning and in bad_images.csv in the
run's output folder.

Verdicts are cached by absolute path, size and modification time in
data.dir/.image_check_cache.json, so a rerun decodes only what changed. The
cache lives with the data, not with the run: Hydra's run folder is named from
the overrides, so every run of a sweep would otherwise decode the whole set
again. data/ is git-ignored and the name is hidden, so the cache is never
committed nor taken for data; a read-only data.dir just means no cache.
"""

from __future__ import annotations

import csv
import json
import os
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import PIL
from PIL import UnidentifiedImageError

from pipeline.atomic_file import write_json
from pipeline.config import DataConfig
from pipeline.data.dataset import DataSet, Split, check_layout, decode_image
from pipeline.errors import DataError, TooManyPixels

EMPTY, TRUNCATED, NOT_AN_IMAGE = "empty", "truncated", "not an image"
UNREADABLE, TOO_MANY_PIXELS, CANNOT_DECODE = "unreadable", "too many pixels", "cannot decode"
REASONS = (EMPTY, TRUNCATED, NOT_AN_IMAGE, UNREADABLE, TOO_MANY_PIXELS, CANNOT_DECODE)
CACHE_NAME = ".image_check_cache.json"
# Bump when decode_image changes what it accepts: every cached verdict is then stale.
CACHE_VERSION = 2
REPORT_NAME = "bad_images.csv"
CHUNK = 32  # files per task: fewer hand-offs between the pool and this thread
PROGRESS_EVERY = 10.0  # seconds between progress lines on a large set


@dataclass(frozen=True)
class Verdict:
    """What decoding one file found. reason None means it decodes; pixels is width x height."""

    reason: str | None = None
    detail: str = ""
    pixels: int = 0


@dataclass
class ScanStats:
    files: int = 0
    decoded: int = 0
    cached: int = 0
    seconds: float = 0.0


def check_images(data: DataSet, cfg: DataConfig, report_dir: Path, cache_path: Path | None = None) -> DataSet:
    """Decode every image before training; stop on bad ones, or drop them with data.on_bad_image=skip.

    cache_path defaults to data.dir/.image_check_cache.json. report_dir (the
    run's output folder) receives bad_images.csv when anything is bad.
    """
    paths = list(dict.fromkeys(data.train.filepaths + data.validation.filepaths))
    cache_path = cache_path or Path(cfg.dir) / CACHE_NAME
    verdicts, stats = scan_images(paths, cfg.max_pixels, cache_path)
    print(
        f"data: checked {stats.files:,} images in {stats.seconds:.1f} s "
        f"({stats.decoded:,} decoded, {stats.cached:,} unchanged since the last check)",
        flush=True,
    )
    bad = {p: v for p, v in verdicts.items() if v.reason}
    if not bad:
        return data
    report = write_report(bad, Path(report_dir))
    listing = "\n".join(f"  {p}: {describe(v)}" for p, v in bad.items())
    where = f" (also listed in {report})" if report else ""
    if cfg.on_bad_image == "fail":
        raise DataError(
            f"{len(bad)} of {len(paths):,} images cannot be used{where}:\n{listing}\n"
            "Fix or remove these files, or rerun with data.on_bad_image=skip to train without them."
        )
    print(
        f"warning: data.on_bad_image=skip: training without {len(bad)} of {len(paths):,} images "
        f"that cannot be used{where}:\n{listing}",
        flush=True,
    )
    return drop_images(data, set(bad))


def describe(verdict: Verdict) -> str:
    """A bad file's reason, with its detail if any (only bad files are listed; one that decodes reads "ok")."""
    reason = verdict.reason or "ok"
    return f"{reason} ({verdict.detail})" if verdict.detail else reason


def scan_images(
    paths: list[str],
    max_pixels: int,
    cache_path: Path | None,
    workers: int | None = None,
    executor: str = "thread",
) -> tuple[dict[str, Verdict], ScanStats]:
    """Verdicts for every path, decoding only files the cache does not vouch for.

    executor is "thread" (why: see make_executor) or "process", for measuring.
    """
    started = time.perf_counter()
    cached = load_cache(cache_path) if cache_path else {}
    stamps = {p: file_stamp(p) for p in paths}
    verdicts = {p: v for p in paths if (v := cached_verdict(cached.get(os.path.abspath(p)), stamps[p], max_pixels))}
    todo = [p for p in paths if p not in verdicts]
    verdicts.update(decode_all(todo, max_pixels, workers, executor))
    if cache_path and (todo or set(cached) != {os.path.abspath(p) for p in paths}):
        save_cache(cache_path, {os.path.abspath(p): cache_entry(verdicts[p], stamps[p]) for p in paths})
    stats = ScanStats(len(paths), len(todo), len(paths) - len(todo), time.perf_counter() - started)
    return {p: verdicts[p] for p in paths}, stats


def decode_all(paths: list[str], max_pixels: int, workers: int | None, executor: str) -> dict[str, Verdict]:
    """Decode paths in parallel, printing progress now and then on a large set."""
    workers = workers or os.cpu_count() or 1
    chunks = [paths[i : i + CHUNK] for i in range(0, len(paths), CHUNK)]
    if workers == 1 or len(chunks) <= 1:
        return dict(zip(paths, check_files(paths, max_pixels), strict=True))
    results: dict[str, Verdict] = {}
    last_note = time.perf_counter()
    with make_executor(executor, workers) as pool:
        for chunk, verdicts in zip(chunks, pool.map(check_files, chunks, [max_pixels] * len(chunks)), strict=True):
            results.update(zip(chunk, verdicts, strict=True))
            if time.perf_counter() - last_note > PROGRESS_EVERY:
                print(f"data: checking images: {len(results):,}/{len(paths):,}", flush=True)
                last_note = time.perf_counter()
    return results


def make_executor(kind: str, workers: int) -> Executor:
    # Threads: Pillow releases the GIL while it decodes, so threads keep every core busy
    # (faster than processes in `make bench --only check`; docs/speed.md), with nothing to
    # pickle and no fork of a process that holds TensorFlow's threads.
    if kind == "thread":
        return ThreadPoolExecutor(workers)
    # fork: a spawned worker would import TensorFlow again (via data.py) before its first file.
    return ProcessPoolExecutor(workers, mp_context=get_context("fork"))


def check_files(paths: list[str], max_pixels: int) -> list[Verdict]:
    return [check_file(p, max_pixels) for p in paths]


def check_file(path: str, max_pixels: int) -> Verdict:
    """Decode one file the way training will, and say what, if anything, is wrong with it."""
    try:
        if os.path.getsize(path) == 0:
            return Verdict(EMPTY)
        image = decode_image(path, max_pixels)
    except TooManyPixels as err:
        return Verdict(TOO_MANY_PIXELS, str(err), err.pixels)
    except UnidentifiedImageError:
        return Verdict(NOT_AN_IMAGE)
    except OSError as err:
        if err.errno is not None:  # the operating system refused: permissions, a folder, a broken link
            return Verdict(UNREADABLE, err.strerror or str(err))
        if "truncated" in str(err).lower():  # "image file is truncated", "Truncated File Read"
            return Verdict(TRUNCATED)
        return Verdict(CANNOT_DECODE, str(err))
    except Exception as err:  # Pillow raises many types for a corrupt stream or an unsupported mode
        return Verdict(CANNOT_DECODE, f"{type(err).__name__}: {err}")
    return Verdict(None, pixels=image.width * image.height)


def file_stamp(path: str) -> list[int] | None:
    """[size, mtime_ns]: what must not change for a cached verdict to hold; None if stat fails."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def cached_verdict(entry: dict | None, stamp: list[int] | None, max_pixels: int) -> Verdict | None:
    """The cached verdict if the file is unchanged and data.max_pixels cannot change it; else None."""
    if not entry or stamp is None or entry.get("stamp") != stamp:
        return None
    verdict = Verdict(entry.get("reason"), entry.get("detail", ""), entry.get("pixels", 0))
    if verdict.reason is None and verdict.pixels > max_pixels:
        return Verdict(
            TOO_MANY_PIXELS, f"{verdict.pixels:,} pixels, more than data.max_pixels={max_pixels:,}", verdict.pixels
        )
    if verdict.reason == TOO_MANY_PIXELS and verdict.pixels <= max_pixels:
        return None  # the limit was raised: this one has never been decoded
    return verdict


def cache_entry(verdict: Verdict, stamp: list[int] | None) -> dict | None:
    # Permissions can change without touching size or mtime, so "unreadable" is always re-checked.
    if stamp is None or verdict.reason == UNREADABLE:
        return None
    return {"stamp": stamp, "reason": verdict.reason, "detail": verdict.detail, "pixels": verdict.pixels}


def load_cache(cache_path: Path) -> dict:
    """Cached entries by absolute path; empty if missing, unreadable, or from another version."""
    try:
        saved = json.loads(Path(cache_path).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(saved, dict) or saved.get("version") != [CACHE_VERSION, PIL.__version__]:
        return {}
    return saved.get("entries") or {}


def save_cache(cache_path: Path, entries: dict) -> None:
    """Write the cache atomically (a killed run leaves the old one whole).

    A folder we may not write to just goes without a cache.
    """
    body = {"version": [CACHE_VERSION, PIL.__version__], "entries": {p: e for p, e in entries.items() if e is not None}}
    try:
        write_json(Path(cache_path), body, indent=None)  # one line: a large set's cache stays small
    except OSError as err:
        print(f"note: image check results not cached: cannot write in {Path(cache_path).parent} ({err.strerror})")


def write_report(bad: dict[str, Verdict], report_dir: Path) -> Path | None:
    """bad_images.csv (path, reason, detail) in the run's output folder; None if it cannot be written."""
    report = report_dir / REPORT_NAME
    try:
        report_dir.mkdir(parents=True, exist_ok=True)
        with open(report, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "reason", "detail"])
            writer.writerows([p, v.reason, v.detail] for p, v in bad.items())
    except OSError as err:
        print(f"warning: could not write {report}: {err}")
        return None
    return report


def drop_images(data: DataSet, drop: set[str]) -> DataSet:
    """The data set without `drop`; refuses if that leaves a training class empty."""

    def keep(split: Split) -> Split:
        mask = np.array([p not in drop for p in split.filepaths], dtype=bool)
        kept_paths = [p for p, k in zip(split.filepaths, mask, strict=True) if k]
        return replace(split, filepaths=kept_paths, labels=split.labels[mask])

    kept = replace(data, train=keep(data.train), validation=keep(data.validation))
    n = len(data.class_names)
    check_layout(kept.class_names, kept.train, kept.validation)
    emptied = [
        name
        for name, before, after in zip(
            data.class_names, data.validation.counts(n), kept.validation.counts(n), strict=True
        )
        if before and not after
    ]
    if emptied:
        print(
            f"warning: skipping left no validation images for class(es) {', '.join(emptied)}; "
            "their accuracy is not measured"
        )
    return kept
