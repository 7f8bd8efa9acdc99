"""Background checkpoint writes: the files hold the model as it was at submit time,
a failure surfaces as the same CheckpointError, and a kill -9 mid-write leaves the
previous checkpoint usable."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import REPO, cli_env, from_conf
from test_checkpoint import (
    FINGERPRINT,
    KINDS,
    X,
    Y,
    assert_same_weights,
    fresh_model,
    trained_model,
)

from pipeline.checkpoints import store as checkpoint
from pipeline.checkpoints.store import checkpoint_stem, clean_leftovers, list_checkpoints, restore, verify
from pipeline.checkpoints.writer import CheckpointWriter
from pipeline.errors import CheckpointError
from pipeline.state import TrainState


def submit(writer, model, epoch):
    state = TrainState(phase="head", phase_epoch=epoch, epoch=epoch)
    logs = {"val_accuracy": 0.25 + epoch / 100}
    stem = checkpoint_stem(writer.cfg, state, logs)
    writer.submit(model, stem, state, logs)
    return stem


# Every format with the small model; InceptionV3 (slow) with the default h5 and with tf_checkpoint,
# the one format written from a twin of its own: keras and weights_h5 take h5's path through the writer.
CASES = [("small", fmt) for fmt in ("keras", "h5", "weights_h5", "tf_checkpoint")] + [
    pytest.param(kind.values[0], fmt, marks=kind.marks) for kind in KINDS[1:] for fmt in ("h5", "tf_checkpoint")
]


@pytest.mark.parametrize("kind, fmt", CASES)
def test_a_background_write_holds_the_model_as_it_was_at_submit(tmp_path, fmt, kind):
    model = trained_model(kind)
    cfg = from_conf("checkpoint", dir=str(tmp_path), format=fmt, asynchronous=True)
    writer = CheckpointWriter(cfg, FINGERPRINT, model)
    submit(writer, model, 1)
    at_submit = fresh_model(kind)
    at_submit.set_weights(model.get_weights())
    optimizer_at_submit = [v.numpy() for v in model.optimizer.variables]
    model.fit(X, Y, batch_size=4, epochs=1, verbose=0)  # training goes on while the write runs
    writer.wait()
    ckpt = list_checkpoints(tmp_path)[-1]
    assert verify(ckpt) is None
    restored = fresh_model(kind)
    restore(restored, ckpt)
    assert_same_weights(at_submit, restored)
    for saved, now in zip(optimizer_at_submit, restored.optimizer.variables, strict=True):
        np.testing.assert_array_equal(saved, now.numpy())
    assert not np.array_equal(model.get_weights()[-1], restored.get_weights()[-1])


def test_synchronous_writes_still_work(tmp_path):
    model = trained_model()
    writer = CheckpointWriter(from_conf("checkpoint", dir=str(tmp_path), asynchronous=False), FINGERPRINT, model)
    stem = submit(writer, model, 1)
    assert writer.thread is None and writer.snapshot is None
    restored = fresh_model()
    restore(restored, list_checkpoints(tmp_path)[-1])
    assert list_checkpoints(tmp_path)[-1].stem == stem
    assert_same_weights(model, restored)


def test_a_full_disk_in_the_background_surfaces_as_the_same_error(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "_reached", {})
    monkeypatch.setenv("PIPELINE_ENOSPC_AT", "after_write#2")
    model = trained_model()
    writer = CheckpointWriter(
        from_conf("checkpoint", dir=str(tmp_path), format="h5", asynchronous=True), FINGERPRINT, model
    )
    first = submit(writer, model, 1)
    submit(writer, model, 2)
    with pytest.raises(CheckpointError, match=f"No space left on device: .*{tmp_path}"):
        writer.wait()
    writer.wait()  # raised once, then the writer is usable again
    assert [c.stem for c in list_checkpoints(tmp_path)] == [first]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([first + ".manifest.json", first + ".h5", first + ".state.npz"])


KILLED_MID_WRITE = textwrap.dedent("""
    import sys
    import numpy as np
    from conftest import from_conf
    from test_checkpoint import FINGERPRINT, X, Y, trained_model
    from pipeline.state import TrainState
    from pipeline.checkpoints.writer import CheckpointWriter

    model = trained_model()
    writer = CheckpointWriter(from_conf("checkpoint", dir=sys.argv[1], format="keras", asynchronous=True), FINGERPRINT,
                              model)
    for epoch in (1, 2):
        writer.submit(model, f"epoch{epoch}", TrainState(phase_epoch=epoch, epoch=epoch), {})
        if epoch == 1:  # the model as the first checkpoint must hold it
            np.savez(sys.argv[2], *model.get_weights())
        print(f"submitted {epoch}", flush=True)
        model.fit(X, Y, batch_size=4, epochs=3, verbose=0)  # killed in here by the writer thread
    writer.wait()
    print("not killed", flush=True)
""")


@pytest.mark.parametrize("kill_at", ["after_write#2", "before_manifest#2"])
def test_kill_9_during_a_background_write_keeps_the_previous_checkpoint(tmp_path, kill_at):
    run = subprocess.run(
        [sys.executable, "-c", KILLED_MID_WRITE, str(tmp_path / "ckpt"), str(tmp_path / "at_submit.npz")],
        cwd=REPO / "tests",
        env=cli_env(PIPELINE_KILL_AT=kill_at, PYTHONPATH=str(REPO)),  # this checkout's pipeline, not an installed one
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == -signal.SIGKILL, run.stdout + run.stderr
    assert "submitted 2" in run.stdout and "not killed" not in run.stdout
    clean_leftovers(tmp_path / "ckpt")
    found = list_checkpoints(tmp_path / "ckpt")
    assert [c.stem for c in found] == ["epoch1"] and verify(found[0]) is None
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted(
        ["epoch1.manifest.json", "epoch1.keras", "epoch1.state.npz"]
    )
    restored = fresh_model()
    restore(restored, found[0])
    at_submit = np.load(tmp_path / "at_submit.npz")
    saved = [at_submit[f"arr_{i}"] for i in range(len(at_submit.files))]
    for expected, got in zip(saved, restored.get_weights(), strict=True):
        np.testing.assert_array_equal(got, expected)
