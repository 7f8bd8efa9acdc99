"""`distribute.local_workers=N`: start N multi-worker processes on this machine over loopback.

This process does what a cluster manager does: it picks N free ports, sets
TF_CONFIG for each worker, starts them with the same overrides, and watches
them. The chief (worker 0) prints to this terminal and writes into this run's
folder; the others log to `worker-<i>.log` there. When one worker fails, the
others would wait on it forever in their collective ops, so they are stopped
and the run ends with that worker's exit code. Each worker dies with this
process (PR_SET_PDEATHSIG), so `kill -9` leaves no orphans; running the same
command again resumes from the chief's checkpoints.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from pipeline.errors import WorkerFailed

# Set by the entry point for the children: paths a sweep job derived for itself.
FIXED_KEYS = ("checkpoint.dir=", "model.save_path=", "hydra.run.dir=", "hydra.output_subdir=")
GRACE_SECONDS = 15


def free_ports(count: int) -> list[int]:
    """Ports free on loopback now (held open together so they differ)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def worker_command(overrides: list[str], checkpoint_dir: str, save_path: str, run_dir: Path) -> list[str]:
    kept = [o for o in overrides if not o.lstrip("+~").startswith(FIXED_KEYS)]
    return [
        sys.executable,
        "-m",
        "pipeline",
        *kept,
        f"checkpoint.dir={quote(checkpoint_dir)}",
        f"model.save_path={quote(save_path)}",
        f"hydra.run.dir={quote(str(run_dir))}",
    ]


def quote(value: str) -> str:
    """A Hydra override value that keeps `=`, `,`, quotes and spaces (run folders are named from overrides).

    Inside Hydra's quotes a backslash escapes only a quote; others stay as they are.
    """
    return "'" + value.replace("'", "\\'") + "'"


def die_with_parent() -> None:
    """In the child before exec: receive SIGKILL when the launching process dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except OSError:  # not Linux: a killed launcher may then leave its workers running
        pass


def run_local_workers(count: int, overrides: list[str], checkpoint_dir: str, save_path: str, run_dir: Path) -> dict:
    """Run `count` workers to the end; return the chief's result.json contents."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(count)]}
    print(
        f"starting {count} local workers: {', '.join(cluster['worker'])}; worker 0 is the chief, "
        f"the others log to {run_dir}/worker-<i>.log",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="pipeline-workers-") as scratch, ExitStack() as stack:
        workers = []
        for index in range(count):
            env = dict(
                os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
            )
            # Only the chief's Hydra folder is the run's; the others' go with the scratch folder.
            own_dir = run_dir if index == 0 else Path(scratch) / f"worker-{index}"
            log = None if index == 0 else stack.enter_context(open(run_dir / f"worker-{index}.log", "w"))
            workers.append(
                subprocess.Popen(
                    worker_command(overrides, checkpoint_dir, save_path, own_dir),
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT if log else None,
                    preexec_fn=die_with_parent,
                )
            )
        watch(workers, run_dir)
    result = run_dir / "result.json"
    return json.loads(result.read_text()) if result.is_file() else {}


def watch(workers: list[subprocess.Popen], run_dir: Path) -> None:
    """Wait for every worker; on SIGTERM/SIGINT or a failed worker, stop them all."""
    stopping = []

    def forward(signum, _frame):
        stopping.append(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while any(proc.poll() is None for proc in workers):
            if stopping or any(proc.returncode not in (None, 0) for proc in workers):
                stop_all(workers)
                break
            time.sleep(0.5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopping:
        raise WorkerFailed(
            "stopped by a signal; run the same command to continue from the last checkpoint", 128 + signal.SIGTERM
        )
    failed = [(i, proc.returncode) for i, proc in enumerate(workers) if proc.returncode != 0]
    if failed:
        index, code = failed[0]
        where = "its messages are above" if index == 0 else f"its log: {run_dir}/worker-{index}.log"
        exit_code = 128 - code if code < 0 else code  # killed by signal N: the shell's 128+N
        raise WorkerFailed(
            f"worker {index} exited with code {exit_code} ({where}); the other workers "
            "were stopped. Run the same command to continue from the last checkpoint.",
            exit_code,
        )


def stop_all(workers: list[subprocess.Popen]) -> None:
    """SIGTERM every worker still running, SIGKILL those still there after a grace period."""
    for proc in workers:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.time() + GRACE_SECONDS
    for proc in workers:
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
