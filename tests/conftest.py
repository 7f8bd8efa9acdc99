"""Shared fixtures and helpers: a tiny real data set, a runner for the real CLI, and what tests compare."""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import Config, DataConfig
from pipeline.data.sample_data import write_sample_data
from pipeline.defaults import compose_config

REPO = Path(__file__).resolve().parents[1]
# The smoke experiment (75 px, batch 4, weights=null, one epoch per phase) keeps
# an end-to-end run at about half a minute, most of it TensorFlow tracing.
SMOKE = ["experiment=smoke"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """3 classes x 4 training and 2 validation JPEGs, at 80 px."""
    root = tmp_path_factory.mktemp("tiny_data")
    write_sample_data(root, seed=1, train_per_class=4, validation_per_class=2, image_size=80)
    return root


@functools.cache
def composed_defaults() -> Config:
    """conf/'s values, composed once per test process as `python -m pipeline` composes them."""
    # data.dir: any existing folder passes validation; the tracked data/ is one in every clone.
    return compose_config([f"data.dir={REPO / 'data'}"])


def from_conf(section: str, **changes):
    """One section of conf/'s values (e.g. "model" -> a ModelConfig) with `changes`, a fresh copy.

    The unit tests' stand-in for `python -m pipeline section.key=value`: the values a run
    starts from, without composing again for every test (Hydra's composition is slow enough to add up).
    """
    return dataclasses.replace(copy.deepcopy(getattr(composed_defaults(), section)), **changes)


@pytest.fixture
def data_dir(tmp_path, tiny_data) -> Path:
    """A copy of tiny_data that a test may change."""
    shutil.copytree(tiny_data, tmp_path / "data")
    return tmp_path / "data"


def data_config(root, **kw) -> DataConfig:
    """The data section the unit tests use: 75 px, batches of 4, loaded in the calling thread; kw overrides."""
    return from_conf("data", **{"dir": str(root), "image_size": 75, "batch_size": 4, "workers": 0, **kw})


def cli_env(**extra) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    env.pop("HYDRA_FULL_ERROR", None)
    env.update(extra)
    return env


def run_cli(
    *overrides, cwd: Path, timeout: float = 600, env: dict | None = None, module: str = "pipeline"
) -> subprocess.CompletedProcess:
    """Run `python -m pipeline OVERRIDES` the way a user does; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", module, *overrides],
        cwd=cwd,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_args(tmp: Path, data: Path, *extra) -> list[str]:
    """Overrides that keep a run's data, checkpoints, model and logs inside `tmp`."""
    return [
        *SMOKE,
        f"data.dir={data}",
        f"checkpoint.dir={tmp / 'ckpt'}",
        f"model.save_path={tmp / 'model' / 'final.h5'}",
        f"hydra.run.dir={tmp / 'outputs'}",
        f"train.cache_dir={tmp / 'cache'}",
        *extra,
    ]


def sweep_args(tmp: Path, data: Path, *extra) -> list[str]:
    """run_args for `-m`: the sweep folder instead of the single run's folder."""
    return [a for a in run_args(tmp, data, *extra) if not a.startswith("hydra.run")] + [
        f"hydra.sweep.dir={tmp / 'multirun'}"
    ]


def final_weights(run_dir: Path) -> list[np.ndarray]:
    """The weights of the final model a run left in run_dir/model/final.h5."""
    import keras

    return [w.numpy() for w in keras.models.load_model(run_dir / "model" / "final.h5", compile=False).weights]


def assert_exports_answer(saved_model: Path, tflite: Path, x: np.ndarray, expected: np.ndarray) -> None:
    """pipeline.export's SavedModel (its `serve` signature) and TFLite file answer `x` as the Keras model did."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(saved_model))  # kept: serve() needs the loaded object's variables alive
    np.testing.assert_allclose(loaded.serve(tf.constant(x)).numpy(), expected, atol=1e-4)
    interpreter = tf.lite.Interpreter(model_path=str(tflite))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    lite = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    np.testing.assert_allclose(lite, expected, atol=1e-3)


def settle_batchnorm(model, batch: np.ndarray, calls: int | None = 30) -> None:
    """What `calls` training-mode calls on `batch` do to every BatchNorm layer's moving statistics, in one;
    calls=None: the batch's statistics alone (momentum 0). Each layer's momentum is restored after.

    Each call normalises with the batch's own statistics, the same every time, so `calls` of them
    leave momentum**calls of the initial statistics: one call with that momentum leaves the same.
    30 calls took 25 s for EfficientNetV2B0. (Momentum 0, the batch's statistics alone, left
    EfficientNetV2B0 answering a saturated softmax, the same for every input.)
    """
    import keras

    norms = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    momentum = [layer.momentum for layer in norms]
    for layer in norms:
        layer.momentum = 0.0 if calls is None else layer.momentum**calls
    model(batch, training=True)
    for layer, kept in zip(norms, momentum, strict=True):
        layer.momentum = kept


def largest_difference(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """The largest absolute difference between two lists of weights of the same shapes."""
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


def assert_real_png(path, min_size=(200, 200)):
    """Decodes as a PNG of a plausible size with more than one colour in it."""
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.width >= min_size[0] and img.height >= min_size[1]
        img.load()
        assert len(img.convert("L").getcolors(maxcolors=1 << 16) or range(2)) > 1


def event_steps(folder) -> dict:
    """{tag: [step, ...]} of every TensorBoard event file in folder."""
    import tensorflow as tf

    steps = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                steps.setdefault(value.tag, []).append(event.step)
    return steps


# Run in a fresh process: the saved model's answer for a photo's raw pixels, against the
# same weights fed Inception's -1..1 pixels through the layers after the scaling layer.
# Prints the class count, that difference (about 0), and the one left unscaled (far from 0).
RAW_PIXELS_CHECK = """
import sys, numpy as np, keras
from PIL import Image
m = keras.models.load_model(sys.argv[1])
size = m.input_shape[1]
x = np.asarray(Image.open(sys.argv[2]).convert("RGB").resize((size, size)), dtype="float32")[None]
def after_scaling(x):
    features = m.get_layer("pool")(m.get_layer("inception_v3")(x, training=False))
    return m.get_layer("predictions")(features).numpy()
p = m.predict(x, verbose=0)
print(p.shape[1], np.abs(p - after_scaling(x / 127.5 - 1)).max(), np.abs(p - after_scaling(x)).max())
"""


def assert_labels_raw_pixels(model_file: Path, image: Path, n_classes: int = 3) -> None:
    """The saved model, loaded in a fresh process, scales a photo's raw 0-255 pixels itself."""
    out = subprocess.run(
        [sys.executable, "-c", RAW_PIXELS_CHECK, str(model_file), str(image)],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    classes, scaled, unscaled = out.stdout.split()[-3:]
    assert int(classes) == n_classes
    assert float(scaled) <= 1e-5, out.stdout
    assert float(unscaled) > 1e-4, f"fed unscaled the model answers the same: the check means nothing\n{out.stdout}"


def shifted_by_hand(x: np.ndarray, right: int = 0, down: int = 0) -> np.ndarray:
    """`x` (height, width, channels) moved right and down by whole pixels (negative: left, up),
    the uncovered edge filled with its nearest pixels (data.fill_mode=nearest); numpy alone."""
    h, w = x.shape[:2]
    padded = np.pad(x, ((abs(down),) * 2, (abs(right),) * 2, (0, 0)), mode="edge")
    top, left = abs(down) - down, abs(right) - right
    return padded[top : top + h, left : left + w]


def sigterm_when(args: list[str], line_start: str, env: dict | None = None, timeout: float = 300) -> tuple[int, str]:
    """Run the CLI and send it SIGTERM once a line starting with `line_start` is printed; its exit code and output."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        cwd=REPO,
        env=env or cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = []
    try:
        for line in proc.stdout:
            output.append(line)
            if line.startswith(line_start):
                proc.send_signal(signal.SIGTERM)
                break
        output.extend(proc.stdout)
        proc.wait(timeout=timeout)
    finally:
        proc.kill()
    return proc.returncode, "".join(output)


# The test files that take longest (the suite's --durations, 2026-12-01), scheduled first. `make test`
# hands whole files to its 2 processes (--dist loadfile) in collection order, so a long file collected
# last ran alone at the end (the kill campaign: 5 of the suite's 40 minutes); longest first keeps both busy.
LONGEST_FIRST = (
    "test_resume_e2e.py",
    "test_e2e.py",
    "test_cached_phase_e2e.py",
    "test_commands.py",
    "test_distribute.py",
    "test_kill_campaign.py",
    "test_fingerprint.py",
    "test_labels_csv_e2e.py",
    "test_early_stopping_e2e.py",
    "test_lock.py",
    "test_tracking_e2e.py",
    "test_backbones_e2e.py",
    "test_checkpoint_safety.py",
    "test_checkpoint_writer.py",
    "test_faults.py",
    "test_checkpoint.py",
)


def pytest_collection_modifyitems(items):
    """Longest files first (LONGEST_FIRST), the rest after them in their usual order; each file's own order kept."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests stay in order
