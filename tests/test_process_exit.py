"""Commands end without the interpreter's teardown, but with everything the teardown would have finished."""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import atexit, sys, threading, time
    from concurrent.futures import ThreadPoolExecutor
    from pipeline.process_exit import run_then_end

    class Big:  # stands for TensorFlow's graphs: freed one by one by the teardown
        def __del__(self):
            print("teardown ran", flush=True)

    kept = Big()
    pools = []
    atexit.register(lambda: print("atexit ran"))

    def late_write():  # a checkpoint still being written when main returns
        time.sleep(0.5)
        open(sys.argv[2], "w").write("committed")

    def main():
        threading.Thread(target=late_write).start()
        # A thread pool left open and still referenced, as a library's often is: joined without
        # threading's exit hooks, its idle workers would wait for work forever.
        pools.append(ThreadPoolExecutor(2))
        pools[0].submit(time.sleep, 0.1)
        sys.stdout.write("unflushed line without newline")
        {ending}

    if sys.argv[1] == "plain":
        main()
    else:
        run_then_end(main)
    """
)


@pytest.mark.parametrize(
    ("ending", "code", "stderr"),
    [("return None", 0, ""), ("sys.exit(2)", 2, ""), ("sys.exit('error: bad key')", 1, "error: bad key")],
)
def test_a_command_ends_with_its_code_its_output_and_its_threads_work_but_no_teardown(tmp_path, ending, code, stderr):
    script = tmp_path / "command.py"
    script.write_text(SCRIPT.format(ending=ending))
    marker = tmp_path / "written"
    done = subprocess.run(
        [sys.executable, str(script), "fast", str(marker)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == code, done.stderr
    assert done.stdout.startswith("unflushed line without newline")
    assert "atexit ran" in done.stdout
    assert marker.read_text() == "committed"
    assert done.stderr.strip() == stderr
    assert "teardown ran" not in done.stdout
    # Control: the same script ended the usual way goes through the teardown the fast way skips.
    marker.unlink()
    plain = subprocess.run(
        [sys.executable, str(script), "plain", str(marker)], capture_output=True, text=True, timeout=60
    )
    assert plain.returncode == code
    assert "teardown ran" in plain.stdout
    assert marker.read_text() == "committed"


def test_a_crash_keeps_its_traceback(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(
        "from pipeline.process_exit import run_then_end\n"
        "def main():\n    raise RuntimeError('a bug')\n"
        "run_then_end(main)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "RuntimeError: a bug" in done.stderr
