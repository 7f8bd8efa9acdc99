"""Class imbalance (issue 15, items 1, 2 and 7): class weights, the per-epoch scores for imbalanced
sets, and label smoothing, on small real objects; the kill -9 resume with them is in test_resume_e2e.py."""

from __future__ import annotations

import copy
import zipfile

import keras
import numpy as np
import pytest
import yaml
from conftest import composed_defaults, data_config, from_conf

from pipeline.config import validate
from pipeline.data.dataset import DataSet, Split, read_dataset, train_batches
from pipeline.defaults import compose_config
from pipeline.errors import ConfigError
from pipeline.model import compile_model
from pipeline.reports.console import print_startup
from pipeline.reports.metrics import class_scores, confusion_matrix
from pipeline.reports.report import data_section
from pipeline.train import weigh_classes
from pipeline.training.cached_phase import CachedBatches
from pipeline.training.class_balance import class_weights, imbalance_warning
from pipeline.training.early_stopping import resolve_mode
from pipeline.training.epoch_metrics import BalancedAccuracy, MacroF1, last_confusion

NAMES = ["cat", "dog", "fox"]

# ---- the scores, against a count by hand ------------------------------------

# 10 validation images in 3 batches: true and predicted classes.
TRUE = np.array([0, 0, 0, 0, 0, 0, 1, 1, 2, 2])
PREDICTED = np.array([0, 0, 0, 0, 0, 1, 1, 0, 0, 0])
BATCHES = [slice(0, 4), slice(4, 8), slice(8, 10)]


def one_hot(labels, n=3):
    return np.eye(n, dtype=np.float32)[labels]


def probabilities(labels):
    """Softmax-like rows whose largest entry is `labels`."""
    return 0.1 + 0.7 * one_hot(labels)


def epoch_score(metric, batches=BATCHES, weights=None):
    metric.reset_state()
    for part in batches:
        w = None if weights is None else weights[part]
        metric.update_state(one_hot(TRUE[part]), probabilities(PREDICTED[part]), sample_weight=w)
    return float(metric.result())


def test_macro_f1_and_balanced_accuracy_are_those_of_the_whole_epoch_counted_by_hand():
    # By hand: cat 5 of 6 right, predicted 8 times: P 5/8, R 5/6, F1 2*5/(6+8) = 10/14.
    # dog 1 of 2 right, predicted twice: F1 2*1/(2+2) = 1/2. fox never right: F1 0, recall 0.
    macro_f1 = (10 / 14 + 1 / 2 + 0) / 3
    balanced = (5 / 6 + 1 / 2 + 0) / 3
    assert epoch_score(MacroF1(3)) == pytest.approx(macro_f1, abs=1e-6)
    assert epoch_score(BalancedAccuracy(3)) == pytest.approx(balanced, abs=1e-6)
    # The same as the report's count (reports/metrics.py) of the same predictions.
    scores = class_scores(confusion_matrix(TRUE, PREDICTED, 3))
    assert epoch_score(MacroF1(3)) == pytest.approx(scores.f1.mean(), abs=1e-6)
    # Control: the mean of per-batch values, what a batch-averaged metric would log, differs.
    per_batch = np.mean([epoch_score(MacroF1(3), [part]) for part in BATCHES])
    assert abs(per_batch - macro_f1) > 0.05


def test_scores_leave_out_a_class_without_images_and_images_of_weight_0():
    # Only cat and dog images: fox (never true, never predicted) is not averaged in as a 0.
    metric = BalancedAccuracy(3)
    metric.update_state(one_hot([0, 0, 1, 1]), probabilities([0, 1, 1, 1]))
    assert float(metric.result()) == pytest.approx((1 / 2 + 1) / 2)
    # Weight 0 (a distributed run's padding): the last three images are not counted.
    weights = np.ones(len(TRUE), dtype=np.float32)
    weights[-3:] = 0
    scores = class_scores(confusion_matrix(TRUE[:-3], PREDICTED[:-3], 3))
    present = scores.support > 0
    assert epoch_score(MacroF1(3), weights=weights) == pytest.approx(scores.f1[present].mean(), abs=1e-6)
    assert epoch_score(MacroF1(3)) != pytest.approx(scores.f1[present].mean(), abs=1e-3)  # they counted


def test_mode_auto_maximises_the_scores_and_minimises_losses():
    assert [resolve_mode(m, "auto") for m in ("val_macro_f1", "val_balanced_accuracy", "val_accuracy")] == ["max"] * 3
    assert resolve_mode("val_loss", "auto") == "min" and resolve_mode("val_macro_f1", "min") == "min"


# ---- the class weights --------------------------------------------------------


def test_balanced_weights_are_n_over_k_n_c_and_a_mapping_defaults_to_1():
    counts = [150, 30, 10]
    np.testing.assert_allclose(class_weights("balanced", NAMES, counts), [190 / 450, 190 / 90, 190 / 30], rtol=1e-6)
    np.testing.assert_allclose(class_weights({"fox": 4, "dog": 0.5}, NAMES, counts), [1, 0.5, 4])
    assert class_weights("none", NAMES, counts) is None


