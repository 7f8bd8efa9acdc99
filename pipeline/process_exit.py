"""Ending a command once its work is done, without the interpreter's teardown.

After a run, Python's teardown frees TensorFlow's traced graphs and Keras's
objects one by one: about 3 s of every training command here, for memory the
system takes back at once when the process ends (docs/speed.md). So the
commands end with os._exit, after doing what the teardown would have done
that matters: waiting for non-daemon threads (a checkpoint still being
written), running the atexit handlers (logging's flush, MLflow's), and
flushing stdout and stderr. Every file the pipeline promises is already
written, fsynced and renamed by then.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from collections.abc import Callable
from typing import NoReturn


def exit_code_of(main: Callable[[], object]) -> int:
    """Run `main`; the code it exits with (0 when it returns). A crash still raises, with its traceback."""
    try:
        main()
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)  # what Python does with sys.exit("message")
        return 1
    return 0


def end_process(code: int) -> NoReturn:
    """Finish what the teardown would have finished, then end the process with `code` at once."""
    # Python's own exit, in its order: threading's exit hooks (which tell idle
    # ThreadPoolExecutor workers to stop: joined without them, they wait forever),
    # then every non-daemon thread joined, then the atexit handlers.
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing left to deliver
            pass
    os._exit(code)


def run_then_end(main: Callable[[], object]) -> NoReturn:
    """`main`'s exit code, without the teardown: the `if __name__ == "__main__"` of each command."""
    end_process(exit_code_of(main))
