"""What a run leaves and the commands that use the model, end to end in subprocesses.

One smoke run is shared by every test here: killed for real (SIGKILL) after
the fine-tune epoch was logged but before its checkpoint committed, then
resumed from the mid-epoch checkpoint before it. So its history has an orphan
row to drop, and its report, model and curves come from a resumed run.
"""

from __future__ import annotations

import csv
import io
import re
import shutil
import signal

import numpy as np
import pytest
from conftest import REPO, assert_exports_answer, assert_real_png, cli_env, event_steps, from_conf, run_args, run_cli

pytestmark = pytest.mark.e2e
CLASSES = ["circle", "square", "triangle"]
# 3 batches an epoch; a checkpoint after batch 2 and at each epoch's end. The 4th
# checkpoint is the end of epoch 2 (fine-tune): killed once its files are written.
KILLED = ["checkpoint.every_batches=2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_data):
    tmp = tmp_path_factory.mktemp("report_run")
    args = run_args(tmp, tiny_data, *KILLED)
    first = run_cli(*args, cwd=REPO, env=cli_env(PIPELINE_KILL_AT="after_write#4"))
    assert first.returncode == -signal.SIGKILL, first.stdout + first.stderr
    orphan = [r["epoch"] for r in history_rows(tmp)]
    second = run_cli(*args, cwd=REPO)
    assert second.returncode == 0, second.stdout + second.stderr
    return tmp, orphan, second


def history_rows(tmp) -> list[dict]:
    with open(tmp / "outputs" / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def images_in(folder):
    """An independent count: every .jpg below `folder`."""
    return sorted(str(p) for p in folder.rglob("*.jpg"))


def report_matrix(report: str) -> np.ndarray:
    rows = re.findall(r"^\| (circle|square|triangle) \| (\d+) \| (\d+) \| (\d+) \|$", report, re.MULTILINE)
    return np.array([[int(v) for v in row[1:]] for row in rows[-3:]])


def one_error_line(result, *names):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(name in lines[0] for name in names), lines[0]


def test_history_after_kill_9_and_resume_has_each_epoch_once(run):
    tmp, orphan, second = run
    assert orphan == ["1", "2"]  # the killed run had logged epoch 2 without committing it
    assert "resume: from checkpoint transfer_02-" in second.stdout and "2 batches into the next" in second.stdout
    rows = history_rows(tmp)
    assert [(r["epoch"], r["phase"]) for r in rows] == [("1", "head"), ("2", "finetune")]
    assert rows[0]["resumed_from"] == "" and rows[1]["resumed_from"].endswith("-b00002")
    assert float(rows[1]["resumed_at"]) == pytest.approx(1 + 2 / 3, abs=1e-3)
    assert all(float(r["lr"]) > 0 and float(r["seconds"]) > 0 for r in rows)
    for split in ("train", "validation"):
        steps = event_steps(tmp / "outputs" / "tensorboard" / split)
        assert steps["epoch_loss"] == [1, 2] and steps["epoch_accuracy"] == [1, 2], steps


def test_report_counts_the_data_and_its_matrix_agrees_with_the_last_validation(run, tiny_data):
    tmp, _, second = run
    out = tmp / "outputs"
    assert f"report: {out / 'report.md'}" in second.stdout
    report = (out / "report.md").read_text()
    for name in CLASSES:
        train = len(images_in(tiny_data / "train" / name))
        val = len(images_in(tiny_data / "validation" / name))
        assert f"| {name} | {train} | 33% | {val} |" in report
    assert "| head | 1 |" in report and "| finetune | 1 |" in report
    assert re.search(r"best val_accuracy: \d\.\d{4} at epoch [12] \(checkpoint `transfer_0", report)
    assert "resumed: from `transfer_02-" in report
    matrix = report_matrix(report)
    assert matrix.sum(axis=1).tolist() == [len(images_in(tiny_data / "validation" / n)) for n in CLASSES]
    last = history_rows(tmp)[-1]
    # the same final weights on the same validation images as the last epoch's validation
    assert np.trace(matrix) / matrix.sum() == pytest.approx(float(last["val_accuracy"]), abs=1e-6)
    assert_real_png(out / "curves.png", (600, 300))
    assert_real_png(out / "confusion_matrix.png")


def test_a_complete_run_again_writes_a_missing_report_and_trains_nothing(run, tiny_data, tmp_path):
    tmp = tmp_path  # a copy: the tests after this one read the shared run's report
    shutil.copytree(run[0], tmp, dirs_exist_ok=True)
    model = tmp / "model" / "final.h5"
    before = model.stat().st_mtime_ns
    (tmp / "outputs" / "report.md").unlink()
    again = run_cli(*run_args(tmp, tiny_data, *KILLED), cwd=REPO)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already complete" in again.stdout and "epoch 1/1" not in again.stdout
    assert "## Validation confusion matrix" in (tmp / "outputs" / "report.md").read_text()
    assert model.stat().st_mtime_ns == before


def test_predict_labels_every_image_and_goes_on_past_a_broken_one(run, tiny_data, tmp_path):
    tmp, _, _ = run
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    result = run_cli(
        str(tmp / "model" / "final.h5"),
        str(tiny_data / "validation"),
        str(broken),
        "--top-k",
        "2",
        cwd=REPO,
        module="pipeline.predict",
    )
    assert result.returncode == 1, result.stderr
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert [cells[0] for cells in lines] == images_in(tiny_data / "validation") + [str(broken)]
    for cells in lines[:-1]:
        assert len(cells) == 5 and cells[1] in CLASSES and cells[3] in CLASSES and cells[1] != cells[3]
        top1, top2 = float(cells[2]), float(cells[4])
        # ranked, and two of one softmax's three probabilities: the top one is at least a third
        assert top1 >= top2 >= 0 and top1 + top2 <= 1 + 1e-6 and top1 >= 1 / 3 - 1e-6
    assert lines[-1][1].startswith("error: cannot read image")
    assert "1 of 7 images could not be read" in result.stderr and "Traceback" not in result.stderr
    # the classes predicted are the columns of the report's confusion matrix (same model, same decoding)
    predicted = [CLASSES.index(cells[1]) for cells in lines[:-1]]
    matrix = report_matrix((tmp / "outputs" / "report.md").read_text())
    assert np.bincount(predicted, minlength=3).tolist() == matrix.sum(axis=0).tolist()

    as_csv = run_cli(
        str(tmp / "model" / "final.h5"),
        str(tiny_data / "train" / "circle"),
        "--csv",
        cwd=REPO,
        module="pipeline.predict",
    )
    assert as_csv.returncode == 0, as_csv.stderr
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert len(rows) == len(images_in(tiny_data / "train" / "circle"))
    assert all(r["class"] in CLASSES and 0 <= float(r["probability"]) <= 1 and not r["error"] for r in rows)


def test_evaluate_scores_a_folder_tree_and_writes_the_matrix(run, tiny_data, tmp_path):
    tmp, _, _ = run
    result = run_cli(
        str(tmp / "model" / "final.h5"),
        str(tiny_data / "validation"),
        "--out",
        str(tmp_path),
        cwd=REPO,
        module="pipeline.evaluate",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    total = len(images_in(tiny_data / "validation"))
    hits, count = map(int, re.search(r"^accuracy \S+ \((\d+)/(\d+)\)$", result.stdout, re.MULTILINE).groups())
    assert count == total
    for name in CLASSES:
        row = re.search(rf"^{name}\s+(\S+)\s+(\S+)\s+(\S+)\s+(\d+)$", result.stdout, re.MULTILINE)
        assert int(row.group(4)) == len(images_in(tiny_data / "validation" / name))
        assert all(0 <= float(v) <= 1 for v in row.groups()[:3])
    matrix = report_matrix((tmp / "outputs" / "report.md").read_text())
    assert hits == np.trace(matrix)  # the report scored the same images with the same model
    assert "true \\ predicted" in (tmp_path / "confusion_matrix.txt").read_text()
    assert_real_png(tmp_path / "confusion_matrix.png")


def scores_of(text: str) -> list[tuple[int, int]]:
    """(hits, count) of every `accuracy` line printed."""
    return [tuple(map(int, m)) for m in re.findall(r"^accuracy \S+ \((\d+)/(\d+)\)$", text, re.MULTILINE)]


def test_predict_and_evaluate_tta_agree_and_evaluate_says_whether_it_helped(run, tiny_data, tmp_path):
    tmp, _, _ = run
    model_file, validation = str(tmp / "model" / "final.h5"), tiny_data / "validation"
    result = run_cli(model_file, str(validation), "--tta", "6", "--top-k", "3", cwd=REPO, module="pipeline.predict")
    assert result.returncode == 0, result.stderr
    printed = {cells[0]: cells[1:] for cells in (line.split("\t") for line in result.stdout.splitlines())}
    assert list(printed) == images_in(validation)
    # the mean of softmaxes is one too (that it is the mean of the right views: test_tta.py, by hand)
    assert all(sum(float(p) for p in cells[1::2]) == pytest.approx(1, abs=2e-4) for cells in printed.values())

    evaluated = run_cli(
        model_file, str(validation), "--tta", "6", "--out", str(tmp_path), cwd=REPO, module="pipeline.evaluate"
    )
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    out = evaluated.stdout
    assert "without TTA (the image alone):" in out
    assert "with TTA (mean of 6 views: the image; mirrored; shifted 4 px left; shifted 4 px right; " in out
    (alone, _), (averaged, count) = scores_of(out)
    assert count == len(images_in(validation))
    # without TTA: the report's score (same model, same images); with TTA: predict --tta 6's classes
    assert alone == np.trace(report_matrix((tmp / "outputs" / "report.md").read_text()))
    rows = re.findall(r"^(?:circle|square|triangle)\s+(\d+)\s+(\d+)\s+(\d+)$", out, re.MULTILINE)
    tta_matrix = np.array(rows, dtype=int)  # the printed matrix is TTA's
    top1 = [CLASSES.index(cells[0]) for cells in printed.values()]
    assert tta_matrix.sum(axis=0).tolist() == np.bincount(top1, minlength=3).tolist()
    verdict = re.search(r"^TTA (.+) on this set \((\d+) images\): accuracy (\S+) -> (\S+) ", out, re.MULTILINE)
    assert verdict and int(verdict.group(2)) == count, out
    assert float(verdict.group(3)) == pytest.approx(alone / count, abs=1e-4)
    assert float(verdict.group(4)) == pytest.approx(averaged / count, abs=1e-4)
    assert "with TTA" in (tmp_path / "confusion_matrix.txt").read_text()


def test_a_bad_tta_is_one_error_line_naming_it(run, tiny_data):
    model = str(run[0] / "model" / "final.h5")
    # 11: the run flipped and shifted, which makes 10 views. All fail before TensorFlow starts.
    for command, value in (
        ("predict", "0"),
        ("predict", "1.5"),
        ("predict", "11"),
        ("evaluate", "-2"),
        ("evaluate", "two"),
    ):
        result = run_cli(model, str(tiny_data), "--tta", value, cwd=REPO, module=f"pipeline.{command}")
        one_error_line(result, f"--tta {value}")


@pytest.mark.filterwarnings("ignore::UserWarning")  # tf.lite.Interpreter's notice that LiteRT replaces it
def test_export_writes_a_saved_model_and_tflite_that_agree_with_keras(run, tiny_data, tmp_path):
    import keras

    from pipeline.data.dataset import load_image

    tmp, _, _ = run
    out = tmp_path / "served"
    result = run_cli(str(tmp / "model" / "final.h5"), "--out", str(out), "--tflite", cwd=REPO, module="pipeline.export")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (out / "labels.txt").read_text().split() == CLASSES
    data = from_conf("data")  # the run decoded with conf/'s settings
    x = load_image(images_in(tiny_data / "validation")[0], 75, data.interpolation, data.max_pixels)[None]
    expected = keras.models.load_model(tmp / "model" / "final.h5", compile=False)(x, training=False).numpy()
    assert_exports_answer(out, tmp_path / "final.tflite", x, expected)


def test_bad_input_is_one_error_line_naming_it(run, tiny_data, tmp_path):
    tmp, _, _ = run
    model = str(tmp / "model" / "final.h5")
    missing = tmp_path / "nope.h5"
    one_error_line(run_cli(str(missing), str(tiny_data), cwd=REPO, module="pipeline.predict"), str(missing))
    fake = tmp_path / "fake.h5"
    fake.write_text("not a model")
    one_error_line(run_cli(str(fake), str(tiny_data), cwd=REPO, module="pipeline.evaluate"), str(fake))
    one_error_line(run_cli(str(fake), cwd=REPO, module="pipeline.export"), str(fake))
    one_error_line(run_cli(model, str(tmp_path / "nowhere"), cwd=REPO, module="pipeline.predict"), "nowhere")
    one_error_line(run_cli(model, str(tmp_path / "nowhere"), cwd=REPO, module="pipeline.evaluate"), "nowhere")
    # a class the model does not know: named, along with the classes it does know
    one_error_line(
        run_cli(model, str(tiny_data / "train" / ".."), cwd=REPO, module="pipeline.evaluate"),
        "train",
        "validation",
        "circle, square, triangle",
    )