def test_a_mapping_with_unknown_class_names_is_refused_naming_them():
    with pytest.raises(ConfigError) as refused:
        class_weights({"cat": 2, "wolf": 3, "bear": 1}, NAMES, [5, 5, 5])
    message = str(refused.value)
    assert "\n" not in message and "train.class_weight" in message
    assert "bear, wolf" in message and "cat, dog, fox" in message


@pytest.mark.parametrize(
    "override, named",
    [
        ("train.class_weight=balance", "train.class_weight='balance'"),
        ("train.class_weight={cat:0}", "the weight of class 'cat' is 0"),
        ("train.class_weight={cat:heavy}", "the weight of class 'cat' is 'heavy'"),
        ("train.label_smoothing=1.0", "train.label_smoothing=1.0 must be in [0, 1)"),
        ("train.label_smoothing=-0.1", "train.label_smoothing=-0.1"),
    ],
)
def test_bad_settings_are_refused_by_key(override, named):
    key, value = override.split("=", 1)
    cfg = copy.deepcopy(composed_defaults())
    setattr(cfg.train, key.split(".")[1], yaml.safe_load(value.replace(":", ": ")))  # as Hydra parses it
    with pytest.raises(ConfigError) as refused:
        validate(cfg)
    assert named in str(refused.value) and "\n" not in str(refused.value)


def test_the_scores_can_be_the_checkpoint_monitor_and_fill_the_filename(tmp_path):
    filename = "checkpoint.filename='t_{val_balanced_accuracy:.2f}'"
    cfg = compose_config([f"data.dir={tmp_path}", "checkpoint.monitor=val_macro_f1", filename])
    assert cfg.checkpoint.monitor == "val_macro_f1"
    with pytest.raises(ConfigError, match="checkpoint.monitor='val_f1'"):  # control: an unknown name
        compose_config([f"data.dir={tmp_path}", "checkpoint.monitor=val_f1"])


def test_a_strong_imbalance_warns_with_the_counts_and_suggests_balanced():
    warning = imbalance_warning("none", NAMES, [150, 30, 50])
    assert warning and "cat has 150" in warning and "dog 30" in warning and "train.class_weight=balanced" in warning
    assert imbalance_warning("none", NAMES, [90, 31, 50]) is None  # below 3x
    assert imbalance_warning("balanced", NAMES, [150, 30, 50]) is None  # already weighted


def imbalanced_data(root, counts=(6, 2, 2)) -> DataSet:
    """A DataSet whose training split has `counts` images per class (no files needed)."""
    labels = np.repeat(np.arange(3), counts)
    split = Split([str(root / f"{i}.jpg") for i in range(len(labels))], labels, str(root))
    return DataSet(NAMES, split, Split([], np.zeros(0, dtype=np.int64), str(root)), augmenter=None)


def test_weights_are_printed_at_start_and_written_in_the_report(tmp_path, capsys):
    cfg = compose_config([f"data.dir={tmp_path}", "train.class_weight=balanced", "train.label_smoothing=0.1"])
    data = imbalanced_data(tmp_path, (6, 2, 2))
    data.validation = data.train
    weights = weigh_classes(cfg, data)
    print_startup(cfg, data, [], "starting fresh", None, None, weights)
    out = capsys.readouterr().out
    assert "loss: cross-entropy, label smoothing 0.1, class weights balanced: cat 0.556, dog 1.67, fox 1.67" in out
    assert "warning" not in out  # weighted already
    assert "class weights balanced: cat 0.556, dog 1.67, fox 1.67" in data_section(cfg, data)
    unweighted = compose_config([f"data.dir={tmp_path}"])
    assert weigh_classes(unweighted, data) is None and "warning: the training classes are imbalanced" in (
        capsys.readouterr().out
    )


# ---- the weights in every feed, and in the loss -----------------------------------


def test_every_feed_serves_each_image_s_class_weight_and_a_resumed_epoch_the_same(tiny_data):
    cfg = data_config(tiny_data)
    data = read_dataset(cfg)
    weights = np.array([3.0, 1.0, 0.5], dtype=np.float32)
    full = train_batches(data, cfg, seed=3, epoch=1, class_weights=weights)
    x, y, w = full[0]
    np.testing.assert_array_equal(w, weights[np.argmax(y, axis=1)])
    resumed = train_batches(data, cfg, seed=3, epoch=1, start_batch=1, class_weights=weights)
    for a, b in zip(full[1], resumed[0], strict=True):
        np.testing.assert_array_equal(a, b)
    # A distributed shard: the class weight times the padding's 0/1.
    _, ys, ws = full.shard(0, 1, 3)  # 4 images in 3 parts of 2: images 3 and 4 ...
    np.testing.assert_array_equal(ws, weights[np.argmax(ys, axis=1)])
    np.testing.assert_array_equal(full.shard(0, 2, 3)[2], [0.0, 0.0])  # ... and two pads
    assert len(train_batches(data, cfg, seed=3, epoch=1)[0]) == 2  # unweighted: (x, y) as before
    # Cached features, in the same order.
    features = np.arange(len(data.train.labels), dtype=np.float32)[:, None]
    cached = CachedBatches(features, data.train.labels, 3, 4, full.order, 1, weights)
    fx, fy, fw = cached[0]
    np.testing.assert_array_equal(fw, resumed[0][2])
    np.testing.assert_array_equal(fy, resumed[0][1])


