"""Faults and misuse around a run: a full disk, untrusted model files, class names
that break line-based files, and what dead processes leave in the temporary folder."""

from __future__ import annotations

import os
import shutil

import pytest
from conftest import from_conf

from pipeline.data.dataset import DataError, read_dataset

# ---- 12c: class names that would break labels.txt and predict's tab-separated output


@pytest.mark.parametrize("bad", ["tab\there", "new\nline", "carriage\rreturn"])
def test_class_names_with_a_tab_or_line_break_are_refused_and_named(tmp_path, tiny_data, bad):
    root = tmp_path / "d"
    shutil.copytree(tiny_data, root)
    for split in ("train", "validation"):
        os.rename(root / split / "square", root / split / bad)
    cfg = from_conf("data", dir=str(root), image_size=75, batch_size=4, workers=0)
    with pytest.raises(DataError) as err:
        read_dataset(cfg)
    message = str(err.value)
    assert repr(bad) in message and str(root / "train") in message
    assert "\n" not in message and "\t" not in message  # the error itself stays one line
