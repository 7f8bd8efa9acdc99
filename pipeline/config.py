"""The typed schema of conf/ and the checks Hydra's types cannot express.

Hydra merges conf/*.yaml onto these dataclasses, so a wrong *type* (a word where
a number belongs) is refused while composing. `validate` then checks ranges,
choices and paths, and names the key, the bad value and what is allowed.
Nothing below the entry point sees Hydra: `to_config` turns the composed
DictConfig into these plain objects.

The schema holds types only, no values: every value is written once, in
conf/*.yaml, beside its meaning and unit. A field has MISSING (Hydra's "???")
as its default, so a key absent from conf/ is refused by `to_config` rather
than quietly taking a second, older value from here. Code that runs without
`python -m pipeline` (the bench, the tests) gets its Config from
pipeline.defaults.compose_config, never from these constructors.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, Container, DictConfig, OmegaConf

from pipeline.backbones import BACKBONES
from pipeline.errors import ConfigError
from pipeline.run_names import run_name


@dataclass
class DataConfig:
    """Values: conf/data/default.yaml."""

    dir: str = MISSING
    image_size: int = MISSING
    batch_size: int = MISSING
    validation_split: float = MISSING
    split_seed: int = MISSING
    labels_csv: str | None = MISSING
    validation_csv: str | None = MISSING
    path_column: str = MISSING
    label_column: str = MISSING
    classes: list[str] | None = MISSING
    make_sample_if_empty: bool = MISSING
    workers: int = MISSING
    interpolation: str = MISSING
    rotation_range: float = MISSING
    width_shift_range: float = MISSING
    height_shift_range: float = MISSING
    shear_range: float = MISSING
    zoom_range: float = MISSING
    horizontal_flip: bool = MISSING
    fill_mode: str = MISSING
    on_bad_image: str = MISSING
    max_pixels: int = MISSING


@dataclass
class ModelConfig:
    """Values: conf/model/<name>.yaml (inception_v3 is the default); a backbone's facts: pipeline/backbones.py."""

    name: str = MISSING
    weights: str | None = MISSING
    dropout: float = MISSING
    random_init_bn_momentum: float = MISSING
    save_path: str = MISSING
    final: str = MISSING


@dataclass
class PhaseConfig:
    """Values: conf/train/default.yaml (head:, and finetune: through FinetuneConfig)."""

    epochs: int = MISSING
    lr: float = MISSING
    optimizer: str = MISSING
    schedule: str = MISSING
    cached_views: int = MISSING


@dataclass
class FinetuneConfig(PhaseConfig):
    """Values: conf/train/default.yaml (finetune:)."""

    unfreeze_after: str = MISSING
    reuse_head_views: bool = MISSING


@dataclass
class EarlyStoppingConfig:
    """Values: conf/train/default.yaml (early_stopping:)."""

    patience: int = MISSING
    min_delta: float = MISSING


@dataclass
class TrainConfig:
    """Values: conf/train/default.yaml."""

    seed: int = MISSING
    deterministic: bool = MISSING
    threads: int = MISSING
    precision: str = MISSING
    cache_dir: str = MISSING
    # none, balanced, or {class name: weight}: a union OmegaConf cannot type, so validate_class_weight checks it.
    class_weight: Any = MISSING
    label_smoothing: float = MISSING
    head: PhaseConfig = MISSING
    finetune: FinetuneConfig = MISSING
    early_stopping: EarlyStoppingConfig = MISSING


@dataclass
class CheckpointConfig:
    """Values: conf/checkpoint/default.yaml."""

    dir: str = MISSING
    filename: str = MISSING
    format: str = MISSING
    monitor: str = MISSING
    mode: str = MISSING
    save_best_only: bool = MISSING
    every: int = MISSING
    every_batches: int = MISSING
    keep_last: int = MISSING
    asynchronous: bool = MISSING


@dataclass
class DistributeConfig:
    """Values: conf/distribute/*.yaml (none is the default)."""

    strategy: str = MISSING
    local_workers: int = MISSING


