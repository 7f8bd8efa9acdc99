"""Checkpoints: every format round-trips exactly and loads the seed's way; atomic, verified, pruned.

The store does not care what the model is, so most tests save a small model shaped like the
pipeline's (a frozen nested base with BatchNorm, pooling, dropout, a softmax head) that trains
in a second; the format tests run on InceptionV3 as well, in the slow (e2e) set.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import from_conf
from keras import layers

from pipeline.backbones import BACKBONES
from pipeline.checkpoints.store import (
    MANIFEST,
    PENDING,
    SUFFIXES,
    archive_all,
    checkpoint_stem,
    clean_leftovers,
    list_checkpoints,
    prune,
    restore,
    save_checkpoint,
    verify,
)
from pipeline.model import base_of, build_model, compile_model, set_trainable
from pipeline.state import TrainState

X = np.random.default_rng(0).uniform(0, 255, (8, 75, 75, 3)).astype("float32")
Y = np.eye(3, dtype="float32")[np.arange(8) % 3]
FINGERPRINT = {"classes": ["a", "b", "c"], "image_size": 75}


def small_model() -> keras.Model:
    """The pipeline model's structure in a few layers; the base is its one nested model, as set_trainable finds it."""
    base_input = keras.Input((75, 75, 3))
    features = layers.Activation("relu")(layers.BatchNormalization()(layers.Conv2D(8, 5, strides=5)(base_input)))
    base = keras.Model(base_input, features, name="inception_v3")
    inputs = keras.Input((75, 75, 3), name="pixels")
    x = layers.GlobalAveragePooling2D(name="pool")(base(layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)))
    outputs = layers.Dense(3, activation="softmax", name="predictions")(layers.Dropout(0.2, name="dropout")(x))
    return keras.Model(inputs, outputs, name="small_transfer")


ARCHITECTURES = {
    "small": small_model,
    "inception": lambda: build_model(from_conf("model", weights=None), 3, 75),
}
# The other backbones, at InceptionV3's 75 px (above each one's minimum): one test each, below.
OTHER_BACKBONES = sorted(set(BACKBONES) - {"inception_v3"})
for _name in OTHER_BACKBONES:
    ARCHITECTURES[_name] = lambda name=_name: build_model(from_conf("model", name=name, weights=None), 3, 75)
FORMATS = ["keras", "h5", "weights_h5", "tf_checkpoint"]


def fresh_model(kind="small"):
    """A new model of `kind`, compiled for the head phase as training compiles it."""
    model = ARCHITECTURES[kind]()
    set_trainable(model, "head", None, pretrained=False)
    compile_model(model, "adam", 1e-2)
    return model


def trained_model(kind="small", seed=0):
    """fresh_model after one epoch (2 steps): weights, optimizer slots and dropout state all moved."""
    keras.utils.set_random_seed(seed)
    model = fresh_model(kind)
    model.fit(X, Y, batch_size=4, epochs=1, verbose=0)
    return model


# The format tests run on both; InceptionV3 (its build and first fit take a while) only in the full suite.
KINDS = ["small", pytest.param("inception", marks=pytest.mark.e2e)]


@pytest.fixture(scope="module", params=KINDS)
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def source(kind):
    return trained_model(kind)


@pytest.fixture(scope="module")
def small():
    """A trained small model for the tests of the store's files, which do not depend on the model."""
    return trained_model()


def save(model, tmp_path, fmt="keras", epoch=1, logs=None, twin=None, **cfg):
    cfg = from_conf("checkpoint", dir=str(tmp_path), format=fmt, **cfg)
    logs = logs or {"loss": 1.0, "accuracy": 0.5, "val_loss": 1.1, "val_accuracy": 0.25 + epoch / 100}
    state = TrainState(phase="head", phase_epoch=epoch, epoch=epoch)
    stem = checkpoint_stem(cfg, state, logs)
    return save_checkpoint(model, cfg, stem, state, logs, FINGERPRINT, twin)


def assert_same_weights(a, b):
    assert len(a.weights) == len(b.weights)
    for wa, wb in zip(a.weights, b.weights, strict=True):
        np.testing.assert_array_equal(wa.numpy(), wb.numpy())


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_round_trips_weights_optimizer_and_dropout_state(tmp_path, source, kind, fmt):
    assert_round_trip(tmp_path, source, kind, fmt)


@pytest.mark.e2e
@pytest.mark.parametrize("kind", OTHER_BACKBONES)
def test_every_format_round_trips_for_the_other_backbones(tmp_path, kind):
    """The same round trip for each other backbone, and the seed's load_model of its full-model files."""
    source = trained_model(kind)
    for fmt in FORMATS:
        assert_round_trip(tmp_path / fmt, source, kind, fmt)
    for fmt in ("keras", "h5"):
        ckpt = list_checkpoints(tmp_path / fmt)[-1]
        if fmt == "h5" and not BACKBONES[kind].h5_config_loads:
            continue  # Keras cannot rebuild it from the .h5's config (test_backbones.py); restore above could
        loaded = keras.models.load_model(tmp_path / fmt / (ckpt.stem + SUFFIXES[fmt]))
        # Called, not predict(): the same answers without tracing each network (3 s apiece).
        np.testing.assert_allclose(loaded(X, training=False), source(X, training=False), atol=1e-5)


