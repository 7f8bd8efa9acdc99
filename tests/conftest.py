"""Shared fixtures: a tiny real data set and a runner for the real CLI."""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import Config
from pipeline.data.sample_data import write_sample_data
from pipeline.defaults import compose_config

REPO = Path(__file__).resolve().parents[1]
# The smoke experiment (75 px, batch 4, weights=null, one epoch per phase) keeps
# an end-to-end run at about half a minute, most of it TensorFlow tracing.
SMOKE = ["experiment=smoke"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """3 classes x 4 training and 2 validation JPEGs, at 80 px."""
    root = tmp_path_factory.mktemp("tiny_data")
    write_sample_data(root, seed=1, train_per_class=4, validation_per_class=2, image_size=80)
    return root


@functools.cache
def composed_defaults() -> Config:
    """conf/'s values, composed once per test process as `python -m pipeline` composes them."""
    # data.dir: any existing folder passes validation; the tracked data/ is one in every clone.
    return compose_config([f"data.dir={REPO / 'data'}"])


def from_conf(section: str, **changes):
    """One section of conf/'s values (e.g. "model" -> a ModelConfig) with `changes`, a fresh copy.

    The unit tests' stand-in for `python -m pipeline section.key=value`: the values a run
    starts from, without composing again for every test (Hydra's composition is slow enough to add up).
    """
    return dataclasses.replace(copy.deepcopy(getattr(composed_defaults(), section)), **changes)


def cli_env(**extra) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    env.pop("HYDRA_FULL_ERROR", None)
    env.update(extra)
    return env


def run_cli(
    *overrides, cwd: Path, timeout: float = 600, env: dict | None = None, module: str = "pipeline"
) -> subprocess.CompletedProcess:
    """Run `python -m pipeline OVERRIDES` the way a user does; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", module, *overrides],
        cwd=cwd,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_args(tmp: Path, data: Path, *extra) -> list[str]:
    """Overrides that keep a run's data, checkpoints, model and logs inside `tmp`."""
    return [
        *SMOKE,
        f"data.dir={data}",
        f"checkpoint.dir={tmp / 'ckpt'}",
        f"model.save_path={tmp / 'model' / 'final.h5'}",
        f"hydra.run.dir={tmp / 'outputs'}",
        f"train.cache_dir={tmp / 'cache'}",
        *extra,
    ]


def sweep_args(tmp: Path, data: Path, *extra) -> list[str]:
    """run_args for `-m`: the sweep folder instead of the single run's folder."""
    return [a for a in run_args(tmp, data, *extra) if not a.startswith("hydra.run")] + [
        f"hydra.sweep.dir={tmp / 'multirun'}"
    ]


def final_weights(run_dir: Path) -> list[np.ndarray]:
    """The weights of the final model a run left in run_dir/model/final.h5."""
    import keras

    return [w.numpy() for w in keras.models.load_model(run_dir / "model" / "final.h5", compile=False).weights]


def largest_difference(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """The largest absolute difference between two lists of weights of the same shapes."""
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))
