"""Training one run on several devices or machines with tf.distribute.

`distribute=mirrored` uses every GPU of this machine; `distribute=multi_worker`
uses MultiWorkerMirroredStrategy over the workers TF_CONFIG names. Either way
data.batch_size stays the global batch: each step splits one global batch of
the single-process feed between the replicas, so the number of steps, the
checkpoints and resume are the same whatever the number of workers.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import tempfile
from pathlib import Path

import tensorflow as tf

from pipeline.config import DistributeConfig
from pipeline.data.dataset import Batches
from pipeline.distribute.tf_config import WorkerRole
from pipeline.training.feature_cache import remove_dead_scratch

# A worker's scratch folder in the temporary folder: `pipeline-worker-<pid>-<index>-<random>`;
# the pid lets the next run remove the folder of a worker that was SIGKILLed.
WORKER_SCRATCH = "pipeline-worker-"


def make_strategy(cfg: DistributeConfig) -> tf.distribute.Strategy | None:
    """The strategy for `cfg`, or None for a plain single-process run.

    Must run before TensorFlow executes anything: MultiWorkerMirroredStrategy
    configures the runtime's collective ops and refuses a started runtime.
    """
    # tf.distribute logs every collective it sets up at INFO level: dozens of lines an epoch.
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    if cfg.strategy == "mirrored":
        return tf.distribute.MirroredStrategy()
    if cfg.strategy == "multi_worker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        patch_keras_multi_worker_reduction()
        return strategy
    return None


def strategy_scope(strategy: tf.distribute.Strategy | None):
    return strategy.scope() if strategy else contextlib.nullcontext()


def patch_keras_multi_worker_reduction() -> None:
    """Keras 3.15's fit() cannot run under MultiWorkerMirroredStrategy: it averages
    each step's scalar logs with `strategy.reduce("MEAN", v, axis=0)`, which fails
    on a scalar (keras-team/keras#20585). Averaging over the workers with axis=None
    is what it means to do."""
    from keras.src.backend.tensorflow import trainer

    original = getattr(trainer.reduce_per_replica, "__wrapped__", trainer.reduce_per_replica)

    # wraps() records `original` as __wrapped__, so patching twice still wraps Keras's own function once.
    @functools.wraps(original)
    def reduce_per_replica(values, strategy, reduction):
        if reduction == "auto" and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return tf.nest.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return original(values, strategy, reduction)

    trainer.reduce_per_replica = reduce_per_replica


def prepare_model_for_strategy(model, strategy: tf.distribute.Strategy, batches: Batches) -> None:
    """Skip Keras's own symbolic build, which reduces a whole data batch across
    workers and fails on a tuple (the same Keras bug); build from one local image instead."""
    # Part 0 of batch_size parts of the first batch: its first image alone, the only one decoded.
    x, y, w = batches.shard(0, 0, batches.cfg.batch_size)

    def symbolic_build(iterator=None, data_batch=None):
        with strategy.scope():
            model._symbolic_build(data_batch=(x, y, w))

    model._maybe_symbolic_build = symbolic_build


def distribute_batches(batches: Batches, strategy: tf.distribute.Strategy):
    """Each replica's share of every global batch from `batches.start_batch` on, as a distributed dataset.

    Element i of a worker's dataset goes to its local replica i % local (how
    tf.distribute hands out a per-worker dataset's elements), so it carries
    shard `worker * local + i % local` of global batch `start + i // local`.
    """
    replicas = strategy.num_replicas_in_sync
    size, classes = batches.cfg.image_size, batches.n_classes

    def dataset_for(context: tf.distribute.InputContext) -> tf.data.Dataset:
        local = replicas // context.num_input_pipelines

        def load(i):
            i = int(i)
            step, replica = batches.start_batch + i // local, context.input_pipeline_id * local + i % local
            return batches.shard(step, replica, replicas)

        def typed(i):
            x, y, w = tf.numpy_function(load, [i], [tf.float32, tf.float32, tf.float32])
            return (
                tf.ensure_shape(x, [None, size, size, 3]),
                tf.ensure_shape(y, [None, classes]),
                tf.ensure_shape(w, [None]),
            )

        steps = len(batches) * local
        dataset = tf.data.Dataset.range(steps).map(
            typed, num_parallel_calls=max(1, batches.cfg.workers), deterministic=True
        )
        options = tf.data.Options()
        # The shards are chosen above; tf.data must not shard the batches again.
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        return dataset.with_options(options).prefetch(2)

    return strategy.distribute_datasets_from_function(dataset_for)


@contextlib.contextmanager
def scratch_folder(role: WorkerRole):
    """Where a non-chief worker writes what the chief writes for users; removed afterwards.

    Every worker runs the same saves (saving may take part in collective ops),
    only the chief's land in checkpoint.dir and model.save_path. A worker
    killed with SIGKILL cannot remove its own: every run's start removes those.
    """
    remove_dead_scratch(Path(tempfile.gettempdir()), WORKER_SCRATCH)
    if role.is_chief:
        yield None
        return
    folder = tempfile.mkdtemp(prefix=f"{WORKER_SCRATCH}{os.getpid()}-{role.index}-")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
