"""InceptionV3 + head: input contract, freezing per phase, weights sources."""

from __future__ import annotations

import socket

import keras
import numpy as np
import pytest
from conftest import from_conf
from keras import layers

from pipeline import model as model_module
from pipeline.config import ModelConfig
from pipeline.errors import ConfigError, WeightsError
from pipeline.model import (
    base_of,
    build_model,
    check_unfreeze_after,
    compile_model,
    compiled_metrics,
    create_base,
    resolve_unfreeze_after,
    set_trainable,
)


def new_model():
    return build_model(from_conf("model", weights=None, dropout=0.3), n_classes=3, image_size=75)


@pytest.fixture(scope="module")
def net():
    """One model for the tests that only read it."""
    return new_model()


@pytest.fixture
def fresh_net():
    """A model of this test's own, for tests that change which layers train."""
    return new_model()


def trainable_names(model):
    return {layer.name for layer in base_of(model).layers if layer.trainable and layer.weights}


def after_scaling(model, x):
    """The model's answer for inputs already in Inception's -1..1: its layers after the scaling (dropout is off)."""
    features = model.get_layer("pool")(base_of(model)(x, training=False))
    return model.get_layer("predictions")(features).numpy()


def test_takes_raw_pixels_and_outputs_class_probabilities(net):
    assert net.input_shape == (None, 75, 75, 3) and net.output_shape == (None, 3)
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 75, 75, 3)).astype("float32")
    probs = net.predict(pixels, verbose=0)
    np.testing.assert_allclose(probs, after_scaling(net, pixels / 127.5 - 1), atol=1e-6)
    # ...and the comparison means something: the same layers fed the pixels unscaled answer otherwise
    assert np.abs(probs - after_scaling(net, pixels)).max() > 1e-4
    scaling = net.get_layer("inception_scaling")
    np.testing.assert_allclose(scaling(np.array([[0.0, 127.5, 255.0]])).numpy(), [[-1, 0, 1]], atol=1e-6)


def test_head_phase_trains_only_the_head(fresh_net):
    set_trainable(fresh_net, "head", None, pretrained=True)
    assert trainable_names(fresh_net) == set()
    assert {w.path.split("/")[0] for w in fresh_net.trainable_weights} == {"predictions"}


def test_finetune_after_mixed8_with_pretrained_base_keeps_batchnorm_frozen(fresh_net):
    set_trainable(fresh_net, "finetune", "mixed8", pretrained=True)
    names = trainable_names(fresh_net)
    base_layers = [layer.name for layer in base_of(fresh_net).layers]
    cut = base_layers.index("mixed8")
    assert names and all(base_layers.index(n) > cut for n in names)
    last_conv = [layer.name for layer in base_of(fresh_net).layers if isinstance(layer, layers.Conv2D)][-1]
    assert last_conv in names  # the top block's last conv trains (names depend on models built before)
    assert not any(isinstance(base_of(fresh_net).get_layer(n), layers.BatchNormalization) for n in names)


def test_finetune_of_random_base_trains_everything_including_batchnorm(fresh_net):
    set_trainable(
        fresh_net, "finetune", resolve_unfreeze_after("auto", pretrained=False, name="inception_v3"), pretrained=False
    )
    assert len(trainable_names(fresh_net)) == sum(1 for layer in base_of(fresh_net).layers if layer.weights)


def test_auto_unfreeze_point():
    assert resolve_unfreeze_after("auto", True, "inception_v3") == "mixed8"
    assert resolve_unfreeze_after("auto", False, "inception_v3") is None
    assert resolve_unfreeze_after("none", True, "inception_v3") is None
    assert resolve_unfreeze_after("mixed5", True, "inception_v3") == "mixed5"
    assert resolve_unfreeze_after("top", False, "inception_v3") == "mixed8"
    assert resolve_unfreeze_after("top", True, "efficientnetv2_b0") == "block6f_add"


def test_unknown_unfreeze_point_names_the_key(net):
    with pytest.raises(ConfigError, match="train.finetune.unfreeze_after.*mixed8"):
        check_unfreeze_after(net, "mixed42", "inception_v3")
    check_unfreeze_after(net, "mixed7", "inception_v3")
    check_unfreeze_after(net, "top", "inception_v3")


def batchnorm_gap_after(steps: int, cfg: ModelConfig) -> float:
    """How far the BatchNorms of a new base still are from their input's statistics after `steps` batches.

    Each layer is fed the same batch (mean 3, variance 4 per channel) in training mode, which is what a
    training step does to its moving statistics. The result is the worst remaining share of the distance
    from where the statistics started (mean 0, variance 1) to the batch's own: 0 settled, 1 unmoved.
    Every 16th of the 94 layers, bottom to top, keeps it quick; all of them share one setting.
    """
    base = create_base(cfg, 75)
    bns = [layer for layer in base.layers if isinstance(layer, layers.BatchNormalization)]
    assert len({layer.momentum for layer in bns}) == 1
    rng = np.random.default_rng(0)
    worst = 0.0
    for layer in bns[::16] + bns[-1:]:
        x = rng.normal(3.0, 2.0, (8, 4, 4, layer.moving_mean.shape[0])).astype("float32")
        for _ in range(steps):
            layer(x, training=True)
        mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
        worst = max(
            worst,
            float(np.max(np.abs(layer.moving_mean.numpy() - mean) / np.abs(mean))),
            float(np.max(np.abs(layer.moving_variance.numpy() - var) / np.abs(var - 1))),
        )
    return worst


