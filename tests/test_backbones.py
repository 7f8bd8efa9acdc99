"""The backbone table (pipeline/backbones.py) against conf/model/ and against the networks Keras builds."""

from __future__ import annotations

import dataclasses
import json
import socket

import keras
import numpy as np
import pytest
from conftest import REPO, assert_exports_answer, composed_defaults, from_conf, run_cli, settle_batchnorm
from keras import layers

from pipeline.backbones import BACKBONES
from pipeline.checkpoints.fingerprint import differences
from pipeline.config import validate
from pipeline.data.dataset import read_dataset
from pipeline.defaults import compose_config
from pipeline.errors import ConfigError, WeightsError
from pipeline.model import base_of, build_model, create_base
from pipeline.model_file.load import load_model, read_model_info
from pipeline.model_file.save import save_final
from pipeline.train import make_fingerprint
from pipeline.training.cached_phase import split_at

MODEL_CONFS = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))
# What each backbone's ImageNet weights expect of raw 0-255 pixels (Keras's documentation of each
# family's preprocess_input): (x - mean) / std per channel. Written here apart from the table, so a
# wrong or doubled scaling in the table or the model shows.
IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
EXPECTED_INPUT = {
    "inception_v3": (127.5, 127.5),  # -1..1
    "resnet50v2": (127.5, 127.5),
    "mobilenet_v3_large": (127.5, 127.5),
    "efficientnetv2_b0": (255 * IMAGENET_MEAN, 255 * IMAGENET_STD),
    "convnext_tiny": (255 * IMAGENET_MEAN, 255 * IMAGENET_STD),
}


def min_size(name: str) -> int:
    return BACKBONES[name].min_size


@pytest.fixture(scope="module")
def models():
    """Every backbone with the pipeline's head, built once at its minimum size with random weights."""
    return {
        name: build_model(from_conf("model", name=name, weights=None), 3, min_size(name)) for name in sorted(BACKBONES)
    }


def test_every_model_conf_names_an_entry_and_every_entry_has_a_conf():
    assert MODEL_CONFS == sorted(BACKBONES)
    for name in MODEL_CONFS:
        cfg = compose_config([f"data.dir={REPO / 'data'}", f"model={name}", f"data.image_size={min_size(name)}"])
        assert cfg.model.name == name
        # its own default save path, named for its network as the seed's InceptionV3 file is
        assert cfg.model.save_path == f"model/my_saved_{BACKBONES[name].display}_model.h5"
    assert composed_defaults().model.name == "inception_v3"


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_the_cut_is_a_layer_whose_output_alone_feeds_the_top(models, name):
    model = models[name]
    cut = BACKBONES[name].cut
    lower, upper = split_at(model, cut)  # raises if the layers above also read tensors below the cut
    x = np.random.default_rng(0).uniform(0, 255, (2, *model.input_shape[1:])).astype("float32")
    np.testing.assert_allclose(upper(lower(x)).numpy(), model(x).numpy(), atol=1e-5)
    # the top blocks: a part of the base above the cut, not nothing and not all of it
    names = [layer.name for layer in base_of(model).layers]
    assert 0.5 * len(names) < names.index(cut) < len(names) - 2


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_the_norm_family_is_the_one_the_network_uses(models, name):
    kinds = {type(layer) for layer in base_of(models[name]).layers}
    for sub in base_of(models[name]).layers:  # ConvNeXt's stem and downsampling are nested Sequentials
        if isinstance(sub, keras.Model):
            kinds |= {type(layer) for layer in sub.layers}
    has_batch, has_layer = layers.BatchNormalization in kinds, layers.LayerNormalization in kinds
    assert (has_batch, has_layer) == ((True, False) if BACKBONES[name].norm == "batch" else (False, True))


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_raw_pixels_are_scaled_as_the_imagenet_weights_expect(models, name):
    """The layers before the first weighted one turn 0-255 into the family's input; nothing is a Lambda."""
    model, base = models[name], base_of(models[name])
    scaling = model.layers[1 : model.layers.index(base)] + [
        layer for layer in base.layers[1:4] if isinstance(layer, (layers.Rescaling, layers.Normalization))
    ]
    assert scaling and all(isinstance(layer, (layers.Rescaling, layers.Normalization)) for layer in scaling)
    pixels = np.array([[[[0.0, 127.5, 255.0], [255.0, 0.0, 127.5]]]], dtype="float32")
    x = pixels
    for layer in scaling:
        x = layer(x)
    mean, std = EXPECTED_INPUT[name]
    np.testing.assert_allclose(np.asarray(x), (pixels - mean) / std, atol=1e-4)
    assert np.abs(np.asarray(x) - pixels).max() > 1  # the mapping is not the identity


def test_a_size_below_the_backbone_minimum_is_refused_naming_the_key():
    small = dataclasses.replace(
        composed_defaults(), model=from_conf("model", name="efficientnetv2_b0"), data=from_conf("data", image_size=31)
    )
    with pytest.raises(ConfigError, match=r"data.image_size=31 must be >= 32 \(EfficientNetV2B0 needs at least 32 px"):
        validate(small)
    validate(dataclasses.replace(small, data=from_conf("data", image_size=32)))
    # InceptionV3 keeps its own minimum
    with pytest.raises(ConfigError, match="InceptionV3 needs at least 75 px"):
        validate(dataclasses.replace(small, model=from_conf("model"), data=from_conf("data", image_size=74)))