@dataclass
class LoggerConfig:
    """Values: conf/logger/mlflow.yaml (none.yaml takes them with tracking off)."""

    name: str = MISSING
    tracking_uri: str = MISSING
    experiment: str = MISSING
    on_error: str = MISSING
    timeout: int = MISSING
    retries: int = MISSING
    log_model: bool = MISSING
    tags: dict[str, str] = MISSING


@dataclass
class Config:
    """Values: conf/config.yaml (which group file fills each part)."""

    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    train: TrainConfig = MISSING
    checkpoint: CheckpointConfig = MISSING
    distribute: DistributeConfig = MISSING
    logger: LoggerConfig = MISSING


def register_config() -> None:
    """Register the schema (the base of conf/config.yaml) and the resolvers conf/ uses."""
    ConfigStore.instance().store(name="schema", node=Config)
    # Hydra's run and sweep folders are named from the overrides, not the clock, so
    # the same command finds its own folder again; no overrides means "default".
    OmegaConf.register_new_resolver("run_name", run_name, replace=True)
    # A default that depends on whether the base starts pretrained (see conf/train/default.yaml).
    OmegaConf.register_new_resolver(
        "pretrained_or_scratch",
        lambda weights, pretrained, scratch: scratch if weights is None else pretrained,
        replace=True,
    )


CHECKPOINT_FORMATS = ("keras", "h5", "weights_h5", "tf_checkpoint")
OPTIMIZERS = ("adam", "sgd", "rmsprop")
SCHEDULES = ("cosine", "constant")
# What checkpoint.monitor and the filename may name, by the names fit logs them under: the validation
# scores for imbalanced sets (training/epoch_metrics.py) as well; history.csv holds every one.
METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "val_macro_f1", "val_balanced_accuracy")
CLASS_WEIGHTS = ("none", "balanced")
FILENAME_FIELDS = ("epoch",) + METRICS
# The seed (Keras 2) spelled accuracy "acc"; Keras 3 logs only "accuracy".
SEED_SPELLINGS = {"val_acc": "val_accuracy", "acc": "accuracy"}
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
FILL_MODES = ("constant", "nearest", "reflect", "wrap")
ON_BAD_IMAGE = ("fail", "skip")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
STRATEGIES = ("none", "mirrored", "multi_worker")
FINAL_WEIGHTS = ("last", "best")
LOGGERS = ("none", "mlflow")
ON_TRACKING_ERROR = ("fail", "warn")


def to_config(cfg: DictConfig) -> tuple[Config, list[str]]:
    """Turn Hydra's composed config into plain dataclasses and validate them.

    Returns the config and one-line notes on seed spellings that were translated.
    """
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)  # a DictConfig converts to a dict; OmegaConf types every kind of node
    plain = {k: v for k, v in container.items() if k in Config.__dataclass_fields__}
    merged = OmegaConf.merge(OmegaConf.structured(Config), plain)
    refuse_missing(merged)
    config = OmegaConf.to_object(merged)
    assert isinstance(config, Config)  # merged onto the structured schema, so it converts back to Config
    notes = translate_seed_spellings(config.checkpoint) + imply_multi_worker(config.distribute)
    fit_cache_defaults(cfg, config)
    validate(config)
    return config, notes


def fit_cache_defaults(cfg: DictConfig, config: Config) -> None:
    """The cached-view defaults step aside where they cannot apply; a value the user set is checked as given.

    conf/train/default.yaml caches features by default with pretrained weights
    (the fast path). A default is still an interpolation in `cfg`; where the
    rest of the configuration rules it out (a `distribute` strategy; a
    whole-base fine-tune has nothing frozen to cache; reusing the head's views
    needs both phases to cache the same number), it turns off instead of
    refusing the run.
    """
    t, finetune = config.train, cfg.train.finetune
    distributed = config.distribute.strategy != "none"  # cached phases train in one process
    if OmegaConf.is_interpolation(cfg.train.head, "cached_views") and distributed:
        t.head.cached_views = 0
    if OmegaConf.is_interpolation(finetune, "cached_views") and (
        distributed or whole_base_finetune(t.finetune, config.model.weights)
    ):
        t.finetune.cached_views = 0
    if OmegaConf.is_interpolation(finetune, "reuse_head_views") and not (
        t.head.epochs and t.head.cached_views and t.head.cached_views == t.finetune.cached_views
    ):
        t.finetune.reuse_head_views = False


