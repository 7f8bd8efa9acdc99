"""The package's layout stays readable: every module says what it owns, and docs/architecture.md lists it."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys

from conftest import REPO, cli_env

MODULES = sorted(p for p in (REPO / "pipeline").rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_opens_with_a_line_saying_what_it_owns():
    silent = [str(p.relative_to(REPO)) for p in MODULES if not ast.get_docstring(ast.parse(p.read_text()))]
    assert silent == []


def test_docs_architecture_lists_every_module_with_its_opening_line():
    listing = (REPO / "docs" / "architecture.md").read_text()
    missing = []
    for path in MODULES:
        opening = ast.get_docstring(ast.parse(path.read_text())).strip().split("\n")[0]
        if f"{path.name}" not in listing or opening not in listing:
            missing.append(f"{path.relative_to(REPO)}: {opening}")
    assert missing == [], "docs/architecture.md's layout is out of date:\n" + "\n".join(missing)


def test_nothing_outside_bench_imports_bench():
    importers = []
    for path in MODULES:
        if "bench" in path.relative_to(REPO / "pipeline").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if any(name == "pipeline.bench" or name.startswith("pipeline.bench.") for name in names):
                importers.append(str(path.relative_to(REPO)))
    assert importers == []


def test_a_command_starts_without_importing_scikit_learn():
    """Keras imports scikit-learn (and with it scipy.stats) whenever it is installed, 1.8 s of each
    command's start; the commands keep it out (quiet.keep_scikit_learn_out)."""
    loaded = "import sys; print(sorted(m for m in ('sklearn', 'scipy.stats') if sys.modules.get(m) is not None))"
    command = (
        f"from pipeline.quiet import import_tensorflow_quietly; import_tensorflow_quietly(); import keras; {loaded}"
    )
    result = subprocess.run([sys.executable, "-c", command], cwd=REPO, env=cli_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "[]"
    if importlib.util.find_spec("sklearn") is not None:  # installed (the mlflow extra): the control
        plain = subprocess.run(
            [sys.executable, "-c", f"import keras; {loaded}"], cwd=REPO, env=cli_env(), capture_output=True, text=True
        )
        assert plain.stdout.split("\n")[-2] == "['scipy.stats', 'sklearn']", plain.stdout + plain.stderr
