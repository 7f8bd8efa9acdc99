"""What the stand-alone commands (predict, evaluate, export) share: a quiet start and one-line errors.

Input a user can fix (a missing file, a folder the model cannot score) ends
with one `error:` line naming it and exit code 2, as `python -m pipeline` does;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from pipeline.errors import CommandError

# TensorFlow's C++ start-up chatter hides the messages that matter.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def run_command(body: Callable[[], int]) -> None:
    """Run a command's body and exit with its code; CommandError becomes `error: ...` and code 2."""
    try:
        code = body()
    except CommandError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    except BrokenPipeError:  # `... | head` closed the pipe: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def start_tensorflow() -> None:
    """Import TensorFlow only once the input is known good: bad input fails in a second."""
    from pipeline.quiet import import_tensorflow_quietly

    import_tensorflow_quietly()