def assert_round_trip(tmp_path, source, kind, fmt):
    """`source` saved in `fmt` and restored into a fresh model: weights, optimizer slots, dropout's state."""
    twin = ARCHITECTURES[kind]() if fmt == "tf_checkpoint" else None
    ckpt = save(source, tmp_path, fmt, twin=twin)
    assert ckpt.stem == "transfer_01-0.26"
    assert (tmp_path / (ckpt.stem + SUFFIXES[fmt] + ("" if fmt != "tf_checkpoint" else ".index"))).exists()
    assert verify(ckpt) is None
    model = fresh_model(kind)
    restore(model, list_checkpoints(tmp_path)[-1])
    assert_same_weights(source, model)
    for a, b in zip(source.optimizer.variables, model.optimizer.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert model.optimizer.iterations.numpy() == 2
    np.testing.assert_array_equal(
        source.get_layer("dropout").seed_generator.state.numpy(),
        model.get_layer("dropout").seed_generator.state.numpy(),
    )


@pytest.mark.parametrize("fmt", ["keras", "h5"])
def test_full_model_checkpoints_load_with_load_model(tmp_path, source, fmt):
    ckpt = save(source, tmp_path, fmt)
    loaded = keras.models.load_model(tmp_path / (ckpt.stem + SUFFIXES[fmt]))
    np.testing.assert_allclose(loaded.predict(X, verbose=0), source.predict(X, verbose=0), atol=1e-6)


def test_weights_h5_loads_with_load_weights(tmp_path, source, kind):
    ckpt = save(source, tmp_path, "weights_h5")
    model = ARCHITECTURES[kind]()
    model.load_weights(tmp_path / (ckpt.stem + ".weights.h5"))
    assert_same_weights(source, model)


def test_tf_checkpoint_loads_with_latest_checkpoint_into_a_compiled_model(tmp_path, source, kind):
    twin = ARCHITECTURES[kind]()
    save(source, tmp_path, "tf_checkpoint", epoch=1, twin=twin)
    save(source, tmp_path, "tf_checkpoint", epoch=2, twin=twin)
    latest = tf.train.latest_checkpoint(str(tmp_path))
    assert latest.endswith("transfer_02-0.27.ckpt")
    # the seed's reader: a model of the same architecture, here compiled and trained with
    # another set of trainable layers (the base's last two and the head, not the writer's head
    # alone; not the whole base, whose gradient takes InceptionV3 half a minute to trace) and
    # another optimizer, so its optimizer's variables differ from the writer's
    reader = ARCHITECTURES[kind]()
    set_trainable(reader, "finetune", base_of(reader).layers[-3].name, pretrained=False)
    compile_model(reader, "sgd", 1e-3)
    reader.fit(X, Y, epochs=1, verbose=0)
    assert 0 < len(reader.trainable_weights) < len(reader.weights)
    tf.train.Checkpoint(model=reader).restore(latest)
    assert_same_weights(source, reader)


def test_tf_checkpoint_passes_the_tutorial_restore_with_its_assertion(tmp_path, source, kind):
    # TensorFlow's tutorial line, into a plain model of the same architecture: every Python
    # object must be bound, tf.train.Checkpoint's own save_counter included.
    save(source, tmp_path, "tf_checkpoint", twin=ARCHITECTURES[kind]())
    model = ARCHITECTURES[kind]()
    status = tf.train.Checkpoint(model=model).restore(tf.train.latest_checkpoint(str(tmp_path)))
    status.assert_existing_objects_matched()
    assert_same_weights(source, model)
    # and our own restore of the same checkpoint (model plus optimizer state) still works
    resumed = fresh_model(kind)
    restore(resumed, list_checkpoints(tmp_path)[-1])
    assert_same_weights(source, resumed)


def test_flipped_byte_and_missing_file_fail_verification(tmp_path, small):
    ckpt = save(small, tmp_path, "weights_h5")
    path = tmp_path / (ckpt.stem + ".weights.h5")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert "checksum" in verify(ckpt)
    path.unlink()
    assert "missing" in verify(ckpt)


def test_uncommitted_files_are_invisible_and_cleaned_up(tmp_path, small):
    ckpt = save(small, tmp_path, "weights_h5")
    # simulate a save killed after its files were renamed in but before its manifest
    (tmp_path / "transfer_02-0.27.weights.h5").write_bytes(b"partial")
    (tmp_path / ("transfer_02-0.27" + PENDING)).write_text(json.dumps({"files": ["transfer_02-0.27.weights.h5"]}))
    (tmp_path / ".incoming-xyz").mkdir()
    (tmp_path / "my_own_notes.txt").write_text("not ours")
    assert [c.stem for c in list_checkpoints(tmp_path)] == [ckpt.stem]
    clean_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [ckpt.stem + MANIFEST, ckpt.stem + ".weights.h5", ckpt.stem + ".state.npz", "my_own_notes.txt"]
    )


def test_prune_keeps_the_newest_and_the_best(tmp_path, small):
    for epoch in range(1, 6):
        save(small, tmp_path, "weights_h5", epoch=epoch)
    prune(tmp_path, keep_last=2, best_stem="transfer_02-0.27")
    assert [c.stem for c in list_checkpoints(tmp_path)] == ["transfer_02-0.27", "transfer_04-0.29", "transfer_05-0.30"]
    assert len(list(tmp_path.glob("*.weights.h5"))) == 3


def test_a_pattern_without_epoch_never_overwrites(tmp_path, small):
    first = save(small, tmp_path, "weights_h5", epoch=1, filename="model")
    second = save(small, tmp_path, "weights_h5", epoch=2, filename="model")
    assert first.stem != second.stem and len(list_checkpoints(tmp_path)) == 2


def test_archive_moves_everything_aside_and_deletes_nothing(tmp_path, small):
    save(small, tmp_path, "weights_h5")
    before = sorted(p.name for p in tmp_path.iterdir())
    target = archive_all(tmp_path)
    assert target.parent == tmp_path / "archive"
    assert sorted(p.name for p in target.iterdir()) == before
    assert list_checkpoints(tmp_path) == []
