"""`python -m pipeline.predict MODEL PATH...`: label images with a trained model.

PATHs are image files or folders (searched through, images found by extension
as training finds them). One line per image:

    path<TAB>class<TAB>probability          (--top-k K: K class/probability pairs)

`--csv` prints the same as CSV with a header. `--tta N` gives each image the
mean probabilities over N fixed views of it (tta.py). A file that cannot be read
gets `error: ...` on its line and the rest go on; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from pipeline.cli import run_command, start_tensorflow
from pipeline.errors import CommandError
from pipeline.model_file.load import load_model, read_model_info
from pipeline.process_exit import run_then_end
from pipeline.tta import TTA_HELP, parse_tta, tta_views


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.predict", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="the final model file (.h5) that training saved")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders of images")
    parser.add_argument("--top-k", type=int, default=1, metavar="K", help="the K likeliest classes (default 1)")
    parser.add_argument("--csv", action="store_true", help="print CSV with a header instead of tab-separated lines")
    parser.add_argument("--tta", type=str, default="1", metavar="N", help=TTA_HELP)
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"--top-k {args.top_k}: must be at least 1")
    args.tta = parse_tta(args.tta)  # checked here, not by argparse: one `error:` line, no usage text
    return args


def predict(args: argparse.Namespace) -> int:
    info = read_model_info(args.model)
    views = tta_views(args.tta, info)
    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        raise CommandError(f"no such file or folder: {', '.join(missing)}")
    start_tensorflow()
    from pipeline.data.dataset import EXTENSIONS_HINT
    from pipeline.inference import find_images, label_files, top_k

    images = [str(p) for path in args.paths for p in (find_images(Path(path)) if Path(path).is_dir() else [path])]
    if not images:
        raise CommandError(f"no images in {', '.join(args.paths)} ({EXTENSIONS_HINT})")
    model = load_model(info)
    k = min(args.top_k, len(info.class_names))
    write = make_writer(args.csv, k)
    failed = 0
    for result in label_files(model, images, info.image_size, info.interpolation, info.max_pixels, views):
        if result.probabilities is None:  # the file could not be read; result.error says why
            failed += 1
            write(result.path, [], f"error: {result.error}")
        else:
            write(
                result.path,
                [(info.class_names[i], result.probabilities[i]) for i in top_k(result.probabilities, k)],
                "",
            )
    if failed:
        print(f"{failed} of {len(images)} images could not be read", file=sys.stderr)
    return 1 if failed else 0


def make_writer(as_csv: bool, k: int):
    """A function printing one image's line: path, then (class, probability) pairs, or the error."""
    if as_csv:
        out = csv.writer(sys.stdout, lineterminator="\n")
        ranks = [""] + [f"_{r}" for r in range(2, k + 1)]
        out.writerow(["path", *[f"{c}{r}" for r in ranks for c in ("class", "probability")], "error"])

        def write_csv(path, pairs, error):
            cells = [v for name, p in pairs for v in (name, f"{p:.4f}")] or [""] * (2 * k)
            out.writerow([path, *cells, error])
            sys.stdout.flush()

        return write_csv

    def write_tsv(path, pairs, error):
        cells = [v for name, p in pairs for v in (name, f"{p:.4f}")] or [error]
        print("\t".join([path, *cells]), flush=True)

    return write_tsv


def main(argv=None) -> None:
    run_command(lambda: predict(parse_args(argv)))


if __name__ == "__main__":
    run_then_end(main)  # process_exit.py: no 3 s of teardown after the work is done
