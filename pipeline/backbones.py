"""Every backbone `model.name` selects: its Keras constructor, scaling, minimum size, cut layer and norm handling.

One table, the only place a backbone's facts are written; the code reads them
from here and never asks which backbone it has. TensorFlow-free, so config.py
checks a run's settings against it before TensorFlow starts. Adding a
backbone is one entry here and one conf/model/<name>.yaml (its defaults:
weights, dropout, save path).
"""

from __future__ import annotations

from dataclasses import dataclass

KERAS_WEIGHTS = "https://storage.googleapis.com/tensorflow/keras-applications/"


@dataclass(frozen=True)
class Scaling:
    """A Rescaling layer the pipeline puts before a base that has no preprocessing of its own: x * scale + offset."""

    layer: str  # its name in the model (the saved file keeps it)
    scale: float
    offset: float


@dataclass(frozen=True)
class Backbone:
    constructor: str  # keras.applications.<constructor>(include_top=False, ...)
    display: str  # the name in messages, the report and the default save path
    min_size: int  # px: the smallest data.image_size the constructor accepts
    # train.finetune.unfreeze_after=auto with pretrained weights: the layer after which the
    # top blocks train. Its output alone must feed everything above it (cached features start there).
    cut: str
    # None: the constructor's own include_preprocessing scales raw 0-255 pixels inside the base.
    scaling: Scaling | None
    # "batch": BatchNorm; its ImageNet statistics stay frozen when fine-tuning pretrained weights, and
    # from scratch they move with model.random_init_bn_momentum. "layer": LayerNorm has no statistics
    # to keep, so it trains with its block.
    norm: str
    imagenet_file: str  # Keras's file name for the no-top ImageNet weights, in ~/.keras/models/
    imagenet_url: str  # where Keras downloads it from
    imagenet_hash: str  # Keras's checksum of it (md5 or sha256)
    # False: Keras cannot rebuild this architecture from an .h5 file's stored config
    # (MobileNetV3's hard sigmoid `x + 3.0` is stored as an op it cannot call back; ConvNeXt's
    # LayerScale is not a registered layer), so the commands rebuild it from the metadata
    # and load only the weights from the file (model_file/load.py).
    h5_config_loads: bool = True


BACKBONES: dict[str, Backbone] = {
    "inception_v3": Backbone(
        constructor="InceptionV3",
        display="InceptionV3",
        min_size=75,
        cut="mixed8",  # the classic top two blocks (mixed9, mixed10) train
        scaling=Scaling("inception_scaling", 1 / 127.5, -1.0),
        norm="batch",
        imagenet_file="inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
        imagenet_url=KERAS_WEIGHTS + "inception_v3/",
        imagenet_hash="bcbd6486424b2319ff4ef7d526e38f63",
    ),
    "resnet50v2": Backbone(
        constructor="ResNet50V2",
        display="ResNet50V2",
        min_size=32,
        cut="conv5_block1_out",  # the top two residual blocks (conv5_block2, conv5_block3) and post_bn train
        scaling=Scaling("resnet_scaling", 1 / 127.5, -1.0),  # its preprocess_input: mode "tf", -1..1
        norm="batch",
        imagenet_file="resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
        imagenet_url=KERAS_WEIGHTS + "resnet/",
        imagenet_hash="fac2f116257151a9d068a22e544a4917",
    ),
    "efficientnetv2_b0": Backbone(
        constructor="EfficientNetV2B0",
        display="EfficientNetV2B0",
        min_size=32,
        cut="block6f_add",  # the top two blocks (block6g, block6h) and top_conv train
        scaling=None,  # Rescaling 1/255 and ImageNet mean/std Normalization inside
        norm="batch",
        imagenet_file="efficientnetv2-b0_notop.h5",
        imagenet_url=KERAS_WEIGHTS + "efficientnet_v2/",
        imagenet_hash="893217f2bb855e2983157299931e43ff",
    ),
    "mobilenet_v3_large": Backbone(
        constructor="MobileNetV3Large",
        display="MobileNetV3Large",
        min_size=32,
        cut="expanded_conv_12_project_bn",  # the top two blocks (expanded_conv_13, _14) and conv_1 train
        scaling=None,  # Rescaling to -1..1 inside
        norm="batch",
        imagenet_file="weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5",
        imagenet_url=KERAS_WEIGHTS + "mobilenet_v3/",
        imagenet_hash="07fb09a5933dd0c8eaafa16978110389",
        h5_config_loads=False,
    ),
    "convnext_tiny": Backbone(
        constructor="ConvNeXtTiny",
        display="ConvNeXtTiny",
        min_size=32,
        # The last stage (3 blocks) trains: inside a stage the residual adds are ops, not layers,
        # so the downsampling before it is the only layer whose output alone feeds the top.
        cut="convnext_tiny_downsampling_block_2",
        scaling=None,  # ImageNet mean/std Normalization of 0-255 pixels inside
        norm="layer",
        imagenet_file="convnext_tiny_notop.h5",
        imagenet_url=KERAS_WEIGHTS + "convnext/",
        imagenet_hash="d547c096cabd03329d7be5562c5e14798aa39ed24b474157cef5e85ab9e49ef1",
        h5_config_loads=False,
    ),
}
