"""The backbone (model.name) with a new head; which layers train in each phase; compiling.

The model takes raw RGB pixels 0-255 and carries the backbone's scaling inside
(a Rescaling layer before the base, or the base's own preprocessing layers),
so whoever loads the saved file can feed a resized photo. What differs between
backbones is read from pipeline/backbones.py.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import keras
from keras import layers

from pipeline.backbones import BACKBONES, Backbone
from pipeline.config import ModelConfig
from pipeline.errors import ConfigError, WeightsError
from pipeline.training.epoch_metrics import imbalance_metrics

DOWNLOAD_TIMEOUT_S = 20
# The layers with moving statistics in each family of backbones.Backbone.norm (LayerNorm keeps none).
STATISTICS_LAYERS: dict[str, tuple[type[layers.BatchNormalization], ...]] = {
    "batch": (layers.BatchNormalization,),
    "layer": (),
}


def imagenet_url(backbone: Backbone) -> str:
    """Keras's download address, or PIPELINE_IMAGENET_URL: a mirror folder holding Keras's file
    names (a file server inside a firewall), or one file's full address (a dead one in the tests,
    which must fail the same way on any machine)."""
    mirror = os.environ.get("PIPELINE_IMAGENET_URL")
    if not mirror:
        return backbone.imagenet_url + backbone.imagenet_file
    return mirror if mirror.endswith(".h5") else mirror.rstrip("/") + "/" + backbone.imagenet_file


def build_model(cfg: ModelConfig, n_classes: int, image_size: int) -> keras.Model:
    """Raw pixels -> the backbone's scaling -> the base without top -> pooling, dropout, softmax."""
    backbone = BACKBONES[cfg.name]
    base = create_base(cfg, image_size)
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    x = inputs
    if backbone.scaling is not None:  # else the base scales 0-255 itself (include_preprocessing)
        s = backbone.scaling
        x = layers.Rescaling(s.scale, offset=s.offset, name=s.layer)(x)
    x = base(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(cfg.dropout, name="dropout")(x)
    # float32 whatever train.precision: a 16-bit softmax loses small probabilities (Keras's advice).
    outputs = layers.Dense(n_classes, activation="softmax", dtype="float32", name="predictions")(x)
    return keras.Model(inputs, outputs, name=f"{cfg.name}_transfer")


def create_base(cfg: ModelConfig, image_size: int) -> keras.Model:
    backbone = BACKBONES[cfg.name]
    own_scaling = {"include_preprocessing": True} if backbone.scaling is None else {}
    base = getattr(keras.applications, backbone.constructor)(
        include_top=False, weights=None, input_shape=(image_size, image_size, 3), **own_scaling
    )
    if cfg.weights is None:
        # Random BatchNorm statistics must be learnt from scratch; a faster
        # moving average lets them settle within the few hundred steps we train.
        for layer in base.layers:
            if isinstance(layer, STATISTICS_LAYERS[backbone.norm]):
                layer.momentum = cfg.random_init_bn_momentum
        return base
    path = fetch_imagenet_weights(backbone) if cfg.weights == "imagenet" else Path(cfg.weights)
    try:
        base.load_weights(str(path))
    except Exception as err:  # h5py/Keras raise many kinds for a foreign file
        raise WeightsError(
            f"model.weights={cfg.weights!r}: {path} is not {backbone.display} no-top weights ({err}). "
            f"Use a file like Keras's {backbone.imagenet_file}, or model.weights=null to train from scratch."
        ) from None
    return base


def fetch_imagenet_weights(backbone: Backbone) -> Path:
    """Keras's cached ImageNet weights, downloaded on first use; fail within seconds offline."""
    name = backbone.imagenet_file
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return Path(
            keras.utils.get_file(name, imagenet_url(backbone), cache_subdir="models", file_hash=backbone.imagenet_hash)
        )
    except Exception as err:
        cache = (
            Path(keras.config.keras_home() if hasattr(keras.config, "keras_home") else Path.home() / ".keras")
            / "models"
            / name
        )
        raise WeightsError(
            f"model.weights=imagenet: the {backbone.display} ImageNet weights could not be downloaded ({err}).\n"
            f"Either put {name} at {cache} or pass its path: model.weights=/path/to/{name}\n"
            "or train from random weights: model.weights=null"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def base_of(model: keras.Model) -> keras.Model:
    """The backbone inside the pipeline's model: its one nested model, whatever Keras named it."""
    return next(layer for layer in model.layers if isinstance(layer, keras.Model))


def scale_pixels(model: keras.Model, pixels):
    """`pixels` through the model's own layers between its input and the base (its Rescaling, if any)."""
    x = pixels
    for layer in model.layers[1 : model.layers.index(base_of(model))]:
        x = layer(x)
    return x


def resolve_unfreeze_after(value: str, pretrained: bool, name: str) -> str | None:
    """`auto` means backbone `name`'s top blocks (its cut) when pretrained, the whole base otherwise;
    `top` means its top blocks either way."""
    if value == "auto":
        return BACKBONES[name].cut if pretrained else None
    if value == "top":
        return BACKBONES[name].cut
    return None if value == "none" else value


def check_unfreeze_after(model: keras.Model, value: str, name: str) -> None:
    if value in ("auto", "none", "top"):
        return
    backbone = BACKBONES[name]
    names = [layer.name for layer in base_of(model).layers]
    if value not in names:
        raise ConfigError(
            f"train.finetune.unfreeze_after={value!r} is not a {backbone.display} layer; "
            f"use none, auto, top, or a block end such as {backbone.cut} (model.summary() of the base lists its layers)"
        )


def set_trainable(model: keras.Model, phase: str, unfreeze_after: str | None, pretrained: bool) -> None:
    """Freeze what this phase must not change.

    head: the whole base is frozen. finetune: layers after `unfreeze_after`
    train. With pretrained weights BatchNorm stays frozen, which in Keras 3
    also runs it in inference mode, so its ImageNet statistics are kept; a
    random base has no statistics worth keeping, so there BatchNorm learns.
    A LayerNorm family (backbones.Backbone.norm) has no BatchNorm: its norms
    keep no statistics and train with their block.
    """
    base = base_of(model)
    if phase == "head":
        base.trainable = False
        return
    # Every layer is set explicitly: Keras 3 does not pass `base.trainable = True`
    # down to sublayers when the base was already trainable.
    base.trainable = True
    frozen = unfreeze_after is not None
    for layer in base.layers:
        bn_kept = isinstance(layer, layers.BatchNormalization) and pretrained
        layer.trainable = not (frozen or bn_kept)
        if layer.name == unfreeze_after:
            frozen = False


def make_optimizer(
    name: str, lr: float, schedule: str = "constant", decay_steps: int = 1
) -> keras.optimizers.Optimizer:
    """The phase's optimizer; `cosine` decays the rate to 0 over the phase's steps.

    The decay follows the optimizer's step count, which checkpoints restore, so a
    resumed run continues the schedule where it stopped.
    """
    if schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(initial_learning_rate=lr, decay_steps=max(decay_steps, 1))
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=0.9)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=lr)
    return keras.optimizers.Adam(learning_rate=lr)


