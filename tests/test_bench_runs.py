"""The bench's reading of a run (pipeline/bench/runs.py): validation curves, time to accuracy, CPU seconds.

Not the bench itself (`make bench` is not a test and gates nothing): the parsing
its ratios rest on, checked on hand-written lines and one real child process.
"""

from __future__ import annotations

import sys

from pipeline.bench.runs import Run, run_process, time_to_accuracy, validation_curve

LINES = [
    "head epoch 1/2 (epoch 1 overall)",
    "3/3 - 9s - 3s/step - accuracy: 0.1667 - loss: 1.9578 - val_accuracy: 0.3333 - val_loss: 1.3243",
    "checkpoint: ckpt/transfer_01-0.33 (h5)",
    "Epoch 2/2",
    "3/3 - 1s - 153ms/step - accuracy: 0.4167 - loss: 2.0774 - val_accuracy: 0.8667 - val_loss: 1.3067",
    "done in 29 s: best val_accuracy 0.8667 (checkpoint transfer_02-0.87), last val_accuracy 0.8667",
]


def test_the_curve_has_one_point_per_epoch_line_on_either_clock():
    run = Run(0.0, 0, LINES, spawned=100.0, stamps=[101, 110, 111, 112, 120, 121], cpu_stamps=[1, 15, 16, 17, 30, 31])
    assert validation_curve(run) == [(10.0, 0.3333), (20.0, 0.8667)]  # not the summary line
    assert validation_curve(run, "cpu") == [(15, 0.3333), (30, 0.8667)]


def test_time_to_accuracy_is_the_first_epoch_at_or_above_the_target():
    curve = [(10.0, 0.5), (20.0, 0.7), (30.0, 0.65), (40.0, 0.9)]
    assert time_to_accuracy(curve, 0.7) == 20.0
    assert time_to_accuracy(curve, 0.66) == 20.0
    assert time_to_accuracy(curve, 0.95) is None


def test_cpu_seconds_count_a_busy_child_and_not_a_sleeping_one():
    # The busy child spins until it has had 0.5 s of CPU, however busy the machine is.
    spin = "import time\nwhile time.process_time() < 0.5: pass\nprint('x')"
    busy = run_process([sys.executable, "-c", spin])
    idle = run_process([sys.executable, "-c", "import time; time.sleep(0.5); print('x')"])
    assert busy.returncode == idle.returncode == 0
    assert busy.cpu_seconds >= 0.5, busy.cpu_seconds
    assert idle.cpu_seconds < 0.3, idle.cpu_seconds  # the interpreter's start-up only
    assert busy.cpu_stamps[-1] >= 0.45 > idle.cpu_stamps[-1]  # read from /proc as the line arrived
