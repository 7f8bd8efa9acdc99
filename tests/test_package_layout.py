"""The package's layout stays readable: every module says what it owns, and docs/architecture.md lists it."""

from __future__ import annotations

import ast

from conftest import REPO

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