def test_the_command_refuses_a_small_size_in_one_line(tmp_path):
    result = run_cli("model=convnext_tiny", "data.image_size=16", f"data.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "data.image_size=16" in result.stderr and "ConvNeXtTiny needs at least 32 px" in result.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_the_fingerprint_holds_the_backbone(tiny_data):
    """Another backbone's checkpoints cannot continue a run: their weights would not even fit."""
    default = compose_config(["experiment=smoke", f"data.dir={tiny_data}"])
    data = read_dataset(default.data)
    other = dataclasses.replace(default, model=dataclasses.replace(default.model, name="efficientnetv2_b0"))
    changed = differences(make_fingerprint(default, data), make_fingerprint(other, data), "head")
    assert changed == {"architecture": ("InceptionV3+GAP+dropout+dense", "EfficientNetV2B0+GAP+dropout+dense")}


def test_an_unknown_backbone_name_is_refused():
    cfg = dataclasses.replace(composed_defaults(), model=from_conf("model", name="vgg16"))
    with pytest.raises(ConfigError, match="model.name='vgg16'.*efficientnetv2_b0"):
        validate(cfg)


@pytest.mark.parametrize("name", ["mobilenet_v3_large", "convnext_tiny"])
def test_imagenet_offline_names_the_backbone_s_own_file(tmp_path, monkeypatch, name):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # no cached copy
    monkeypatch.setenv("PIPELINE_IMAGENET_URL", "http://127.0.0.1:9/mirror/")  # a mirror folder, unreachable
    default = socket.getdefaulttimeout()
    with pytest.raises(WeightsError) as err:
        create_base(from_conf("model", name=name, weights="imagenet"), min_size(name))
    file = BACKBONES[name].imagenet_file
    message = str(err.value)
    assert f"/mirror/{file}" in message  # the mirror folder is joined with Keras's file name
    assert f"/models/{file}" in message and f"model.weights=/path/to/{file}" in message  # the cache and the path
    assert "model.weights=null" in message and socket.getdefaulttimeout() == default


OTHER_BACKBONES = sorted(set(BACKBONES) - {"inception_v3"})


def save_final_of(model, name, path):
    config = {"model": {**dataclasses.asdict(from_conf("model", name=name)), "weights": None}}
    save_final(model, path, {"class_names": ["a", "b", "c"], "image_size": min_size(name), "config": config})


@pytest.mark.parametrize("name", OTHER_BACKBONES)
def test_the_final_model_loads_for_the_commands(models, tmp_path, name):
    """Whether Keras can rebuild the .h5's architecture is the table's h5_config_loads; either way
    the commands get the trained model back, answering as it did."""
    model = models[name]
    path = tmp_path / "final.h5"
    save_final_of(model, name, path)
    if not BACKBONES[name].h5_config_loads:  # where it is true, load_model below is Keras's own load
        with pytest.raises((ValueError, TypeError)):  # the reason the commands rebuild these
            keras.models.load_model(path, compile=False, safe_mode=True)
    info = read_model_info(path)
    assert info.backbone == name
    loaded = load_model(info)
    x = np.random.default_rng(1).uniform(0, 255, (2, *model.input_shape[1:])).astype("float32")
    np.testing.assert_allclose(loaded(x, training=False).numpy(), model(x, training=False).numpy(), atol=1e-5)
    assert json.loads(path.with_suffix(".json").read_text())["config"]["model"]["name"] == name


@pytest.mark.e2e
@pytest.mark.parametrize("name", OTHER_BACKBONES)
def test_export_serves_what_the_model_answers(models, tmp_path, name):
    """pipeline.export for each backbone: the SavedModel's serve signature and the TFLite file
    answer raw pixels as the trained model does (InceptionV3's export: test_commands.py)."""
    from pipeline.export import export, parse_args

    # A network of its own with settled BatchNorm statistics: freshly initialised, the signal fades
    # through MobileNetV3's blocks and it answers exactly 1/3 for every input, which any export matches.
    model = build_model(from_conf("model", name=name, weights=None), 3, min_size(name))
    batch = np.random.default_rng(3).uniform(0, 255, (8, *model.input_shape[1:])).astype("float32")
    settle_batchnorm(model, batch)
    path = tmp_path / "final.h5"
    save_final_of(model, name, path)
    assert export(parse_args([str(path), "--out", str(tmp_path / "served"), "--tflite"])) == 0
    assert (tmp_path / "served" / "labels.txt").read_text().split() == ["a", "b", "c"]
    x = np.random.default_rng(2).uniform(0, 255, (1, *model.input_shape[1:])).astype("float32")
    expected = model(x, training=False).numpy()
    assert_exports_answer(tmp_path / "served", tmp_path / "final.tflite", x, expected)
    # Control: the answers differ between inputs, so agreeing above is not agreeing on a constant.
    other = model(x[:, ::-1], training=False).numpy()
    assert np.abs(other - expected).max() > 1e-6


def test_gpus_grow_their_memory(monkeypatch):
    import tensorflow as tf

    from pipeline.train import grow_gpu_memory

    grown = []
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind: ["gpu:0", "gpu:1"] if kind == "GPU" else [])
    monkeypatch.setattr(tf.config.experimental, "set_memory_growth", lambda gpu, on: grown.append((gpu, on)))
    grow_gpu_memory()
    assert grown == [("gpu:0", True), ("gpu:1", True)]
