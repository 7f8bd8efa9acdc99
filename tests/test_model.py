"""InceptionV3 + head: input contract, freezing per phase, weights sources."""

from __future__ import annotations

import time

import keras
import numpy as np
import pytest
from conftest import from_conf
from keras import layers

from pipeline import model as model_module
from pipeline.errors import ConfigError, WeightsError
from pipeline.model import (
    base_of,
    build_model,
    check_unfreeze_after,
    create_base,
    resolve_unfreeze_after,
    set_trainable,
)


@pytest.fixture(scope="module")
def net():
    return build_model(from_conf("model", weights=None, dropout=0.3), n_classes=3, image_size=75)


def trainable_names(model):
    return {layer.name for layer in base_of(model).layers if layer.trainable and layer.weights}


def test_takes_raw_pixels_and_outputs_class_probabilities(net):
    assert net.input_shape == (None, 75, 75, 3) and net.output_shape == (None, 3)
    scaling = net.get_layer("inception_scaling")
    np.testing.assert_allclose(scaling(np.array([[0.0, 127.5, 255.0]])).numpy(), [[-1, 0, 1]], atol=1e-6)
    probs = net.predict(np.random.default_rng(0).uniform(0, 255, (2, 75, 75, 3)), verbose=0)
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)


def test_head_phase_trains_only_the_head(net):
    set_trainable(net, "head", None, pretrained=True)
    assert trainable_names(net) == set()
    assert {w.path.split("/")[0] for w in net.trainable_weights} == {"predictions"}


def test_finetune_after_mixed8_with_pretrained_base_keeps_batchnorm_frozen(net):
    set_trainable(net, "finetune", "mixed8", pretrained=True)
    names = trainable_names(net)
    base_layers = [layer.name for layer in base_of(net).layers]
    cut = base_layers.index("mixed8")
    assert names and all(base_layers.index(n) > cut for n in names)
    last_conv = [layer.name for layer in base_of(net).layers if isinstance(layer, layers.Conv2D)][-1]
    assert last_conv in names  # the top block's last conv trains (names depend on models built before)
    assert not any(isinstance(base_of(net).get_layer(n), layers.BatchNormalization) for n in names)


def test_finetune_of_random_base_trains_everything_including_batchnorm(net):
    set_trainable(net, "finetune", resolve_unfreeze_after("auto", pretrained=False), pretrained=False)
    assert len(trainable_names(net)) == sum(1 for layer in base_of(net).layers if layer.weights)


def test_auto_unfreeze_point():
    assert resolve_unfreeze_after("auto", True) == "mixed8"
    assert resolve_unfreeze_after("auto", False) is None
    assert resolve_unfreeze_after("none", True) is None
    assert resolve_unfreeze_after("mixed5", True) == "mixed5"


def test_unknown_unfreeze_point_names_the_key(net):
    with pytest.raises(ConfigError, match="train.finetune.unfreeze_after.*mixed8"):
        check_unfreeze_after(net, "mixed42")
    check_unfreeze_after(net, "mixed7")


def test_random_init_batchnorm_learns_quickly():
    base = create_base(from_conf("model", weights=None, random_init_bn_momentum=0.8), 75)
    bns = [layer for layer in base.layers if isinstance(layer, layers.BatchNormalization)]
    assert bns and all(layer.momentum == 0.8 for layer in bns)


@pytest.mark.parametrize("suffix", [".weights.h5", ".h5"])
def test_weights_file_is_loaded(tmp_path, suffix):
    source = keras.applications.InceptionV3(include_top=False, weights=None, input_shape=(75, 75, 3))
    path = tmp_path / f"inception_notop{suffix}"
    if suffix == ".h5":  # the legacy layout of Keras's downloaded notop file
        from keras.src.legacy.saving import legacy_h5_format

        legacy_h5_format.save_weights_to_hdf5_group(__import__("h5py").File(path, "w"), source)
    else:
        source.save_weights(str(path))
    base = create_base(from_conf("model", weights=str(path)), 75)
    np.testing.assert_array_equal(base.weights[0].numpy(), source.weights[0].numpy())


def test_foreign_weights_file_is_a_clear_error(tmp_path):
    bogus = tmp_path / "not_weights.h5"
    bogus.write_bytes(b"this is not HDF5")
    with pytest.raises(WeightsError, match="model.weights.*null"):
        create_base(from_conf("model", weights=str(bogus)), 75)


def test_imagenet_offline_fails_fast_with_both_remedies(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # no cached copy
    monkeypatch.setattr(model_module, "IMAGENET_URL", "http://127.0.0.1:9/notop.h5")
    started = time.time()
    with pytest.raises(WeightsError) as err:
        create_base(from_conf("model", weights="imagenet"), 75)
    assert time.time() - started < 30
    message = str(err.value)
    assert "model.weights" in message and "model.weights=null" in message and "/path/to/" in message
