"""Scores for imbalanced sets as Keras metrics: macro-F1 and balanced accuracy, exact over a whole epoch.

Accuracy flatters the larger classes: a model that always answers the largest
class scores its share. Macro-F1 (the mean of the per-class F1) and balanced
accuracy (the mean per-class recall) weigh every class alike. Both are
functions of the confusion matrix, so each metric keeps one, summed over every
batch of the epoch and scored once at its end: the value is that of the whole
validation set, not an average of per-batch values (which would differ). They
are compiled beside accuracy (model.compile_model), so Keras's own validation
pass in fit computes them; no second pass over the images.

They are counted the way reports/metrics.py counts (an image's class is its
largest probability; a class without images is left out of the mean; a class
never predicted has precision 0), so the report's figures and the logs agree.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

# history.csv, TensorBoard, the report and checkpoint.monitor know them by these names (val_ prefixed).
MACRO_F1 = "macro_f1"
BALANCED_ACCURACY = "balanced_accuracy"


class ConfusionScore(keras.metrics.Metric):
    """A score of the confusion matrix summed over the epoch (rows true, columns predicted).

    Given as a weighted metric: a sample weight of 0 (the padding a distributed
    run adds to short shards) leaves an image uncounted; other weights scale its count.
    """

    def __init__(self, n_classes: int, name: str, **kwargs):
        super().__init__(name=name, **kwargs)
        self.n_classes = n_classes
        # float32 counts are exact up to 2**24 images per cell.
        self.matrix = self.add_variable(shape=(n_classes, n_classes), initializer="zeros", name="matrix")

    def update_state(self, y_true, y_pred, sample_weight=None):
        true = ops.one_hot(ops.argmax(y_true, axis=-1), self.n_classes, dtype="float32")
        predicted = ops.one_hot(ops.argmax(y_pred, axis=-1), self.n_classes, dtype="float32")
        if sample_weight is not None:
            true = true * ops.reshape(ops.cast(sample_weight, "float32"), (-1, 1))
        self.matrix.assign_add(ops.matmul(ops.transpose(true), predicted))

    def reset_state(self):
        self.matrix.assign(ops.zeros((self.n_classes, self.n_classes), dtype="float32"))

    def per_class(self):
        """(hits, predicted, support) per class, and the mask of classes with images."""
        hits = ops.diagonal(self.matrix)
        support = ops.sum(self.matrix, axis=1)
        return hits, ops.sum(self.matrix, axis=0), support, ops.cast(support > 0, "float32")

    def get_config(self):
        return {"n_classes": self.n_classes, "name": self.name}


class BalancedAccuracy(ConfusionScore):
    """The mean over classes (those with images) of the share of each class's images predicted as it."""

    def __init__(self, n_classes: int, name: str = BALANCED_ACCURACY, **kwargs):
        super().__init__(n_classes, name, **kwargs)

    def result(self):
        hits, _, support, present = self.per_class()
        recall = ops.divide_no_nan(hits, support)
        return ops.divide_no_nan(ops.sum(recall * present), ops.sum(present))


class MacroF1(ConfusionScore):
    """The mean over classes (those with images) of F1 = 2 hits / (images of the class + predictions of it)."""

    def __init__(self, n_classes: int, name: str = MACRO_F1, **kwargs):
        super().__init__(n_classes, name, **kwargs)

    def result(self):
        hits, predicted, support, present = self.per_class()
        # 2PR/(P+R) written with counts: the same value, and 0 where a class has neither.
        f1 = ops.divide_no_nan(2 * hits, support + predicted)
        return ops.divide_no_nan(ops.sum(f1 * present), ops.sum(present))


def last_confusion(model: keras.Model) -> np.ndarray | None:
    """The confusion matrix (counts, rows true) of the model's last evaluation, or None if it counts none.

    After fit, that is its last validation pass: Keras resets the compiled
    metrics when an evaluation starts and leaves them as they are at its end.
    """
    for metric in model.metrics:
        for part in getattr(metric, "metrics", [metric]):  # Keras's CompileMetrics holds the compiled ones
            if isinstance(part, ConfusionScore):
                return np.rint(part.matrix.numpy()).astype(np.int64)
    return None


def imbalance_metrics(n_classes: int) -> list[keras.metrics.Metric]:
    """Fresh metric objects for one compile (weighted_metrics=): Keras keeps one state per object."""
    return [MacroF1(n_classes), BalancedAccuracy(n_classes)]
