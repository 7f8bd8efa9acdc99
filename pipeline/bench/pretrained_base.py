"""A stand-in for ImageNet weights, made offline for `make bench`: InceptionV3 trained on two sample classes.

ImageNet weights cannot be downloaded everywhere the bench runs, and from random
weights the classic recipe learns nothing (its frozen base has random features),
so comparing against it there says little. The bench therefore pretrains a base
itself: the pipeline's own whole-network training, from scratch, on circles and
squares drawn with another seed than the bench's data set, and keeps the base
(everything below the new head) as a no-top weights file. The bench's runs then
fine-tune from it on all three classes, triangles included, which the base never
saw: transfer to a new class, as with a real pretrained base.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

PRETRAIN_CLASSES = ("circle", "square")
PRETRAIN_SEED = 7  # the bench's own data set is drawn with seed 0


def pretrained_base(work: Path, image_size: int, epochs: int) -> Path:
    """The no-top weights file in `work`, trained once and reused by later bench runs with the same --work."""
    made_as = f"{image_size}px_{epochs}epochs"
    path = work / f"pretrained_base_{made_as}.weights.h5"
    if path.is_file():
        return path
    data_dir = pretraining_data(work / "pretrain_data")
    # Its own run folder per size and epochs: another --base-epochs would otherwise resume this run and
    # stretch its schedule, and another size would be refused by the checkpoints' fingerprint.
    run_dir = work / f"pretrain_run_{made_as}"
    command = [
        sys.executable,
        "-m",
        "pipeline",
        f"data.dir={data_dir}",
        "model.weights=null",
        f"data.image_size={image_size}",
        "train.head.epochs=0",
        f"train.finetune.epochs={epochs}",
        "train.finetune.unfreeze_after=none",
        f"checkpoint.dir={run_dir / 'ckpt'}",
        f"model.save_path={run_dir / 'model' / 'base_with_head.h5'}",
        f"hydra.run.dir={run_dir / 'outputs'}",
        f"train.cache_dir={run_dir / 'cache'}",
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError("pretraining the bench's base failed:\n" + (done.stdout + done.stderr)[-3000:])
    save_base_weights(run_dir / "model" / "base_with_head.h5", path)
    return path


def pretraining_data(folder: Path) -> Path:
    """The sample set drawn with PRETRAIN_SEED, its classes cut to PRETRAIN_CLASSES."""
    from pipeline.data.sample_data import write_sample_data

    if not (folder / "train").is_dir():
        write_sample_data(folder, seed=PRETRAIN_SEED, train_per_class=100, validation_per_class=20)
        for split in ("train", "validation"):
            for class_dir in (folder / split).iterdir():
                if class_dir.name not in PRETRAIN_CLASSES:
                    shutil.rmtree(class_dir)
    return folder


def save_base_weights(model_file: Path, path: Path) -> None:
    """The trained model's InceptionV3 (a nested model) saved alone: a no-top weights file."""
    import keras

    from pipeline.model import base_of

    trained = keras.models.load_model(model_file, compile=False)
    tmp = path.with_name(".partial-" + path.name)  # Keras wants the .weights.h5 suffix
    base_of(trained).save_weights(str(tmp))
    tmp.rename(path)