def whole_base_finetune(finetune: FinetuneConfig, weights: str | None) -> bool:
    """Whether the fine-tune phase trains the whole base (auto means so with weights=null)."""
    return finetune.unfreeze_after == "none" or (finetune.unfreeze_after == "auto" and weights is None)


def refuse_missing(cfg: Container) -> None:
    """A key conf/ leaves without a value (the schema has none to fall back on)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"{', '.join(missing)}: no value; conf/*.yaml gives every key one, so restore it there "
            "or set it on the command line (key=value)"
        )


def translate_seed_spellings(ckpt: CheckpointConfig) -> list[str]:
    """Accept the seed's `val_acc`/`acc`, rewriting them to Keras 3's names."""
    notes = []
    if ckpt.monitor in SEED_SPELLINGS:
        new = SEED_SPELLINGS[ckpt.monitor]
        notes.append(f"checkpoint.monitor: '{ckpt.monitor}' is Keras 2's name; using '{new}'")
        ckpt.monitor = new
    fields = filename_fields(ckpt.filename)
    for old, new in SEED_SPELLINGS.items():
        if old in fields:
            ckpt.filename = ckpt.filename.replace("{" + old, "{" + new)
            notes.append(f"checkpoint.filename: '{{{old}}}' is Keras 2's name; using '{{{new}}}'")
    return notes


def imply_multi_worker(dist: DistributeConfig) -> list[str]:
    """`distribute.local_workers=N` alone means a multi-worker run on this machine."""
    if dist.local_workers > 0 and dist.strategy == "none":
        dist.strategy = "multi_worker"
        return [f"distribute.local_workers={dist.local_workers}: training with distribute=multi_worker"]
    return []


def filename_fields(pattern: str) -> list[str]:
    """The placeholder names in a checkpoint filename pattern."""
    try:
        return [name for _, name, _, _ in string.Formatter().parse(pattern) if name]
    except ValueError as err:
        raise ConfigError(f"checkpoint.filename={pattern!r} is not a valid pattern: {err}") from None


def validate(config: Config) -> None:
    """Check every range, choice and path; raise ConfigError naming the key."""
    d, m, t, c = config.data, config.model, config.train, config.checkpoint
    one_of("model.name", m.name, tuple(BACKBONES))
    backbone = BACKBONES[m.name]
    at_least(
        "data.image_size", d.image_size, backbone.min_size, f"{backbone.display} needs at least {backbone.min_size} px"
    )
    at_least("data.batch_size", d.batch_size, 1)
    at_least("data.workers", d.workers, 0)
    between("data.validation_split", d.validation_split, 0.0, 1.0)
    one_of("data.interpolation", d.interpolation, INTERPOLATIONS)
    one_of("data.fill_mode", d.fill_mode, FILL_MODES)
    one_of("data.on_bad_image", d.on_bad_image, ON_BAD_IMAGE)
    at_least("data.max_pixels", d.max_pixels, 1)
    for key in ("rotation_range", "shear_range", "width_shift_range", "height_shift_range", "zoom_range"):
        at_least(f"data.{key}", getattr(d, key), 0)
    # Even with make_sample_if_empty: a mistyped data.dir must not quietly become a new sample set.
    if not Path(d.dir).is_dir():
        raise ConfigError(
            f"data.dir={d.dir!r} is not a folder; point it at a folder with train/<class>/ "
            "(and validation/<class>/) or <class>/ folders, or at an empty folder to get the sample set"
        )
    validate_label_files(d)
    validate_weights(m.weights, backbone.display)
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout={m.dropout} must be in [0, 1)")
    between("model.random_init_bn_momentum", m.random_init_bn_momentum, 0.0, 1.0)
    if not m.save_path.endswith(".h5"):
        raise ConfigError(f"model.save_path={m.save_path!r} must end in .h5 (the final model is an HDF5 file)")
    one_of("model.final", m.final, FINAL_WEIGHTS)
    for name, phase in (("head", t.head), ("finetune", t.finetune)):
        at_least(f"train.{name}.epochs", phase.epochs, 0)
        if not phase.lr > 0:
            raise ConfigError(f"train.{name}.lr={phase.lr} must be > 0")
        one_of(f"train.{name}.optimizer", phase.optimizer, OPTIMIZERS)
        one_of(f"train.{name}.schedule", phase.schedule, SCHEDULES)
        at_least(f"train.{name}.cached_views", phase.cached_views, 0)
    at_least("train.early_stopping.patience", t.early_stopping.patience, 0, "0 turns early stopping off")
    at_least("train.early_stopping.min_delta", t.early_stopping.min_delta, 0.0, "in the monitor's unit")
    at_least("train.threads", t.threads, 0)
    validate_class_weight(t.class_weight)
    if not 0.0 <= t.label_smoothing < 1.0:
        raise ConfigError(f"train.label_smoothing={t.label_smoothing} must be in [0, 1)")
    one_of("train.precision", t.precision, PRECISIONS)
    validate_finetune_cache(t.finetune, m.weights, backbone.cut)
    validate_reused_views(t)
    if t.head.epochs + t.finetune.epochs == 0:
        raise ConfigError("train.head.epochs and train.finetune.epochs are both 0: nothing to train")
    one_of("checkpoint.format", c.format, CHECKPOINT_FORMATS)
    one_of("checkpoint.monitor", c.monitor, METRICS)
    one_of("checkpoint.mode", c.mode, ("auto", "min", "max"))
    at_least("checkpoint.every", c.every, 1)
    at_least("checkpoint.every_batches", c.every_batches, 0)
    at_least("checkpoint.keep_last", c.keep_last, 1)
    validate_filename(c.filename)
    validate_distribute(config.distribute)
    validate_logger(config.logger)
    for name in ("head", "finetune"):
        if getattr(t, name).cached_views and config.distribute.strategy != "none":
            raise ConfigError(
                f"train.{name}.cached_views={getattr(t, name).cached_views} cannot be combined with "
                f"distribute={config.distribute.strategy}: set it to 0 for distributed runs"
            )


def validate_class_weight(setting) -> None:
    """none, balanced, or a mapping of class names to positive numbers (names are checked against the data later)."""
    if setting in CLASS_WEIGHTS:
        return
    if not isinstance(setting, dict) or not setting:
        raise ConfigError(
            f"train.class_weight={setting!r} is not allowed; choose none, balanced, or a mapping of class names "
            "to weights, e.g. 'train.class_weight={cat:1,dog:3}'"
        )
    for name, weight in setting.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ConfigError(
                f"train.class_weight: the weight of class {name!r} is {weight!r}; it must be a number > 0"
            )


def validate_label_files(d: DataConfig) -> None:
    """The CSV keys and data.classes; the files' rows are checked by pipeline/data/labels_csv.py."""
    for key in ("labels_csv", "validation_csv"):
        path = getattr(d, key)
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"data.{key}={path!r}: no such file (a path from the working folder)")
    if d.validation_csv is not None and d.labels_csv is None:
        raise ConfigError(f"data.validation_csv={d.validation_csv!r} needs data.labels_csv (the training images' CSV)")
    for key in ("path_column", "label_column"):
        if not getattr(d, key).strip():
            raise ConfigError(f"data.{key} is empty; name the CSV column")
    if d.path_column.strip() == d.label_column.strip():
        raise ConfigError(f"data.path_column and data.label_column are both {d.path_column!r}; name two columns")
    if d.classes is not None:
        bad = [name for name in d.classes if not name.strip() or name.splitlines() != [name] or "\t" in name]
        repeated = sorted({name for name in d.classes if d.classes.count(name) > 1})
        if len(d.classes) < 2 or bad or repeated:
            raise ConfigError(
                f"data.classes={list(d.classes)} must name at least 2 distinct classes, none empty or with "
                "a tab or line break" + (f" (repeated: {', '.join(repeated)})" if repeated else "")
            )