def compile_model(
    model: keras.Model,
    optimizer_name: str,
    lr: float,
    schedule: str = "constant",
    decay_steps: int = 1,
    label_smoothing: float = 0.0,
) -> None:
    """The phase's optimizer, the (label-smoothed) cross-entropy, and the metrics every epoch logs.

    `label_smoothing` is train.label_smoothing; accuracy and the imbalance scores
    (epoch_metrics.py) compare the argmax with the true label, so smoothing does not change them.
    """
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
    validation = traced_validation(model, loss)
    # optimizer= by keyword: positionally, a reloaded .keras file gets a different optimizer.
    # jit_compile=False: XLA was slower than plain TensorFlow on this CPU.
    model.compile(
        optimizer=make_optimizer(optimizer_name, lr, schedule, decay_steps),
        loss=loss,
        **compiled_metrics(model.output_shape[-1]),
        jit_compile=False,
    )
    keep_saved_files_portable(model)
    for name, part in validation.items():
        setattr(model, name, part)
    build_for_fit(model)


# What a traced validation step uses: Keras's private attributes (3.x) for its
# function and for the loss and metric objects whose variables it updates.
VALIDATION_PARTS = ("test_function", "_compile_loss", "_compile_metrics", "_loss_tracker")


def traced_validation(model: keras.Model, loss: keras.losses.Loss) -> dict:
    """The model's traced validation step with its loss and metrics, when a new compile can keep them; else {}.

    compile() drops the traced validation step, and the next phase's first
    epoch traced the whole forward pass again: seconds of every two-phase run
    (docs/speed.md). That step runs the model with training=False, which does
    not depend on which layers train, so a new phase (another optimizer, other
    trainable layers) can keep it, with the loss and metric objects it
    updates, as long as the loss is the same. Not under a distribution
    strategy, which compiles in its own scope.
    """
    if getattr(model, "test_function", None) is None or getattr(model, "_distribute_strategy", None) is not None:
        return {}
    if not isinstance(model.loss, keras.losses.Loss) or model.loss.get_config() != loss.get_config():
        return {}
    parts = {name: getattr(model, name, None) for name in VALIDATION_PARTS}
    return parts if all(part is not None for part in parts.values()) else {}


def build_for_fit(model: keras.Model) -> None:
    """Create the compiled model's optimizer, loss and metric variables now, before fit traces a step.

    Without a distribution strategy Keras defers this to the first trace of the
    train step, and variables created while tracing make TensorFlow trace the
    whole step a second time: for InceptionV3's full gradient graph about 20 s
    of every run's start (docs/speed.md). The variables and their order are
    those the trace would create. Built from the output's shape alone: Keras's
    own `_symbolic_build` would also run the whole model symbolically first.
    These are Keras's private attributes (3.x); where they are missing, fit
    builds everything itself, only slower. Under a distribution strategy Keras builds these
    itself before the first trace (distribute/strategy.py), inside the strategy's scope.
    """
    if getattr(model, "_distribute_strategy", None) is not None:
        return
    y = keras.KerasTensor(model.outputs[0].shape, dtype="float32")
    for part in (getattr(model, "_compile_loss", None), getattr(model, "_compile_metrics", None)):
        if part is not None and not part.built:
            part.build(y, y)
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)


def compiled_metrics(n_classes: int) -> dict:
    """compile()'s metrics: accuracy, and the imbalance scores as weighted metrics, so a distributed
    run's padding images (weight 0) go uncounted. Validation carries no class weights; in training a
    class's weight scales its whole row of the confusion matrix, which leaves balanced_accuracy as it
    is but makes the training macro_f1 a class-weighted one (val_macro_f1 is not)."""
    return {"metrics": ["accuracy"], "weighted_metrics": imbalance_metrics(n_classes)}


def keep_saved_files_portable(model: keras.Model) -> None:
    """Leave the imbalance scores out of the compile config that full-model saves record.

    A .keras file recompiles from that config when loaded, and a class of this
    package in it would make `keras.models.load_model` fail in any process that
    has not imported the package (the seed's way of reading a checkpoint). The
    config is taken now, as Keras would serialize it, without weighted_metrics.
    """
    saved = {k: v for k, v in model.get_compile_config().items() if k != "weighted_metrics"}
    model.get_compile_config = lambda: saved
