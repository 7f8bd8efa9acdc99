"""The errors' one home: TensorFlow-free, and the one place that sorts user errors from crashes."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
from conftest import REPO, cli_env

from pipeline import errors


def test_entry_point_and_errors_import_without_tensorflow():
    # A fresh interpreter: this test process may already hold TensorFlow from other tests.
    check = "import pipeline.__main__, pipeline.errors, sys; assert 'tensorflow' not in sys.modules, 'tensorflow'"
    result = subprocess.run([sys.executable, "-c", check], cwd=REPO, env=cli_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "err",
    [
        errors.ConfigError("data.dir"),
        errors.DataError("data/train"),
        errors.WeightsError("model.weights"),
        errors.CheckpointError("ckpt"),
        errors.JobUserError("a sweep job's data.dir"),
    ],
)
def test_user_errors_are_sorted_as_user_errors(err):
    assert errors.is_user_error(err) and not errors.is_preemption(err)


@pytest.mark.parametrize("err", [errors.Preempted("SIGTERM"), errors.JobPreempted("SIGTERM")])
def test_preemptions_are_sorted_as_preemptions(err):
    assert errors.is_preemption(err) and not errors.is_user_error(err)


@pytest.mark.parametrize("err", [RuntimeError("a bug"), ValueError("a bug"), KeyError("a bug")])
def test_anything_else_is_a_crash_that_keeps_its_traceback(err):
    assert not errors.is_user_error(err) and not errors.is_preemption(err)


def test_no_other_module_defines_an_exception():
    """A new error class belongs in pipeline/errors.py, where the entry point can sort it."""
    elsewhere = []
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        if path.name == "errors.py" and path.parent.name == "pipeline":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            bases = [ast.unparse(b) for b in getattr(node, "bases", [])]
            if isinstance(node, ast.ClassDef) and any(b.endswith(("Error", "Exception")) for b in bases):
                elsewhere.append(f"{path.relative_to(REPO)}: {node.name}")
    assert elsewhere == []
