"""The map of the code: the import contracts hold, and docs/architecture.md names every module."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
MAP = REPO / "docs" / "architecture.md"


def _lint_imports(root: Path, *contracts: str) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` with the contracts of ``root``/pyproject.toml on ``root``/fracture_node."""
    selected = [arg for c in contracts for arg in ("--contract", c)]
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo", *selected],
        cwd=root, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(root), *filter(None, [os.environ.get("PYTHONPATH")])])})


def test_import_contracts_hold() -> None:
    """Every import-linter contract of pyproject.toml is kept by the package as it is."""
    proc = _lint_imports(REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize(("module", "wrong_import", "contract"), [
    ("stages/score.py", "import fracture_node.cli.commands", "programs-apart"),
    ("stages/score.py", "import torch", "torch-in-ml"),
    ("stages/score.py", "import sqlalchemy", "sql-in-db"),
    ("stages/deliver.py", "import pynetdicom", "dicom-network-in-dicom"),
    ("config.py", "import fracture_node.ml.metrics", "config-without-ml"),
    ("saliency/record.py", "import fracture_node.ml.explain", "saliency-without-ml"),
    ("allocator.py", "import fracture_node.daemon", "no-cycles"),
])
def test_a_wrong_way_import_breaks_its_contract(tmp_path: Path, module: str, wrong_import: str,
                                                contract: str) -> None:
    """A copy of the package with one wrong-way import added fails the contract that forbids it."""
    shutil.copytree(REPO / "fracture_node", tmp_path / "fracture_node",
                    ignore=shutil.ignore_patterns("__pycache__", "models", "_migrations"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "fracture_node" / module
    target.write_text(target.read_text() + f"\n{wrong_import}  # noqa\n")
    proc = _lint_imports(tmp_path, contract)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 broken" in proc.stdout


def _modules() -> set[str]:
    package = REPO / "fracture_node"
    return {p.relative_to(REPO).as_posix() for p in package.rglob("*.py")
            if "__pycache__" not in p.parts and p.name != "__init__.py"
            and "_migrations" not in p.parts}


def test_every_module_the_map_names_exists() -> None:
    """Each ``.py`` path and ``fracture_node/`` folder in docs/architecture.md is in the tree."""
    text = MAP.read_text()
    named = set(re.findall(r"[\w/]+\.py\b", text)) | set(re.findall(r"fracture_node/[\w/]*/", text))
    # Short paths (`db/store.py`) are relative to the package, long ones to the repository.
    missing = sorted(p for p in named
                     if not (REPO / p).exists() and not (REPO / "fracture_node" / p).exists())
    assert len(named) > 50
    assert not missing, f"docs/architecture.md names what is not in the tree: {missing}"


def test_the_map_names_every_module() -> None:
    """Every module of the package (``__init__`` aside) is named in docs/architecture.md."""
    text = MAP.read_text()
    unnamed = sorted(m for m in _modules() if f"`{m}`" not in text)
    assert not unnamed, f"docs/architecture.md does not name: {unnamed}"


def test_every_error_class_lives_in_errors_py() -> None:
    """``errors.py`` says every error raised on purpose is a FractureNodeError: they are all
    defined there, none in another module."""
    import ast

    elsewhere = []
    for path in (REPO / "fracture_node").rglob("*.py"):
        if path.name == "errors.py" or "_migrations" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    getattr(b, "id", getattr(b, "attr", "")).endswith(("Error", "Exception"))
                    for b in node.bases):
                elsewhere.append(f"{path.relative_to(REPO)}:{node.name}")
    assert not elsewhere, elsewhere


def test_tests_share_helpers_only_through_tests_support() -> None:
    """No test module imports another test module or a conftest: what tests share lives in
    ``tests/support/``."""
    import ast

    wrong = []
    for path in (REPO / "tests").rglob("*.py"):
        if "support" in path.relative_to(REPO / "tests").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                parts = name.split(".")
                if parts[0] == "tests" and (parts[-1].startswith(("test_", "conftest"))
                                            or (len(parts) > 1 and parts[1] in
                                                ("unit", "integration", "e2e"))):
                    wrong.append(f"{path.relative_to(REPO)}: {name}")
    assert not wrong, wrong