def validate_distribute(dist: DistributeConfig) -> None:
    one_of("distribute.strategy", dist.strategy, STRATEGIES)
    at_least("distribute.local_workers", dist.local_workers, 0)
    if dist.local_workers > 0 and dist.strategy != "multi_worker":
        raise ConfigError(
            f"distribute.local_workers={dist.local_workers} starts multi-worker processes; "
            f"it cannot be combined with distribute={dist.strategy}"
        )


def validate_logger(logger: LoggerConfig) -> None:
    one_of("logger.name", logger.name, LOGGERS)
    one_of("logger.on_error", logger.on_error, ON_TRACKING_ERROR)
    at_least("logger.timeout", logger.timeout, 1)
    at_least("logger.retries", logger.retries, 0)
    if logger.name == "mlflow" and not logger.experiment:
        raise ConfigError("logger.experiment is empty; name the MLflow experiment runs are recorded under")


def validate_finetune_cache(finetune: FinetuneConfig, weights: str | None, cut: str) -> None:
    """Cached fine-tuning needs a frozen lower part to cache; a whole-base fine-tune has none."""
    if finetune.cached_views and whole_base_finetune(finetune, weights):
        raise ConfigError(
            f"train.finetune.cached_views={finetune.cached_views} needs a frozen lower part to cache, but "
            f"train.finetune.unfreeze_after={finetune.unfreeze_after!r} trains the whole base"
            + (" (auto means none with model.weights=null)" if finetune.unfreeze_after == "auto" else "")
            + f"; set train.finetune.unfreeze_after={cut} (or another layer), or train.finetune.cached_views=0"
        )


