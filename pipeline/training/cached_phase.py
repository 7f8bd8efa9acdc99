"""What a phase trains on: the full model on images, or the layers above a frozen cut on cached features.

With `cached_views` K > 0 a phase's frozen layers (the whole base in the head
phase, the base up to `unfreeze_after` when fine-tuning) run once per view and
image (feature_cache.py); the phase then trains a smaller model made of the
*same layer objects* as the full model above the cut, so the full model, its
checkpoints and the final save see every update. Its optimizer is the full
model's, built on the full model's variable order, so checkpoints store and
restore its state exactly as they do without the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from pipeline.config import Config
from pipeline.data.dataset import DataSet, train_batches, validation_batches
from pipeline.errors import ConfigError
from pipeline.model import (
    base_of,
    build_for_fit,
    compiled_metrics,
    keep_saved_files_portable,
    resolve_unfreeze_after,
    scale_pixels,
)
from pipeline.training.feature_cache import (
    Features,
    compute_features,
    derive_features,
    digest_weights,
    load_or_compute,
    make_key,
)

HEAD_CUT = "pool"  # the head phase caches the pooled base output: pooling has no weights


@dataclass
class Feed:
    """The model a phase's fit() calls, its training batches per (epoch, start batch), its validation."""

    phase: str
    model: keras.Model
    train: Callable[[int, int], keras.utils.PyDataset]
    validation: keras.utils.PyDataset


