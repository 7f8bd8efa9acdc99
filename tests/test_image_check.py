"""The check before training: every broken file found at once, odd but valid images used, verdicts cached.

Every case is generated here (no binary fixtures in git): the bad files by
cutting, emptying or faking real images, the odd ones by saving Pillow images
in unusual modes, sizes and names.
"""

from __future__ import annotations

import builtins
import csv
import errno
import json
import os
import shutil

import numpy as np
import pytest
from conftest import data_config, from_conf, run_args, run_cli
from PIL import Image, ImageFile

from pipeline.bench.check_speed import measure_check_speed
from pipeline.data.dataset import decode_image, load_image, read_dataset
from pipeline.data.image_check import (
    CACHE_NAME,
    REPORT_NAME,
    check_file,
    check_images,
    describe,
    scan_images,
)
from pipeline.errors import DataError

DEFAULTS = from_conf("data")
MAX_PIXELS = DEFAULTS.max_pixels
BOMB_LIMIT = 90_000  # max_pixels in the tests: the bomb has more, every other image fewer
EXIF_ORIENTATION = 0x0112


def photo(width=64, height=48, mode="RGB") -> Image.Image:
    """A small picture with structure (a gradient), so truncating its file loses real data."""
    ramp = np.linspace(0, 255, width * height * 3).reshape(height, width, 3)
    noise = np.random.default_rng(0).normal(0, 20, ramp.shape)
    return Image.fromarray(np.clip(ramp + noise, 0, 255).astype(np.uint8)).convert(mode)


# --- the fixture generator: bad files ------------------------------------------------------------