def validate_reused_views(t: TrainConfig) -> None:
    """Reusing the head phase's views needs both phases cached with the same number of views."""
    if not t.finetune.reuse_head_views:
        return
    if not (t.head.epochs and t.head.cached_views and t.finetune.cached_views):
        raise ConfigError(
            "train.finetune.reuse_head_views=true trains the fine-tune phase on the head phase's "
            "cached views, so it needs train.head.epochs, train.head.cached_views and "
            "train.finetune.cached_views all above 0 (they are "
            f"{t.head.epochs}, {t.head.cached_views} and {t.finetune.cached_views})"
        )
    if t.head.cached_views != t.finetune.cached_views:
        raise ConfigError(
            f"train.finetune.reuse_head_views=true: train.finetune.cached_views="
            f"{t.finetune.cached_views} must equal train.head.cached_views={t.head.cached_views}, "
            "since one pass computes the same views for both phases"
        )


def validate_weights(weights: str | None, display: str) -> None:
    if weights in (None, "imagenet"):
        return
    if not Path(weights).is_file():
        raise ConfigError(
            f"model.weights={weights!r}: no such file. Use 'imagenet', null (random init) "
            f"or the path of a {display} no-top weights file (.h5)"
        )


def validate_filename(pattern: str) -> None:
    """Refuse a placeholder no metric fills now, not after the first epoch."""
    for name in filename_fields(pattern):
        if name not in FILENAME_FIELDS:
            raise ConfigError(
                f"checkpoint.filename={pattern!r}: no metric fills '{{{name}}}'; "
                f"placeholders can be {', '.join(FILENAME_FIELDS)}"
            )
    try:
        pattern.format(epoch=1, **{k: 0.5 for k in METRICS})
    except (ValueError, IndexError, KeyError) as err:
        raise ConfigError(f"checkpoint.filename={pattern!r} cannot be formatted: {err}") from None
    if "/" in pattern or pattern.startswith("."):
        raise ConfigError(
            f"checkpoint.filename={pattern!r} must be a plain file name (set checkpoint.dir for the folder)"
        )


def at_least(key: str, value, low, why: str = "") -> None:
    if value < low:
        raise ConfigError(f"{key}={value} must be >= {low}" + (f" ({why})" if why else ""))


def between(key: str, value, low, high) -> None:
    if not low < value < high:
        raise ConfigError(f"{key}={value} must be between {low} and {high} (exclusive)")


def one_of(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}")
