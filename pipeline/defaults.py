"""conf/ composed and validated as `python -m pipeline OVERRIDES` would run it, for code without the command.

The bench and the tests build their Config here, so they start from the values
a user's run starts from (conf/*.yaml, the one place values are written), with
Hydra's own override syntax on top: `compose_config(["data.dir=/tmp/x", "model.weights=null"])`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.utils import JobRuntime

from pipeline.config import Config, register_config, to_config

# The folder __main__'s @hydra.main reads (config_path="../conf", relative to pipeline/).
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_config(overrides: Sequence[str] = ()) -> Config:
    """conf/config.yaml with `overrides`, type-checked and validated into a Config.

    Raises ConfigError naming a bad value (validation checks that data.dir is a
    folder, relative to the working folder, so callers elsewhere pass data.dir=...),
    and Hydra's errors for an unknown key or a wrong type. The notes on the seed's
    spellings that the command prints are dropped: the spellings are translated all the same.
    """
    register_config()
    with beside_any_running_app(), initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name="config", overrides=list(overrides))
    config, _ = to_config(cfg)
    return config


@contextmanager
def beside_any_running_app() -> Iterator[None]:
    """Let Hydra initialise once more inside a process where an app already runs.

    Hydra keeps one global instance and refuses a second `initialize_config_dir`
    while a @hydra.main job (or a test that initialised Hydra) holds it. The
    running app's instance and job name are set aside and put back afterwards,
    so composing here changes nothing the app sees.
    """
    global_hydra = GlobalHydra.instance()
    app = global_hydra.hydra
    job_name = JobRuntime.instance().get("name")
    global_hydra.clear()
    try:
        yield
    finally:
        # initialize_config_dir's exit restores its own copy of the (cleared) instance: reset that one.
        GlobalHydra.instance().clear()
        if app is not None:
            GlobalHydra.instance().initialize(app)
        JobRuntime.instance().set("name", job_name)
