"""Opening a trained model with what is needed to use it: class names, image size, decoding settings.

train.py saves the final model as .h5 with its metadata (save.py) as an
HDF5 attribute and in a .json beside it. The metadata is read here, for the
commands and for training alike, with h5py alone, before TensorFlow starts, so
a wrong path or a foreign file fails in a second.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import h5py

from pipeline.backbones import BACKBONES
from pipeline.errors import ModelFileError

# What a model file saved before its metadata recorded the data config was trained and checked
# with: fixed history, deliberately not conf/'s current values, which may change without
# changing how an old model's images must be read. Bilinear was data.interpolation's value when
# the key was added; 89,478,485 is Pillow's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS),
# the one in force before data.max_pixels existed.
LEGACY_INTERPOLATION = "bilinear"
LEGACY_MAX_PIXELS = 89_478_485
# model.name did not exist before other backbones did: every model saved before it is InceptionV3.
LEGACY_BACKBONE = "inception_v3"

# The HDF5 attribute save.py writes the metadata into (defined here, where no TensorFlow is imported).
METADATA_ATTR = "pipeline_metadata"
# Keras before 3.12 ignored safe_mode for .h5 files (CVE-2025-9905): loading one ran the
# Python code of its Lambda layers. pyproject.toml requires 3.12; this refuses an older one at run time.
SAFE_KERAS = (3, 12)
FINAL_MODEL_HINT = (
    "pass the final model that training saved (model.save_path, e.g. model/my_saved_InceptionV3_model.h5)"
)


def metadata_path(model_path: Path) -> Path:
    """The JSON copy of the metadata beside the model file."""
    return Path(model_path).with_suffix(".json")


@dataclass
class ModelInfo:
    path: Path
    class_names: list[str]
    image_size: int
    interpolation: str  # the resize filter training used
    max_pixels: int  # the decompression-bomb limit training used
    metadata: dict
    backbone: str = LEGACY_BACKBONE  # model.name it was trained with (pipeline/backbones.py)


def read_model_info(path) -> ModelInfo:
    """The metadata of a final model file, checked; raises ModelFileError naming the file."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"model file {path} does not exist; {FINAL_MODEL_HINT}")
    if path.is_dir():
        raise ModelFileError(f"{path} is a folder, not a model file; {FINAL_MODEL_HINT}")
    metadata = read_metadata(path)
    names, size = metadata.get("class_names"), metadata.get("image_size")
    if not isinstance(names, list) or not names or not isinstance(size, int):
        raise ModelFileError(f"{path}: its metadata has no class names or image size; {FINAL_MODEL_HINT}")
    data_cfg = (metadata.get("config") or {}).get("data") or {}
    backbone = ((metadata.get("config") or {}).get("model") or {}).get("name", LEGACY_BACKBONE)
    if backbone not in BACKBONES:
        raise ModelFileError(
            f"{path}: its backbone {backbone!r} is not one this version knows ({', '.join(BACKBONES)}); "
            "use the version of the pipeline that trained it"
        )
    return ModelInfo(
        path,
        [str(n) for n in names],
        size,
        data_cfg.get("interpolation", LEGACY_INTERPOLATION),
        data_cfg.get("max_pixels", LEGACY_MAX_PIXELS),
        metadata,
        backbone,
    )


def read_metadata(path: Path) -> dict:
    """The metadata of a final model file: inside it first, the .json beside it for a file whose
    attribute was stripped. Raises ModelFileError naming the file if neither holds valid JSON."""
    try:
        with h5py.File(path, "r") as f:
            stored = f.attrs.get(METADATA_ATTR)
    except OSError:
        raise ModelFileError(f"{path} is not a model file (not HDF5); {FINAL_MODEL_HINT}") from None
    if stored is None:
        beside = metadata_path(path)
        if not beside.is_file():
            raise ModelFileError(
                f"{path} has no class names (no metadata inside it and no {beside.name} "
                f"beside it), so it was not saved by this pipeline's training; {FINAL_MODEL_HINT}"
            )
        try:
            stored = beside.read_text()
        except OSError as err:
            raise ModelFileError(f"{beside} cannot be read ({err.strerror}); {FINAL_MODEL_HINT}") from None
    try:
        metadata = json.loads(stored)
    except ValueError:
        raise ModelFileError(f"{path}: its metadata is not valid JSON; {FINAL_MODEL_HINT}") from None
    if not isinstance(metadata, dict):
        raise ModelFileError(f"{path}: its metadata is not a JSON object; {FINAL_MODEL_HINT}")
    return metadata