def test_random_init_batchnorm_learns_quickly():
    # weights=null: the moving statistics have to be learnt, within the few hundred steps a run trains.
    steps = 25
    assert batchnorm_gap_after(steps, from_conf("model", weights=None)) < 0.1
    # Keras's own momentum (0.99) as the control: after as many steps it has not come halfway.
    assert batchnorm_gap_after(steps, from_conf("model", weights=None, random_init_bn_momentum=0.99)) > 0.5


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
    monkeypatch.setenv("PIPELINE_IMAGENET_URL", "http://127.0.0.1:9/notop.h5")
    # "Fast" without a clock: the download runs under a socket timeout, so a server that
    # accepts and then stays silent cannot hang the run; the process's default comes back after.
    timeouts, real_get_file = [], keras.utils.get_file

    def get_file(*args, **kwargs):
        timeouts.append(socket.getdefaulttimeout())
        return real_get_file(*args, **kwargs)

    monkeypatch.setattr(keras.utils, "get_file", get_file)
    default = socket.getdefaulttimeout()
    with pytest.raises(WeightsError) as err:
        create_base(from_conf("model", weights="imagenet"), 75)
    assert timeouts == [model_module.DOWNLOAD_TIMEOUT_S] and socket.getdefaulttimeout() == default
    message = str(err.value)
    assert "model.weights" in message and "model.weights=null" in message and "/path/to/" in message


@pytest.mark.parametrize("ours, traces", [(True, 1), (False, 2)])
def test_compile_model_builds_before_fit_so_the_train_step_is_traced_once(ours, traces):
    """compile_model ends with build_for_fit: the optimizer's and metrics' variables exist before fit.
    Created inside the first trace (Keras's own compile without a strategy), they make TensorFlow trace
    the whole step twice, about 20 s for InceptionV3. Keras's compile is the control: the count tells them apart."""
    inputs = keras.Input((8, 8, 3))
    x = layers.GlobalAveragePooling2D()(layers.Conv2D(4, 3)(inputs))
    model = keras.Model(inputs, layers.Dense(3, activation="softmax")(x))
    if ours:
        compile_model(model, "adam", 1e-3, "cosine", 4)
    else:
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy", metrics=["accuracy"])
    count, step = [], model.train_step
    model.train_step = lambda data: count.append(1) or step(data)
    x, y = np.random.default_rng(0).random((8, 8, 8, 3), "float32"), np.eye(3, dtype="float32")[np.arange(8) % 3]
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert len(count) == traces


@pytest.mark.parametrize("keep", [True, False])
def test_a_new_phase_keeps_the_traced_validation_step_and_validates_its_own_weights(keep):
    """compile_model keeps the traced validation step across phases (training=False does not depend on
    which layers train). Keras's compile is the control: it drops the step, which is traced again."""
    inputs = keras.Input((8, 8, 3))
    conv = layers.Conv2D(4, 3, name="conv")
    x = layers.GlobalAveragePooling2D()(layers.BatchNormalization()(conv(inputs)))
    model = keras.Model(inputs, layers.Dense(3, activation="softmax", name="head")(x))
    count, step = [], model.test_step
    model.test_step = lambda data: count.append(1) or step(data)
    rng = np.random.default_rng(0)
    x, y = rng.random((8, 8, 8, 3), "float32"), np.eye(3, dtype="float32")[np.arange(8) % 3]
    conv.trainable = False
    compile_model(model, "adam", 1e-3)
    first = model.fit(x, y, validation_data=(x, y), batch_size=4, epochs=1, verbose=0).history
    conv.trainable = True  # the next phase: another optimizer, more layers training
    if keep:
        compile_model(model, "sgd", 0.5)
    else:
        loss = keras.losses.CategoricalCrossentropy()
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss, **compiled_metrics(3), jit_compile=False)
    logs = model.fit(x, y, validation_data=(x, y), batch_size=4, epochs=1, verbose=0).history
    assert len(count) == (1 if keep else 2)
    # The kept step validates the weights as they are now, exactly as a freshly traced one does.
    fresh = keras.models.clone_model(model)
    fresh.set_weights(model.get_weights())
    compile_model(fresh, "sgd", 0.5)
    scores = fresh.evaluate(x, y, batch_size=4, verbose=0, return_dict=True)
    assert logs["val_loss"][-1] == pytest.approx(scores["loss"], abs=1e-6)
    assert logs["val_macro_f1"][-1] == pytest.approx(scores["macro_f1"], abs=1e-6)
    assert abs(logs["val_loss"][-1] - first["val_loss"][-1]) > 1e-4  # control: the weights did change