def write_truncated_jpeg(path):
    photo(256, 256).save(path, "JPEG", quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_truncated_png(path):
    photo(256, 256).save(path, "PNG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_jpeg_header_only(path):
    # cut inside the headers: Pillow says "Truncated File Read", not "image file is truncated"
    photo(256, 256).save(path, "JPEG", quality=95)
    path.write_bytes(path.read_bytes()[:500])


def write_empty(path):
    path.write_bytes(b"")


def write_text_as_jpeg(path):
    path.write_text("these are my holiday notes, not a picture\n")


def write_bomb(path):
    Image.new("RGB", (400, 250)).save(path, "PNG")  # 100,000 pixels: a bomb against BOMB_LIMIT


BAD_CASES = {
    "truncated.jpg": (write_truncated_jpeg, "truncated"),
    "truncated.png": (write_truncated_png, "truncated"),
    "header_only.jpg": (write_jpeg_header_only, "truncated"),
    "empty.jpg": (write_empty, "empty"),
    "notes_renamed.jpg": (write_text_as_jpeg, "not an image"),
    "bomb.png": (write_bomb, "too many pixels"),
}


def write_bad_files(folder) -> dict:
    """Every kind of bad file in `folder`; returns {path: expected reason}."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, (write, reason) in BAD_CASES.items():
        write(folder / name)
        expected[str(folder / name)] = reason
    return expected


# --- the fixture generator: odd but valid images -------------------------------------------------


def sixteen_bit_gradient() -> Image.Image:
    levels = np.linspace(0, 65535, 64 * 32).reshape(32, 64).astype(np.uint16)
    return Image.fromarray(levels)  # mode I;16


def half_transparent() -> Image.Image:
    """Left half opaque red, right half fully transparent *black*: the hidden colour must not show."""
    rgba = np.zeros((32, 64, 4), np.uint8)
    rgba[:, :32] = (255, 0, 0, 255)
    return Image.fromarray(rgba, "RGBA")


def exif_rotated() -> Image.Image:
    """Stored 40 wide x 20 high, left half black; orientation 6 says 'turn 90 degrees clockwise to view'."""
    img = Image.new("RGB", (40, 20))
    img.paste((255, 255, 255), (20, 0, 40, 20))
    return img


def palette_image() -> Image.Image:
    return photo(32, 32).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)


ODD_CASES = {  # file name -> (image, save options)
    "cmyk.jpg": (lambda: Image.new("CMYK", (32, 32), (0, 255, 255, 0)), {}),  # pure red in CMYK
    "grey.jpg": (lambda: photo(mode="L"), {}),
    "palette.png": (palette_image, {}),
    "alpha.png": (half_transparent, {}),
    "grey_alpha.png": (lambda: photo(mode="LA"), {}),
    "sixteen_bit.png": (sixteen_bit_gradient, {}),
    "one_pixel.png": (lambda: Image.new("RGB", (1, 1), (10, 200, 30)), {}),
    "very_long.jpg": (lambda: photo(4000, 20), {}),
    "with spaces.jpeg": (photo, {}),
    "貓 photo.JPG": (photo, {}),
    "UPPER.PNG": (photo, {}),
    "rotated.jpg": (exif_rotated, {"exif_orientation": 6}),
}
IGNORED_NAMES = ("notes.txt", ".DS_Store", "labels.csv")


def write_odd_images(folder) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (make, options) in ODD_CASES.items():
        img, path = make(), folder / name
        if "exif_orientation" in options:
            exif = img.getexif()
            exif[EXIF_ORIENTATION] = options["exif_orientation"]
            img.save(path, exif=exif, quality=95)
        else:
            img.save(path, **({"quality": 95} if path.suffix.lower() in (".jpg", ".jpeg") else {}))
        paths.append(path)
    return paths


def write_ignored(folder):
    for name in IGNORED_NAMES:
        (folder / name).write_text("not an image, and not named like one\n")


def make_data(root, bad_in=None, odd_in=None, per_class=3):
    """train/ and validation/ with classes a, b: plain photos, plus bad or odd files where asked."""
    for split in ("train", "validation"):
        for cls in ("a", "b"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                photo().save(folder / f"{i}.jpg")
    expected = write_bad_files(root / bad_in) if bad_in else {}
    odd = write_odd_images(root / odd_in) if odd_in else []
    return expected, odd


# --- bad files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BAD_CASES)
def test_each_bad_file_gets_its_reason(tmp_path, name):
    write, reason = BAD_CASES[name]
    write(tmp_path / name)
    assert check_file(str(tmp_path / name), BOMB_LIMIT).reason == reason


def test_too_many_pixels_names_the_size_and_the_limit(tmp_path):
    write_bomb(tmp_path / "bomb.png")
    verdict = check_file(str(tmp_path / "bomb.png"), BOMB_LIMIT)
    assert describe(verdict) == "too many pixels (400x250 = 100,000 pixels, more than data.max_pixels=90,000)"
    assert check_file(str(tmp_path / "bomb.png"), 100_000).reason is None


def test_an_unreadable_file_is_reported_as_unreadable(tmp_path, monkeypatch):
    path = tmp_path / "locked.jpg"
    photo().save(path)
    path.chmod(0)
    try:
        path.open("rb").close()
        root_reads_anyway = True  # root ignores permissions: refuse the open the way the OS would
    except PermissionError:
        root_reads_anyway = False
    if root_reads_anyway:
        real_open = builtins.open

        def refusing_open(file, *args, **kwargs):
            if os.fspath(file) == str(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", refusing_open)
    assert describe(check_file(str(path), MAX_PIXELS)) == "unreadable (Permission denied)"


def test_a_folder_or_a_broken_link_named_like_an_image_is_unreadable(tmp_path):
    (tmp_path / "x.jpg").mkdir()
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    assert describe(check_file(str(tmp_path / "x.jpg"), MAX_PIXELS)) == "unreadable (Is a directory)"
    assert describe(check_file(str(tmp_path / "gone.jpg"), MAX_PIXELS)) == "unreadable (No such file or directory)"


def test_truncated_images_are_never_loaded_half_grey():
    # Keras or a library imported with it must not have switched on Pillow's tolerance.
    import pipeline.train  # noqa: F401  (everything a run imports)

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_fail_lists_every_bad_file_and_says_how_to_go_on(tmp_path):
    expected, _ = make_data(tmp_path / "d", bad_in="train/a")
    data = read_dataset(data_config(tmp_path / "d", max_pixels=BOMB_LIMIT))
    with pytest.raises(DataError) as caught:
        check_images(data, data_config(tmp_path / "d", max_pixels=BOMB_LIMIT), tmp_path / "run")
    message = str(caught.value)
    total = len(data.train.filepaths) + len(data.validation.filepaths)
    assert message.startswith(f"{len(expected)} of {total} images cannot be used")
    listed = [line for line in message.splitlines() if line.startswith("  ")]
    assert len(listed) == len(expected)
    for path, reason in expected.items():
        assert any(line.startswith(f"  {path}: {reason}") for line in listed), path
    assert "data.on_bad_image=skip" in message and "Fix or remove" in message
    assert str(tmp_path / "run" / REPORT_NAME) in message


def test_skip_trains_without_them_and_reports_them(tmp_path, capsys):
    expected, _ = make_data(tmp_path / "d", bad_in="validation/b")
    cfg = data_config(tmp_path / "d", max_pixels=BOMB_LIMIT, on_bad_image="skip")
    indexed = read_dataset(cfg)
    total = len(indexed.train.filepaths) + len(indexed.validation.filepaths)
    data = check_images(indexed, cfg, tmp_path / "run")
    assert not set(data.validation.filepaths) & set(expected)
    assert data.train.counts(2) == [3, 3] and data.validation.counts(2) == [3, 3]
    for split in (data.train, data.validation):  # labels still match the files they belong to
        assert [f"/{data.class_names[y]}/" in p for p, y in zip(split.filepaths, split.labels, strict=True)] == [
            True
        ] * len(split.labels)
    out = capsys.readouterr().out
    assert f"warning: data.on_bad_image=skip: training without {len(expected)} of {total} images" in out
    assert all(f"  {path}: {reason}" in out for path, reason in expected.items())
    with open(tmp_path / "run" / REPORT_NAME, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {r["path"]: r["reason"] for r in rows} == expected


def test_skip_that_empties_a_class_names_it(tmp_path):
    make_data(tmp_path / "d")
    for path in (tmp_path / "d" / "train" / "b").iterdir():
        path.write_bytes(b"")
    cfg = data_config(tmp_path / "d", on_bad_image="skip")
    with pytest.raises(DataError, match=r"no images in .*train: b"):
        check_images(read_dataset(cfg), cfg, tmp_path / "run")


# --- odd but valid images ------------------------------------------------------------------------


def test_odd_but_valid_images_and_names_are_used(tmp_path, capsys):
    _, odd = make_data(tmp_path / "d", odd_in="train/a")
    write_ignored(tmp_path / "d" / "train" / "a")
    write_ignored(tmp_path / "d" / "validation" / "b")
    cfg = data_config(tmp_path / "d")
    data = check_images(read_dataset(cfg), cfg, tmp_path / "run")
    assert set(map(str, odd)) <= set(data.train.filepaths)
    assert data.train.counts(2) == [3 + len(ODD_CASES), 3]
    assert not any(os.path.basename(p) in IGNORED_NAMES for p in data.train.filepaths + data.validation.filepaths)
    assert not (tmp_path / "run" / REPORT_NAME).exists()
    for path in odd:
        x = load_image(str(path), 75, DEFAULTS.interpolation, MAX_PIXELS)
        assert x.shape == (75, 75, 3) and x.dtype == np.float32, path.name


def test_sixteen_bit_greyscale_is_scaled_not_clipped_to_white(tmp_path):
    sixteen_bit_gradient().save(tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode == "I;16"
    x = load_image(str(tmp_path / "g.png"), 75, DEFAULTS.interpolation, MAX_PIXELS)
    assert x.min() < 10 and x.max() > 245 and (x < 255).mean() > 0.9
    assert np.all(np.diff(x[:, :, 0].mean(axis=0)) >= 0)  # still a left-to-right ramp


def test_transparency_is_composited_onto_white(tmp_path):
    half_transparent().save(tmp_path / "a.png")
    x = np.asarray(decode_image(str(tmp_path / "a.png"), MAX_PIXELS))
    assert x[:, :32].tolist() == [[[255, 0, 0]] * 32] * 32  # opaque half unchanged
    assert (x[:, 32:] == 255).all()  # transparent half white, not the black it stored
    palette = Image.new("P", (4, 4))
    palette.putpalette([0, 0, 0] * 256)
    palette.save(tmp_path / "p.png", transparency=0)
    assert (np.asarray(decode_image(str(tmp_path / "p.png"), MAX_PIXELS)) == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    write_odd_images(tmp_path)
    img = decode_image(str(tmp_path / "rotated.jpg"), MAX_PIXELS)
    # Stored 40x20 with its left half black; shown upright it is 20x40 with the black half on top.
    assert img.size == (20, 40)
    grey = np.asarray(img.convert("L"), dtype=float)
    assert grey[:15].mean() < 30 and grey[-15:].mean() > 225


def test_cmyk_greyscale_and_palette_become_the_right_rgb(tmp_path):
    write_odd_images(tmp_path)
    red = np.asarray(decode_image(str(tmp_path / "cmyk.jpg"), MAX_PIXELS), dtype=int)
    assert red[..., 0].min() > 200 and red[..., 1:].max() < 60
    grey = np.asarray(decode_image(str(tmp_path / "grey.jpg"), MAX_PIXELS))
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    assert decode_image(str(tmp_path / "palette.png"), MAX_PIXELS).mode == "RGB"


# --- the cache -----------------------------------------------------------------------------------


def test_a_rerun_decodes_only_what_changed(tmp_path):
    make_data(tmp_path / "d", bad_in="train/b")
    paths = sorted(str(p) for p in (tmp_path / "d").rglob("*.*"))
    cache = tmp_path / "d" / CACHE_NAME
    first, stats = scan_images(paths, BOMB_LIMIT, cache)
    assert (stats.decoded, stats.cached) == (len(paths), 0) and cache.is_file()
    again, stats = scan_images(paths, BOMB_LIMIT, cache)
    assert (stats.decoded, stats.cached) == (0, len(paths)) and again == first
    touched = tmp_path / "d" / "train" / "a" / "0.jpg"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 1_000_000))
    _, stats = scan_images(paths, BOMB_LIMIT, cache)
    assert stats.decoded == 1
    # a file replaced by a broken one of the same name is caught
    write_empty(touched)
    verdicts, stats = scan_images(paths, BOMB_LIMIT, cache)
    assert stats.decoded == 1 and verdicts[str(touched)].reason == "empty"
    assert not list((tmp_path / "d").glob(CACHE_NAME + ".*"))  # no temp files left behind


def test_changing_max_pixels_decodes_only_images_never_decoded(tmp_path):
    write_bomb(tmp_path / "big.png")
    paths = [str(tmp_path / "big.png")]
    scan_images(paths, MAX_PIXELS, tmp_path / "c.json")
    verdicts, stats = scan_images(paths, BOMB_LIMIT, tmp_path / "c.json")  # lowered: the cached size decides
    assert stats.decoded == 0 and verdicts[paths[0]].reason == "too many pixels"
    verdicts, stats = scan_images(paths, MAX_PIXELS, tmp_path / "c.json")  # raised back: it decoded before
    assert stats.decoded == 0 and verdicts[paths[0]].reason is None
    # refused from its header, never decoded: raising the limit must decode it now
    scan_images(paths, BOMB_LIMIT, tmp_path / "fresh.json")
    verdicts, stats = scan_images(paths, MAX_PIXELS, tmp_path / "fresh.json")
    assert stats.decoded == 1 and verdicts[paths[0]].reason is None


def test_a_broken_stale_or_unwritable_cache_is_no_error(tmp_path, capsys):
    photo().save(tmp_path / "p.jpg")
    paths = [str(tmp_path / "p.jpg")]
    (tmp_path / "bad.json").write_text("{not json")
    assert scan_images(paths, MAX_PIXELS, tmp_path / "bad.json")[1].decoded == 1
    (tmp_path / "old.json").write_text(
        json.dumps({"version": [0, "1.0"], "entries": {paths[0]: {"stamp": [0, 0], "reason": "empty"}}})
    )
    verdicts, stats = scan_images(paths, MAX_PIXELS, tmp_path / "old.json")
    assert stats.decoded == 1 and verdicts[paths[0]].reason is None
    # a read-only data.dir stands for any folder we cannot write in
    verdicts, _ = scan_images(paths, MAX_PIXELS, tmp_path / "no_such_folder" / CACHE_NAME)
    assert verdicts[paths[0]].reason is None and "not cached" in capsys.readouterr().out


def test_unreadable_is_never_cached(tmp_path):
    (tmp_path / "x.jpg").mkdir()
    scan_images([str(tmp_path / "x.jpg")], MAX_PIXELS, tmp_path / "c.json")
    assert scan_images([str(tmp_path / "x.jpg")], MAX_PIXELS, tmp_path / "c.json")[1].decoded == 1


# --- in parallel ---------------------------------------------------------------------------------


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_parallel_scans_agree_with_one_file_at_a_time(tmp_path, executor):
    expected, odd = make_data(tmp_path / "d", bad_in="train/a", odd_in="train/b", per_class=20)
    paths = sorted(str(p) for p in (tmp_path / "d").rglob("*") if p.is_file())
    verdicts, stats = scan_images(paths, BOMB_LIMIT, None, workers=2, executor=executor)
    assert stats.decoded == len(paths) > 64  # more than one chunk, so the pool is used
    assert {p: v.reason for p, v in verdicts.items() if v.reason} == expected
    assert verdicts == {p: check_file(p, BOMB_LIMIT) for p in paths}


def test_the_bench_measures_a_cold_check_that_decodes_every_image():
    # The rate is decoded / seconds: it means decoding speed only if every image was decoded,
    # none came from a cache, and none failed (a failure is timed on the error path).
    stats = measure_check_speed(count=40, width=32, height=32, workers=2)  # two chunks: the pool is used
    assert stats.files == stats.decoded == 40 and stats.cached == 0


# --- the real command ----------------------------------------------------------------------------


@pytest.mark.e2e
def test_the_run_stops_on_a_broken_image_before_writing_a_checkpoint(tmp_path, tiny_data):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    broken = data / "train" / "circle" / "broken photo.jpg"
    write_truncated_jpeg(broken)
    result = run_cli(*run_args(tmp_path, data), cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "error: 1 of 19 images cannot be used" in result.stderr
    assert f"\n  {broken}: truncated\n" in result.stderr and "data.on_bad_image=skip" in result.stderr
    for folder in ("ckpt", "model"):
        assert not (tmp_path / folder).exists() or not any((tmp_path / folder).iterdir()), folder
    assert (tmp_path / "outputs" / REPORT_NAME).is_file()