def read_metadata_or_none(path: Path) -> dict | None:
    """read_metadata, or None where the file is absent or unreadable (training asks whether its final save happened)."""
    try:
        return read_metadata(Path(path))
    except ModelFileError:
        return None


def load_model(info: ModelInfo):
    """The Keras model, checked against its metadata. TensorFlow must be started (command.start_tensorflow).

    The file comes from the user and may come from anyone: it is loaded in safe mode, which
    refuses a Lambda layer's Python code instead of running it. (Training's own checkpoints are
    restored with load_weights, which reads weights only and builds no layer from the file.)
    """
    import keras

    version = tuple(int(part) for part in re.findall(r"\d+", keras.__version__)[:2])
    if version < SAFE_KERAS:
        raise ModelFileError(
            f"{info.path} not loaded: Keras {keras.__version__} ignores safe_mode for .h5 files (CVE-2025-9905), "
            "so loading could run code stored in the file; install keras>=3.12 (pip install -e .)"
        )
    if not BACKBONES[info.backbone].h5_config_loads:
        model = rebuild_and_load_weights(info)
    else:
        model = load_whole_model(info)
    outputs, inputs = model.output_shape[-1], model.input_shape[1:3]
    if outputs != len(info.class_names) or tuple(inputs) != (info.image_size, info.image_size):
        raise ModelFileError(
            f"{info.path}: the model takes {inputs} pixels and gives {outputs} classes, but "
            f"its metadata says {info.image_size} px and {len(info.class_names)} classes"
        )
    return model


def load_whole_model(info: ModelInfo):
    """The architecture and the weights, both from the file (safe mode: no Lambda code runs)."""
    import keras

    try:
        return keras.models.load_model(info.path, compile=False, safe_mode=True)
    except Exception as err:  # noqa: BLE001 - h5py and Keras raise many kinds for a file that is not a whole model
        if "Lambda" in str(err) and "safe_mode" in str(err):  # Keras's safe-mode refusal
            raise ModelFileError(
                f"{info.path} refused: it holds a Lambda layer with Python code, which loading would run; "
                "training never saves one, so this file was not saved by this pipeline's training"
            ) from None
        first_line = str(err).strip().split("\n")[0]
        raise ModelFileError(
            f"{info.path} cannot be loaded as a Keras model ({first_line}); {FINAL_MODEL_HINT}"
        ) from None


def rebuild_and_load_weights(info: ModelInfo):
    """The architecture built by training's own code from the metadata, the weights from the file.

    For the backbones whose .h5 architecture Keras cannot read back (backbones.Backbone.h5_config_loads).
    Nothing but weights is read from the file, so no code in it can run.
    """
    from pipeline.config import ModelConfig
    from pipeline.model import build_model

    saved = (info.metadata.get("config") or {}).get("model") or {}
    # The saved model's own values, not conf/'s: the layers must match the file's weights.
    # Dropout is off in inference, but the layer must exist; no weights are downloaded.
    cfg = ModelConfig(
        name=info.backbone,
        weights=None,
        dropout=saved.get("dropout", 0.0),
        random_init_bn_momentum=saved.get("random_init_bn_momentum", 0.9),
        save_path=str(info.path),
    )
    model = build_model(cfg, len(info.class_names), info.image_size)
    try:
        model.load_weights(str(info.path))
    except Exception as err:  # noqa: BLE001 - h5py and Keras raise many kinds for a file of other weights
        first_line = str(err).strip().split("\n")[0]
        raise ModelFileError(
            f"{info.path}: its weights do not fit the {BACKBONES[info.backbone].display} model its metadata "
            f"describes ({first_line}); {FINAL_MODEL_HINT}"
        ) from None
    return model
