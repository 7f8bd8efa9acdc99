"""Starting TensorFlow without its start-up noise."""

import os
import sys


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with stderr closed: its C++ start-up logs (oneDNN, CUDA probes)
    ignore TF_CPP_MIN_LOG_LEVEL and bury the run's own messages. Python errors still raise."""
    keep_scikit_learn_out()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow as tf

        tf.config.list_physical_devices()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def keep_scikit_learn_out() -> None:
    """Keras imports scikit-learn at start-up whenever it is installed, for its sklearn wrappers,
    which the pipeline never uses (the mlflow extra installs it); scikit-learn then imports
    scipy.stats. That was 1.8 s of every command's start here (docs/speed.md). A None entry in
    sys.modules makes `import sklearn` fail as if it were not installed, which Keras allows for.
    Called by the pipeline's commands only, never on `import pipeline`."""
    sys.modules.setdefault("sklearn", None)  # type: ignore[arg-type]  # None is how Python blocks an import
