"""`make bench`: measurements side by side, from one run, printed as ratios.

Not a test: nothing here passes or fails on time. It trains one epoch of the
sample set at the default size and compares what a checkpoint in each format
costs with what that epoch cost.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=150, help="pixels (default: the pipeline's)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    return parser.parse_args(argv)


def measure_checkpoint_cost(work: Path, image_size: int, batch_size: int) -> None:
    """One epoch of whole-network training, then one checkpoint in every format."""
    import keras

    from .checkpoint import SUFFIXES, TrainState, checkpoint_stem, save_checkpoint
    from .config import CheckpointConfig, DataConfig, ModelConfig
    from .data import read_dataset, train_batches
    from .model import build_model, compile_model, set_trainable
    from .sample_data import write_sample_data

    data_dir = work / "data"
    if not (data_dir / "train").exists():
        write_sample_data(data_dir)
    data_cfg = DataConfig(dir=str(data_dir), image_size=image_size, batch_size=batch_size)
    data = read_dataset(data_cfg)
    model = build_model(ModelConfig(weights=None), len(data.class_names), image_size)
    set_trainable(model, "finetune", None, pretrained=False)
    compile_model(model, "adam", 1e-3)
    model.fit(train_batches(data, data_cfg, 0, 0), epochs=1, verbose=0, shuffle=False)  # tracing
    started = time.perf_counter()
    model.fit(train_batches(data, data_cfg, 0, 1), epochs=1, verbose=0, shuffle=False)
    epoch = time.perf_counter() - started
    images = len(data.train.filepaths)
    print(f"epoch at {image_size} px, whole network: {epoch:.1f} s for {images} images "
          f"({images / epoch:.1f} images/s)")
    twin = build_model(ModelConfig(weights=None), len(data.class_names), image_size)
    for fmt in SUFFIXES:
        cfg = CheckpointConfig(dir=str(work / f"ckpt_{fmt}"), format=fmt)
        state = TrainState(phase="finetune", phase_epoch=1, epoch=1)
        logs = {"val_accuracy": 0.5}
        started = time.perf_counter()
        save_checkpoint(model, cfg, checkpoint_stem(cfg, state, logs), state, logs, {}, twin)
        cost = time.perf_counter() - started
        print(f"checkpoint {fmt:<14} {cost:5.2f} s = {cost / epoch:6.1%} of an epoch")
    keras.backend.clear_session()


def main(argv=None) -> int:
    args = parse_args(argv)
    from .quiet import import_tensorflow_quietly

    import_tensorflow_quietly()
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch:
        work = args.work or Path(scratch)
        measure_checkpoint_cost(work, args.image_size, args.batch_size)
    from .image_check import report_check_speed

    report_check_speed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
