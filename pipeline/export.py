"""`python -m pipeline.export MODEL`: the trained model as a TensorFlow SavedModel, and optionally TFLite.

The SavedModel (Keras's `model.export`) serves a `serve` signature: float32
raw RGB pixels 0-255 at the training size, shape (batch, size, size, 3), in;
class probabilities out, in the order of `labels.txt` written beside
`saved_model.pb`. `--tflite` also writes a `.tflite` file (LiteRT) with the
same input and output, beside the SavedModel folder. Decode and resize images as pipeline.predict does
(data.load_image): the backbone's scaling is inside the model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.atomic_file import replaced
from pipeline.cli import run_command, start_tensorflow
from pipeline.errors import CommandError
from pipeline.model_file.load import ModelInfo, load_model, read_model_info
from pipeline.process_exit import run_then_end


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="the final model file (.h5) that training saved")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the SavedModel folder (default: beside MODEL, named <model>_saved_model)",
    )
    parser.add_argument(
        "--tflite", action="store_true", help="also write <model>.tflite beside the SavedModel, for TFLite / LiteRT"
    )
    return parser.parse_args(argv)


def export(args: argparse.Namespace) -> int:
    info = read_model_info(args.model)
    out = args.out or info.path.with_name(info.path.stem + "_saved_model")
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} is a file; give a folder for the SavedModel")
    start_tensorflow()
    model = load_model(info)
    export_saved_model(model, info, out)
    print(
        f"saved model: {out} (signature 'serve': float32 pixels 0-255, shape (batch, {info.image_size}, "
        f"{info.image_size}, 3) -> probabilities of {', '.join(info.class_names)}; labels in {out / 'labels.txt'})"
    )
    if args.tflite:
        tflite = out.parent / (info.path.stem + ".tflite")
        export_tflite(out, tflite)
        print(f"tflite: {tflite}")
    return 0


def export_saved_model(model, info: ModelInfo, out: Path) -> None:
    """Written beside `out` under a temporary name, then moved into place: a kill leaves the old export whole."""
    with replaced(out) as tmp:
        model.export(str(tmp), format="tf_saved_model", verbose=False)
        (tmp / "labels.txt").write_text("".join(f"{name}\n" for name in info.class_names))
        (tmp / "pipeline_metadata.json").write_text(json.dumps(info.metadata, indent=1, sort_keys=True))


def export_tflite(saved_model: Path, path: Path) -> None:
    """The TFLite file converted from the SavedModel just written, as Keras's `format="litert"` converts.

    Keras's litert export first writes a SavedModel of its own, the same as
    ours, tracing the model again: for EfficientNetV2B0 that doubled the time of
    `--tflite`. These are its converter settings (keras/src/export/litert.py).
    """
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
    converter.experimental_enable_resource_variables = True
    flat = converter.convert()
    with replaced(path) as tmp:
        tmp.write_bytes(flat)


def main(argv=None) -> None:
    run_command(lambda: export(parse_args(argv)))


if __name__ == "__main__":
    run_then_end(main)  # process_exit.py: no 3 s of teardown after the work is done