def tiny_model(seed=0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])


class WeightedFeed(keras.utils.PyDataset):
    def __init__(self, x, y, weights=None):
        super().__init__()
        self.x, self.y, self.weights = x, y, weights

    def __len__(self):
        return 2

    def __getitem__(self, i):
        part = slice(4 * i, 4 * i + 4)
        if self.weights is None:
            return self.x[part], self.y[part]
        return self.x[part], self.y[part], self.weights[np.argmax(self.y[part], axis=1)]


def test_weights_from_the_feed_train_as_keras_class_weight_does_and_change_the_training():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 4)).astype(np.float32), one_hot(np.array([0, 0, 0, 0, 0, 1, 1, 2]))
    weights = np.array([0.5, 2.0, 4.0], dtype=np.float32)
    trained = {}
    for name, feed, class_weight in [
        ("feed", WeightedFeed(x, y, weights), None),
        ("keras", WeightedFeed(x, y), dict(enumerate(weights.tolist()))),
        ("none", WeightedFeed(x, y), None),
    ]:
        model = tiny_model()
        compile_model(model, "sgd", 0.1)
        model.run_eagerly = True  # three traced fits of a 15-weight model took 25 s
        model.fit(feed, epochs=2, shuffle=False, verbose=0, class_weight=class_weight)
        trained[name] = model.get_weights()[0]
    np.testing.assert_allclose(trained["feed"], trained["keras"], atol=1e-7)
    assert np.abs(trained["feed"] - trained["none"]).max() > 1e-3  # control: the weights matter


def test_label_smoothing_spreads_the_target_over_the_classes():
    model = tiny_model()
    probs = np.array([[0.7, 0.2, 0.1]], dtype=np.float32)
    target = one_hot(np.array([0]))
    compile_model(model, "adam", 1e-3, label_smoothing=0.3)
    smoothed = float(model.loss(target, probs))
    # By hand: target (1 - 0.3) * one-hot + 0.3 / 3 = [0.8, 0.1, 0.1].
    assert smoothed == pytest.approx(-(0.8 * np.log(0.7) + 0.1 * np.log(0.2) + 0.1 * np.log(0.1)), rel=1e-5)
    compile_model(model, "adam", 1e-3)
    assert float(model.loss(target, probs)) == pytest.approx(-np.log(0.7), rel=1e-5)  # control: off by default


def test_conf_defaults_leave_training_as_it_was():
    train = from_conf("train")
    assert train.class_weight == "none" and train.label_smoothing == 0.0


def test_saved_models_name_only_keras_s_own_classes_so_any_process_loads_them(tmp_path):
    model = tiny_model()
    compile_model(model, "adam", 1e-3, label_smoothing=0.1)
    model.run_eagerly = True
    x, y = np.zeros((4, 4), dtype=np.float32), one_hot(np.array([0, 1, 2, 0]))
    logs = model.fit(x, y, validation_data=(x, y), epochs=1, verbose=0).history
    assert {"val_macro_f1", "val_balanced_accuracy"} <= set(logs)  # compiled all the same
    model.save(tmp_path / "m.keras")
    with zipfile.ZipFile(tmp_path / "m.keras") as saved:
        config = saved.read("config.json").decode()
    assert '"label_smoothing": 0.1' in config and "pipeline" not in config


def test_after_fit_the_last_validation_pass_s_confusion_matrix_is_what_the_model_predicts():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(12, 4)).astype(np.float32), one_hot(np.array([0, 1, 2] * 4))
    xv, labels = rng.normal(size=(9, 4)).astype(np.float32), np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    model = tiny_model()
    compile_model(model, "sgd", 0.5)
    model.run_eagerly = True
    assert not last_confusion(model).any()  # nothing evaluated yet
    model.fit(x, y, validation_data=(xv, one_hot(labels)), batch_size=4, epochs=2, shuffle=False, verbose=0)
    predicted = np.argmax(model.predict(xv, verbose=0), axis=1)
    expected = confusion_matrix(labels, predicted, 3)
    assert np.array_equal(last_confusion(model), expected)
    assert len(set(predicted.tolist())) > 1  # a matrix with more than one column to get right
    assert last_confusion(keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])) is None
