"""Files -> a checked DataSet: the one way a run (and the launcher of local workers) readies its data."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import DataConfig
from pipeline.data.dataset import DataSet, ensure_sample_data, read_dataset
from pipeline.data.image_check import check_images


def prepare_data(cfg: DataConfig, report_dir: Path) -> DataSet:
    """Write the sample set into an empty data.dir, index the folders, and decode every image once.

    Every image is decoded now, in seconds, rather than failing hours into the run;
    bad_images.csv goes to `report_dir` (the run's output folder) when any is bad.
    """
    ensure_sample_data(cfg)
    return check_images(read_dataset(cfg), cfg, report_dir)
