"""`python -m pipeline.bench.probe OVERRIDES`: the real CLI, plus time stamps for `make bench`.

Runs `python -m pipeline` unchanged, except that every `fit` call also prints
one `bench-event {json}` line per epoch: wall-clock times (time.time(), which
the bench's own process shares) of the epoch's start, first finished training
step, last training step and end (after validation). The bench reads them to
get the seconds to the first step and each phase's epoch times from the same
runs that produce the accuracy.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
EVENT = "bench-event "


def stamp_every_fit() -> None:
    """Wrap keras.Model.fit so each call gets a callback that reports its epochs."""
    from pipeline.quiet import import_tensorflow_quietly

    import_tensorflow_quietly()
    import keras

    class Stamps(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.event = {"start": time.time(), "steps": 0}

        def on_train_batch_end(self, batch, logs=None):
            now = time.time()
            self.event.setdefault("first_step", now)
            self.event["last_step"], self.event["steps"] = now, self.event["steps"] + 1

        def on_epoch_end(self, epoch, logs=None):
            self.event["end"] = time.time()
            print(EVENT + json.dumps(self.event), flush=True)

    fit = keras.Model.fit

    def stamped_fit(self, *args, callbacks=None, **kwargs):
        return fit(self, *args, callbacks=[*(callbacks or []), Stamps()], **kwargs)

    keras.Model.fit = stamped_fit


def main() -> None:
    stamp_every_fit()
    sys.argv = ["pipeline", *sys.argv[1:]]
    runpy.run_module("pipeline", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
