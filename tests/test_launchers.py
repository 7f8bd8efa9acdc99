"""The cluster launcher configs compose with the real conf/ and plugins."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO
from hydra import compose, initialize_config_dir

from pipeline.config import register_config


def composed(*overrides):
    register_config()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_slurm_launcher_uses_submitit_and_keeps_the_sweep_paths():
    cfg = composed("launcher=slurm", "hydra.launcher.partition=gpu")
    assert cfg.hydra.launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert cfg.hydra.launcher.partition == "gpu" and cfg.hydra.launcher.signal_delay_s > 0
    # The pipeline's own settings are untouched: jobs still derive their folders from their overrides.
    assert cfg.checkpoint.dir == "ckpt" and cfg.hydra.sweep.dir == "multirun"


def test_parallel_launcher_splits_the_cores():
    cfg = composed("launcher=parallel")
    assert cfg.hydra.launcher.n_jobs * cfg.train.threads <= 2


def test_ray_launcher_config_names_the_ray_plugin():
    # The Ray plugin is an optional extra (pip install -e '.[ray]'), too heavy for the test
    # environment, so the file is checked as written rather than composed.
    text = yaml.safe_load((REPO / "conf" / "launcher" / "ray.yaml").read_text())
    assert {"override /hydra/launcher": "ray"} in text["defaults"]
    assert text["hydra"]["launcher"]["ray"]["init"]["address"] == "auto"
    assert Path(REPO / "pyproject.toml").read_text().count("hydra-ray-launcher") == 1


@pytest.mark.parametrize("strategy", ["none", "mirrored", "multi_worker"])
def test_distribute_group_options_compose(strategy):
    assert composed(f"distribute={strategy}").distribute.strategy == strategy
