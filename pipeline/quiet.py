"""Starting TensorFlow without its start-up noise."""

import os


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with stderr closed: its C++ start-up logs (oneDNN, CUDA probes)
    ignore TF_CPP_MIN_LOG_LEVEL and bury the run's own messages. Python errors still raise."""
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow as tf

        tf.config.list_physical_devices()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
