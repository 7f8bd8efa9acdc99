"""What TF_CONFIG says about this process's place in a multi-worker cluster.

Kept free of TensorFlow so the entry point can refuse a bad TF_CONFIG in a
second, before TensorFlow starts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from pipeline.config import DistributeConfig
from pipeline.errors import ConfigError


@dataclass
class WorkerRole:
    """Which worker this process is. The chief alone writes what users see."""

    index: int = 0
    count: int = 1

    @property
    def is_chief(self) -> bool:
        return self.index == 0


def read_worker_role() -> WorkerRole:
    """This process's place in TF_CONFIG's cluster ("chief" or worker 0 is the chief)."""
    tf_config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    cluster, task = tf_config.get("cluster", {}), tf_config.get("task", {})
    count = len(cluster.get("chief", [])) + len(cluster.get("worker", []))
    if task.get("type") == "chief" or not task:
        return WorkerRole(0, max(count, 1))
    return WorkerRole(int(task.get("index", 0)) + len(cluster.get("chief", [])), count)


def check_tf_config(cfg: DistributeConfig) -> None:
    """A multi-worker run needs TF_CONFIG naming this worker; say so before TensorFlow starts."""
    if cfg.strategy != "multi_worker" or cfg.local_workers:
        return
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise ConfigError(
            "distribute=multi_worker needs TF_CONFIG (set by the cluster manager) naming the "
            "workers and this one's index; for workers on this machine use "
            "distribute.local_workers=N instead"
        )
    try:
        tf_config = json.loads(raw)
        workers = tf_config["cluster"].get("worker", []) + tf_config["cluster"].get("chief", [])
        task_type, index = tf_config["task"]["type"], int(tf_config["task"]["index"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(
            f"TF_CONFIG is not a valid cluster description ({err!r}): expected "
            '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": 0}}'
        ) from err
    if not workers or task_type not in ("worker", "chief") or not 0 <= index < len(tf_config["cluster"][task_type]):
        raise ConfigError(f"TF_CONFIG names task {task_type} {index}, which its cluster does not list")
