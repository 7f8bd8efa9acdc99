"""`python -m pipeline.evaluate MODEL DIR`: score a trained model on a class-per-folder tree.

DIR holds one folder per class (`DIR/<class>/*.jpg`, as training's
validation/). Prints accuracy and per-class precision, recall and F1, and
writes the confusion matrix as text and as a PNG. A folder whose name the
model does not know is an error naming it; images that cannot be read are
listed and left out of the scores. With `--tta N` (tta.py) it prints the scores
without and with test-time augmentation, from one decoding of each image, and
one line saying whether TTA helped on this set; the matrix is then TTA's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from pipeline.cli import run_command, start_tensorflow
from pipeline.errors import CommandError
from pipeline.model_file.load import ModelInfo, load_model, read_model_info
from pipeline.process_exit import run_then_end
from pipeline.tta import TTA_HELP, View, compare_tta, describe_views, parse_tta, tta_views

OUT = Path("evaluation")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="the final model file (.h5) that training saved")
    parser.add_argument("dir", metavar="DIR", help="a folder with one subfolder of images per class")
    parser.add_argument("--out", type=Path, default=OUT, help=f"where the confusion matrix files go (default {OUT}/)")
    parser.add_argument("--tta", type=str, default="1", metavar="N", help=TTA_HELP)
    args = parser.parse_args(argv)
    args.tta = parse_tta(args.tta)  # checked here, not by argparse: one `error:` line, no usage text
    return args


def class_folders(root: Path, info: ModelInfo) -> list[Path]:
    """The class folders of `root`, each named as a class the model knows."""
    if not root.is_dir():
        raise CommandError(f"{root} is not a folder; expected {root}/<class>/<images>")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise CommandError(f"{root} has no class folders; expected {root}/<class>/<images>")
    unknown = [p.name for p in folders if p.name not in info.class_names]
    if unknown:
        raise CommandError(
            f"class folder(s) in {root} that the model {info.path} does not know: "
            f"{', '.join(unknown)} (it knows {', '.join(info.class_names)})"
        )
    return folders


def evaluate(args: argparse.Namespace) -> int:
    info = read_model_info(args.model)
    views = tta_views(args.tta, info)
    folders = class_folders(Path(args.dir), info)
    start_tensorflow()
    from pipeline.data.dataset import EXTENSIONS_HINT
    from pipeline.inference import find_images, label_files
    from pipeline.reports.metrics import format_confusion
    from pipeline.reports.plots import draw_confusion

    truth = {path: info.class_names.index(folder.name) for folder in folders for path in find_images(folder)}
    if not truth:
        raise CommandError(f"no images in the class folders of {args.dir} ({EXTENSIONS_HINT})")
    model = load_model(info)
    true, plain, predicted, unreadable = [], [], [], []
    for result in label_files(model, truth, info.image_size, info.interpolation, info.max_pixels, views):
        if result.probabilities is None:  # the file could not be read; result.error says why
            unreadable.append(f"{result.path}: {result.error}")
        else:
            assert result.plain is not None  # set with probabilities (inference.finish_chunk)
            true.append(truth[result.path])
            plain.append(int(np.argmax(result.plain)))
            predicted.append(int(np.argmax(result.probabilities)))
    for line in unreadable:
        print(f"warning: skipped {line}", file=sys.stderr)
    if not true:
        raise CommandError(f"none of the {len(truth)} images in {args.dir} could be read")
    matrix, scores = score(true, plain, predicted, info.class_names, views)
    table = format_confusion(matrix, info.class_names)
    print(f"{len(true)} images of {args.dir} ({len(folders)} class folders), model {info.path}")
    print(scores)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    text = args.out / "confusion_matrix.txt"
    text.write_text(f"model {info.path}\ndata {args.dir}\n{scores}\n\n{table}\n")
    title = Path(args.dir).name + (f", TTA {len(views)} views" if len(views) > 1 else "")
    png = draw_confusion(matrix, info.class_names, args.out / "confusion_matrix.png", title)
    print(f"written: {text}, {png}")
    return 0


def score(
    true: list[int], plain: list[int], predicted: list[int], names: list[str], views: list[View]
) -> tuple[np.ndarray, str]:
    """The confusion matrix of `predicted` and the scores to print; with several views, those
    of `plain` (the image alone) first, and a last line saying whether TTA helped."""
    from pipeline.reports.metrics import confusion_matrix, format_scores

    matrix = confusion_matrix(np.array(true), np.array(predicted), len(names))
    if len(views) == 1:
        return matrix, format_scores(matrix, names)
    alone = confusion_matrix(np.array(true), np.array(plain), len(names))
    return matrix, "\n".join(
        [
            "without TTA (the image alone):",
            format_scores(alone, names),
            f"with TTA ({describe_views(views)}):",
            format_scores(matrix, names),
            compare_tta(alone, matrix),
        ]
    )


def main(argv=None) -> None:
    run_command(lambda: evaluate(parse_args(argv)))


if __name__ == "__main__":
    run_then_end(main)  # process_exit.py: no 3 s of teardown after the work is done
