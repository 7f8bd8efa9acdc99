"""model=efficientnetv2_b0 in real subprocesses: a full run whose model predict loads, and kill -9 mid-fine-tune.

At its 32 px minimum, from a weights file the test writes (so unfreeze_after=auto is the
backbone's own cut, block6f_add). Both phases train on cached features, one pass to the cut
serving both (reuse_head_views): tracing a training step through the whole EfficientNet costs
minutes on a shared CPU, and the uncached path is the same code for every backbone (InceptionV3's
end-to-end tests). The other backbones are built and saved in test_backbones.py only.
"""

from __future__ import annotations

import signal

import keras
import pytest
from conftest import REPO, cli_env, final_weights, largest_difference, run_args, run_cli

from pipeline.predict import parse_args, predict

pytestmark = pytest.mark.e2e
SIZE = 32
# Head 1 epoch, fine-tune 1 epoch, 3 batches each, a checkpoint after every batch:
# saves #1, #2 (head batches), #3 (head end), #4, #5 (fine-tune batches), #6 (the end).
SETTINGS = [
    "model=efficientnetv2_b0",
    f"data.image_size={SIZE}",
    "train.head.epochs=1",
    "train.finetune.epochs=1",
    # 1e-3 rather than the pretrained 1e-4: the cosine's last step (a quarter of it) must move the
    # weights well past the tolerance for the control below to mean something.
    "train.finetune.lr=0.001",
    "train.head.cached_views=1",
    "train.finetune.cached_views=1",
    "train.finetune.reuse_head_views=true",
    "checkpoint.every_batches=1",
]


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """No-top EfficientNetV2B0 weights, as Keras's ImageNet file would give them (random here: no download)."""
    keras.utils.set_random_seed(0)
    base = keras.applications.EfficientNetV2B0(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    path = tmp_path_factory.mktemp("weights") / "efficientnetv2-b0_notop.weights.h5"
    base.save_weights(str(path))
    return path


def args_for(tmp, data, weights):
    return run_args(tmp, data, *SETTINGS, f"model.weights={weights}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data, weights_file):
    tmp = tmp_path_factory.mktemp("efficientnet")
    result = run_cli(*args_for(tmp, tiny_data, weights_file), cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp, result.stdout


def test_a_full_run_caches_at_the_backbone_s_cut_and_predict_loads_its_model(reference, tiny_data, capsys):
    tmp, stdout = reference
    assert "model: EfficientNetV2B0 at 32 px" in stdout
    assert "feature cache: computing 1 view(s)" in stdout and "at block6f_add" in stdout
    assert "whole base" not in stdout and "base trained after block6f_add" in stdout
    images = sorted((tiny_data / "validation").rglob("*.jpg"))
    assert predict(parse_args([str(tmp / "model" / "final.h5"), *map(str, images)])) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(images)
    assert all(line.split("\t")[1] in ("circle", "square", "triangle") for line in lines)


def test_kill_9_mid_fine_tune_resumes_with_the_weights_of_the_uninterrupted_run(
    reference, tmp_path, tiny_data, weights_file
):
    args = args_for(tmp_path, tiny_data, weights_file)
    # committed the fine-tune phase's second batch, then killed
    first = run_cli(*args, cwd=REPO, env=cli_env(PIPELINE_KILL_AT="after_manifest#5"))
    assert first.returncode == -signal.SIGKILL, first.stdout + first.stderr
    second = run_cli(*args, cwd=REPO)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resume: from checkpoint transfer_02-nan-b00002" in second.stdout
    assert "feature cache: reusing" in second.stdout  # the cut's features survive the kill
    reference_weights = final_weights(reference[0])
    assert largest_difference(reference_weights, final_weights(tmp_path)) <= 1e-5
    # ...and the comparison means something: one batch short of the end is 10x the tolerance away
    one_short = keras.models.load_model(next((tmp_path / "ckpt").glob("transfer_02-nan-b00002.h5")), compile=False)
    assert largest_difference(reference_weights, [w.numpy() for w in one_short.weights]) > 1e-4
