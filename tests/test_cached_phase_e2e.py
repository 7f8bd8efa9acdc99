"""Cached phases in real subprocesses: the same weights as uncached training, kill -9 and resume, the
defaults in bf16.

A scratch base in inference mode (its BatchNorm statistics still the initial
0 and 1) yields features of about 1e-4, on which any two head trainings look
alike. These tests use a base whose BatchNorm statistics were measured on the
tiny images, so features are of order 1 and a difference would show.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import REPO, cli_env, final_weights, from_conf, largest_difference, run_args, run_cli, settle_batchnorm

from pipeline.data.dataset import load_image, read_dataset, validation_batches
from pipeline.model import build_model
from pipeline.training.cached_phase import split_at

pytestmark = pytest.mark.e2e
# Head 2 epochs, then the top blocks (auto = mixed8 with a weights file) for 1 epoch.
# Fine-tuning uses SGD here: Adam's first steps are lr * g / |g| whatever |g| is, so a weight whose gradient
# is float noise (about 1e-9, from the base's features being computed in other batch groupings when cached)
# takes a full +-lr step in a random direction, and two equally correct runs differ by about lr. With SGD a
# difference in the features stays a difference of its own size. The head phase keeps Adam: its gradients are large.
PHASES = ["train.head.epochs=2", "train.finetune.epochs=1", "train.finetune.optimizer=sgd"]
CACHED = ["train.head.cached_views=2", "train.finetune.cached_views=1"]
# With a weights file the defaults are the fast path (2 views at mixed8, computed once for both phases);
# the exact path is one override away.
EXACT = ["train.head.cached_views=0", "train.finetune.cached_views=0", "train.finetune.reuse_head_views=false"]


@pytest.fixture(scope="module")
def calibrated_weights(tmp_path_factory, tiny_data):
    """A random InceptionV3 base whose BatchNorm moving statistics are those of the tiny images."""
    keras.utils.set_random_seed(0)
    base = keras.applications.InceptionV3(include_top=False, weights=None, input_shape=(75, 75, 3))
    decoding = from_conf("data")
    paths = sorted(tiny_data.rglob("*.jpg"))
    images = np.stack([load_image(str(p), 75, decoding.interpolation, decoding.max_pixels) for p in paths]) / 127.5 - 1
    settle_batchnorm(base, images, calls=None)  # the moving statistics become this batch's
    path = tmp_path_factory.mktemp("weights") / "calibrated.weights.h5"
    base.save_weights(str(path))
    return path


def args_for(tmp, data, weights, *extra):
    return run_args(tmp, data, f"model.weights={weights}", *PHASES, *extra)


@pytest.fixture(scope="module")
def cached_reference(tmp_path_factory, tiny_data, calibrated_weights):
    tmp = tmp_path_factory.mktemp("cached")
    result = run_cli(*args_for(tmp, tiny_data, calibrated_weights, *CACHED), cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "feature cache: computing 2 view(s)" in result.stdout and "at mixed8" in result.stdout
    return tmp, final_weights(tmp)


def test_cached_phases_end_with_the_weights_of_uncached_training(
    cached_reference, tmp_path, tiny_data, calibrated_weights
):
    # K views of a K-epoch phase are exactly the augmentations the uncached run draws
    result = run_cli(*args_for(tmp_path, tiny_data, calibrated_weights, *EXACT), cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "feature cache" not in result.stdout
    uncached = final_weights(tmp_path)
    assert largest_difference(cached_reference[1], uncached) <= 1e-5
    # ...and the comparison means something: the head moved far more than the tolerance after epoch 1,
    # and the fine-tuned blocks moved far more than it in their one epoch
    after_epoch_1, after_epoch_2 = (
        keras.models.load_model(next((tmp_path / "ckpt").glob(f"transfer_0{e}-*.h5")), compile=False) for e in (1, 2)
    )
    final = keras.models.load_model(tmp_path / "model" / "final.h5", compile=False)
    assert (
        largest_difference(
            [after_epoch_1.get_layer("predictions").kernel.numpy()], [final.get_layer("predictions").kernel.numpy()]
        )
        > 1e-4
    )
    kernels = [
        (w.numpy(), v.numpy())
        for w, v in zip(after_epoch_2.weights, final.weights, strict=True)
        if w.path.startswith("conv2d")
    ]
    assert max(float(np.abs(x - y).max()) for x, y in kernels) > 1e-4  # 7e-4 here; the runs differ by 1e-8


def test_kill_9_while_caching_and_in_the_cached_phase_then_resume_exactly(
    cached_reference, tmp_path, tiny_data, calibrated_weights
):
    args = args_for(tmp_path, tiny_data, calibrated_weights, *CACHED)
    killed = run_cli(*args, cwd=REPO, env=cli_env(PIPELINE_KILL_AT="cache_before_rename"))
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")], "a half entry is visible"

    killed = run_cli(*args, cwd=REPO, env=cli_env(PIPELINE_KILL_AT="after_manifest#1"))  # after head epoch 1
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert "feature cache: computing" in killed.stdout, "the interrupted entry must not be trusted"
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")] == []

    resumed = run_cli(*args, cwd=REPO)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resume: from checkpoint transfer_01-" in resumed.stdout
    assert "feature cache: reusing" in resumed.stdout
    assert largest_difference(cached_reference[1], final_weights(tmp_path)) <= 1e-5


def test_the_defaults_in_bf16_cache_once_for_both_phases_and_resume_exactly_mid_fine_tune(
    cached_reference, tmp_path, tiny_data, calibrated_weights
):
    """The defaults with a weights file (2 views at mixed8, computed once for both phases) under
    mixed_bfloat16, checkpointed after every batch (3 an epoch) and SIGKILLed right after the 7th
    commit, the fine-tune phase's first: the resumed run goes on inside a cached bf16 phase from a
    checkpoint's weights and optimizer slots, and ends with the uninterrupted run's weights."""
    killed_dir, whole_dir = tmp_path / "killed", tmp_path / "uninterrupted"
    settings = ["train.precision=mixed_bfloat16", "checkpoint.every_batches=1"]  # no cache settings: the defaults
    args = args_for(killed_dir, tiny_data, calibrated_weights, *settings)
    killed = run_cli(*args, cwd=REPO, env=cli_env(PIPELINE_KILL_AT="after_manifest#7"))
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert "finetune epoch 1/1" in killed.stdout, killed.stdout
    assert killed.stdout.count("feature cache: computing") == 1, killed.stdout
    assert "feature cache: computing 2 view(s) of 12 training and 6 validation images at mixed8" in killed.stdout
    assert "feature cache: pooling the 2 view(s) at mixed8 for the head phase" in killed.stdout
    entries = {p.name.rsplit("-", 1)[0]: p for p in (killed_dir / "cache").iterdir()}
    assert sorted(entries) == ["mixed8", "pool_from_mixed8"]

    # The pooled features derived from mixed8 are what the base's pooling puts out for the same images,
    # in bf16 as the run computed them (equal here; the float32 base's differ by twice their size).
    cfg = from_conf("data", dir=str(tiny_data), image_size=75, batch_size=4, workers=0)
    data = read_dataset(cfg)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = build_model(from_conf("model", weights=str(calibrated_weights)), len(data.class_names), 75)
        direct = np.asarray(split_at(model, "pool")[0].predict(validation_batches(data, cfg), verbose=0), "float32")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    derived = np.load(entries["pool_from_mixed8"] / "validation.npy")
    assert derived.shape == direct.shape == (6, 2048)
    assert np.abs(derived - direct).max() <= 1e-4 * np.abs(direct).max()
    assert np.abs(direct).max() > 0.1, "calibrated features are of order 1, so a wrong route would show"

    resumed = run_cli(*args, cwd=REPO)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert re.search(r"resume: from checkpoint transfer_03-\S*-b00001", resumed.stdout), resumed.stdout
    assert "feature cache: computing" not in resumed.stdout
    assert "feature cache: reusing" in resumed.stdout and "(2 views at mixed8)" in resumed.stdout

    whole = run_cli(*args_for(whole_dir, tiny_data, calibrated_weights, *settings), cwd=REPO)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    # The float32 tolerance holds: under mixed_bfloat16 the variables and optimizer slots stay float32
    # and are restored bit for bit, and op determinism rounds to bf16 alike in both runs. A real
    # divergence would not hide below it, since bf16 keeps 8 bits of mantissa (steps of 0.4%).
    assert largest_difference(final_weights(whole_dir), final_weights(killed_dir)) <= 1e-5
    # Control: float32 fine-tuning on views of its own (the reference, K=1 for the fine-tune phase) ends far away.
    assert largest_difference(cached_reference[1], final_weights(killed_dir)) > 1e-4
    # bf16 was in effect, and the final file loads in a fresh process: the base computes in bf16,
    # the softmax in float32, and its answers are float32 probabilities.
    script = (
        "import sys, numpy as np, keras\n"
        "m = keras.models.load_model(sys.argv[1])\n"
        "p = m.predict(np.full((1, 75, 75, 3), 128.0, 'float32'), verbose=0)\n"
        "base = m.get_layer('inception_v3')\n"
        "print(base.get_layer('conv2d').dtype_policy.name, m.get_layer('predictions').dtype_policy.name, p.dtype,"
        " round(float(p.sum()), 3))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(killed_dir / "model" / "final.h5")],
        check=False,
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-4:] == ["mixed_bfloat16", "float32", "float32", "1.0"]