class CachedBatches(keras.utils.PyDataset):
    """Cached features of one view, in the order data.Batches serves that epoch's images."""

    def __init__(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        n_classes: int,
        batch_size: int,
        order: np.ndarray,
        start_batch: int = 0,
        class_weights: np.ndarray | None = None,
    ):
        super().__init__()
        self.features, self.labels, self.n_classes = features, labels, n_classes
        self.batch_size, self.order, self.start_batch = batch_size, order, start_batch
        self.class_weights = class_weights  # as data.Batches: the loss's per-class sample weights
        self.batches_per_epoch = -(-len(order) // batch_size)

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __getitem__(self, index: int):
        batch = index + self.start_batch
        picks = self.order[batch * self.batch_size : (batch + 1) * self.batch_size]
        y = np.eye(self.n_classes, dtype=np.float32)[self.labels[picks]]
        if self.class_weights is None:
            return np.asarray(self.features[picks]), y
        return np.asarray(self.features[picks]), y, self.class_weights[self.labels[picks]]


def make_feed(
    model: keras.Model,
    data: DataSet,
    cfg: Config,
    phase: str,
    first_epoch: int,
    unfreeze_after: str | None,
    class_weights: np.ndarray | None = None,
) -> Feed:
    """The phase's feed: cached when its `cached_views` > 0, else the images themselves.

    `first_epoch` is the phase's first overall epoch: cached view v stands for
    epoch first_epoch + v, the augmentation an uncached run would draw then.
    With train.finetune.reuse_head_views both phases use the head phase's
    views (epochs 0..K-1): one pass to the unfreeze point serves both.
    `class_weights` (class_balance.py) weigh the training batches of either kind.
    """
    views = getattr(cfg.train, phase).cached_views
    if views == 0:
        return Feed(
            phase,
            model,
            lambda epoch, start: train_batches(data, cfg.data, cfg.train.seed, epoch, start, class_weights),
            validation_batches(data, cfg.data),
        )
    reuse = cfg.train.finetune.reuse_head_views
    # The head phase comes first, so with reuse its epochs 0..K-1 name the views.
    view_start = 0 if reuse else first_epoch
    view_epochs = list(range(view_start, view_start + views))
    cut = HEAD_CUT if phase == "head" else frozen_cut(unfreeze_after)
    lower, upper = split_at(model, cut)
    if phase == "head" and reuse:
        features = pooled_from_cut(model, lower, data, cfg, view_epochs, frozen_cut(unfreeze_after))
    else:
        features = cached_features(lower, data, cfg, cut, view_epochs)
    share_compilation(upper, model)
    return Feed(
        phase,
        upper,
        lambda epoch, start: cached_train(features, data, cfg, epoch, first_epoch, start, class_weights),
        CachedBatches(
            features.validation,
            data.validation.labels,
            len(data.class_names),
            cfg.data.batch_size,
            np.arange(len(data.validation.filepaths)),
        ),
    )


def cached_features(lower: keras.Model, data: DataSet, cfg: Config, cut: str, view_epochs: list[int]) -> Features:
    """`lower`'s output for every view and validation image, from the cache or computed into it."""
    key = make_key(data, cfg.data, cfg.train.seed, cut, view_epochs, digest_weights(lower))
    features = load_or_compute(
        Path(cfg.train.cache_dir),
        key,
        lambda scratch: announce_and_compute(lower, data, cfg, view_epochs, scratch, cut),
    )
    if features.reused:
        print(f"feature cache: reusing {features.folder} ({len(view_epochs)} views at {cut})", flush=True)
    return features


def pooled_from_cut(
    model: keras.Model, pooled: keras.Model, data: DataSet, cfg: Config, view_epochs: list[int], cut: str
) -> Features:
    """The head phase's pooled features (`pooled`: pixels to the pooling), derived from the cut's cached features.

    The layers between the cut and the pooling are frozen in the head phase, so
    running them on the cut's features (inference mode, as predict does) gives
    the pooled output; the fine-tune phase then finds the cut's entry ready.
    Keyed apart from directly computed pooled features: the two routes may
    differ in the last bits.
    """
    below, _ = split_at(model, cut)
    at_cut = cached_features(below, data, cfg, cut, view_epochs)
    between = keras.Model(*pooled_above(model, cut), name="cached_between")
    derived_cut = f"{HEAD_CUT}_from_{cut}"
    key = make_key(data, cfg.data, cfg.train.seed, derived_cut, view_epochs, digest_weights(pooled))

    def derive(scratch: Path) -> None:
        print(f"feature cache: pooling the {len(view_epochs)} view(s) at {cut} for the head phase", flush=True)
        derive_features(between, at_cut, scratch)

    return load_or_compute(Path(cfg.train.cache_dir), key, derive)


def announce_and_compute(
    lower: keras.Model, data: DataSet, cfg: Config, view_epochs: list[int], scratch: Path, cut: str
) -> None:
    print(
        f"feature cache: computing {len(view_epochs)} view(s) of {len(data.train.filepaths)} training and "
        f"{len(data.validation.filepaths)} validation images at {cut} into {cfg.train.cache_dir}/",
        flush=True,
    )
    compute_features(lower, data, cfg.data, cfg.train.seed, view_epochs, scratch)


def cached_train(
    features: Features,
    data: DataSet,
    cfg: Config,
    epoch: int,
    first_epoch: int,
    start_batch: int,
    class_weights: np.ndarray | None = None,
) -> CachedBatches:
    """Epoch `epoch` trains on view (epoch - first_epoch) mod K, in the order the uncached run uses."""
    view = (epoch - first_epoch) % features.train.shape[0]
    # The same permutation data.Batches would serve in this epoch (one source of truth for the order).
    order = train_batches(data, cfg.data, cfg.train.seed, epoch).order
    return CachedBatches(
        features.train[view],
        data.train.labels,
        len(data.class_names),
        cfg.data.batch_size,
        order,
        start_batch,
        class_weights,
    )


def check_cached_cut(model: keras.Model, cfg: Config) -> None:
    """Refuse, before anything trains, an unfreeze point whose output alone cannot be cached."""
    finetune = cfg.train.finetune
    # With reuse_head_views the head phase itself computes at the unfreeze point.
    if finetune.cached_views and (finetune.epochs or finetune.reuse_head_views):
        pretrained = cfg.model.weights is not None
        split_at(model, frozen_cut(resolve_unfreeze_after(finetune.unfreeze_after, pretrained, cfg.model.name)))


def frozen_cut(unfreeze_after: str | None) -> str:
    """The unfreeze point, where a cached fine-tune (or a head phase reusing its views) caches.

    None means the whole base trains, leaving nothing frozen to cache; config.validate_finetune_cache
    refuses that combination, so reaching it here is a bug, not a user error.
    """
    if unfreeze_after is None:
        raise RuntimeError("cached features need a frozen lower part, but the whole base trains (unfreeze_after none)")
    return unfreeze_after


def split_at(model: keras.Model, cut: str) -> tuple[keras.Model, keras.Model]:
    """(lower, upper): pixels -> the cut's output, and the cut's output -> class probabilities.

    Both are views of the full model's own layers; nothing is copied. `cut`
    is HEAD_CUT or a layer of the base whose output alone feeds everything above it.
    """
    pixels = model.input
    if cut == HEAD_CUT:
        lower = keras.Model(pixels, model.get_layer(HEAD_CUT).output, name="cached_lower")
        inputs = keras.Input(lower.output.shape[1:], name="cached_features")
        x = inputs
    else:
        base = base_of(model)
        below = keras.Model(base.input, base.get_layer(cut).output)
        lower = keras.Model(pixels, below(scale_pixels(model, pixels)), name="cached_lower")
        inputs, x = pooled_above(model, cut)
    outputs = model.get_layer("predictions")(model.get_layer("dropout")(x))
    return lower, keras.Model(inputs, outputs, name="cached_upper")


def pooled_above(model: keras.Model, cut: str):
    """(input, pooled output): a new input shaped like base layer `cut`'s output, and the model's
    own layers above it up to the pooling, applied to it."""
    base = base_of(model)
    try:
        above = keras.Model(base.get_layer(cut).output, base.output, name="above_" + cut)
    except ValueError as err:  # Keras: "Graph disconnected", layers above also read earlier tensors
        raise ConfigError(
            f"train.finetune.unfreeze_after={cut!r}: the layers above it also read "
            f"tensors from below it, so its output alone cannot be cached ({err}); "
            "use a block end such as mixed7 or mixed8 (InceptionV3; other backbones: pipeline/backbones.py's cut)"
        ) from None
    inputs = keras.Input(base.get_layer(cut).output.shape[1:], name="cached_features")
    return inputs, model.get_layer(HEAD_CUT)(above(inputs))


def share_compilation(upper: keras.Model, full: keras.Model) -> None:
    """Compile `upper` with the full model's optimizer and loss, the optimizer built in the full model's order.

    Built here, before the first step, because the order of its slot
    variables is what checkpoints store: a resumed run builds it from the
    full model (checkpoint.restore), so a fresh one must too.
    """
    optimizer = full.optimizer
    if not optimizer.built:
        optimizer.build(full.trainable_variables)
    # Every trainable variable must sit above the cut: one below it would never train.
    if {id(v) for v in upper.trainable_variables} != {id(v) for v in full.trainable_variables}:
        raise ConfigError(
            "the layers above the cached cut are not exactly the layers that train; set the phase's cached_views=0"
        )
    upper.compile(optimizer=optimizer, loss=full.loss, **compiled_metrics(full.output_shape[-1]), jit_compile=False)
    keep_saved_files_portable(upper)
    build_for_fit(upper)  # its loss and metrics, as compile_model does for the full model
