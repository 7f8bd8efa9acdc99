"""Class imbalance: the per-class loss weights train.class_weight asks for, and the warning that suggests them.

The weights reach the loss as sample weights from the feed (data.Batches,
cached_phase.CachedBatches, and each shard of a distributed batch), not through
`fit(class_weight=...)`: Keras refuses that beside the sample weights a
distributed run already carries, and a weight that is a pure function of an
image's label keeps a resumed run's batches exactly those of an uninterrupted
one. Validation is never weighted: its loss and scores stay those of the images.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import ConfigError

# largest / smallest training class at which the data check suggests train.class_weight=balanced
IMBALANCE_WARNING_RATIO = 3.0


def class_weights(setting: str | dict, class_names: list[str], counts: list[int]) -> np.ndarray | None:
    """One weight per class (in class order) for `setting`, or None for `none` (unweighted, as before).

    `balanced`: n / (k * n_c), so every class carries the same total weight and the mean
    weight per image stays 1 (the loss keeps its scale). A mapping names classes by their
    folder name; a class it leaves out keeps weight 1, as Keras's class_weight does.
    """
    if setting == "none":
        return None
    if setting == "balanced":
        n = np.asarray(counts, dtype=np.float64)
        return (n.sum() / (len(n) * n)).astype(np.float32)
    assert isinstance(setting, dict)  # config.validate_class_weight allows only none, balanced or a mapping
    unknown = sorted(set(setting) - set(class_names))
    if unknown:
        raise ConfigError(
            f"train.class_weight names class(es) the training data does not have: {', '.join(unknown)}; "
            f"the classes are: {', '.join(class_names)}"
        )
    return np.asarray([float(setting.get(name, 1.0)) for name in class_names], dtype=np.float32)


def describe_weights(setting: str | dict, class_names: list[str], weights: np.ndarray | None) -> str:
    """`none`, or the setting and each class's weight, for the start-up summary and the report."""
    if weights is None:
        return "none (every image counts alike)"
    listed = ", ".join(f"{name} {w:.3g}" for name, w in zip(class_names, weights.tolist(), strict=True))
    return f"{'balanced' if setting == 'balanced' else 'by class'}: {listed}"


def imbalance_warning(setting: str | dict, class_names: list[str], counts: list[int]) -> str | None:
    """The warning for a strongly imbalanced training set trained without class weights, or None."""
    largest, smallest = int(np.argmax(counts)), int(np.argmin(counts))
    if setting != "none" or counts[smallest] == 0:
        return None
    ratio = counts[largest] / counts[smallest]
    if ratio < IMBALANCE_WARNING_RATIO:
        return None
    return (
        f"warning: the training classes are imbalanced: {class_names[largest]} has {counts[largest]} images, "
        f"{class_names[smallest]} {counts[smallest]} ({ratio:.1f}x); accuracy will favour the larger classes. "
        "Consider train.class_weight=balanced, and checkpoint.monitor=val_macro_f1 to keep the best checkpoint by it"
    )
