"""The house rule: every import points down the floors of docs/design.md ("Layers").

The floors are import-linter's layers contract in pyproject.toml; these tests run it on
the tree, so a new upward import fails CI, and check what the contract alone cannot: that
every package of mechhi sits on a floor (a new package cannot escape the rule), that
nothing imports the ``mechhi`` root (it is the public API on top), and that project
imports sit at the top of their files, except in the command modules, which import their
engines when a command runs so that `mechhi --help` starts without torch.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
LAZY_ALLOWED = ("mechhi/commands/", "mechhi/__init__.py")  # start-up time: see the module doc


def _contract() -> dict:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    return contract


def _floors() -> list[str]:
    return [m.strip() for layer in _contract()["layers"] for m in re.split(r"[|:]", layer)]


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("mechhi", "probes")


def test_the_layers_contract_is_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "1 kept, 0 broken" in result.stdout


def test_every_package_sits_on_a_floor(graph):
    floors = set(_floors())
    children = {m for m in graph.modules if m.count(".") == 1 and m.startswith("mechhi.")} | {"probes"}
    missing = sorted(
        m for m in children if m not in floors and not any(m.startswith(f + ".") for f in floors)
    )
    assert not missing, f"not on any floor of the layers contract (pyproject.toml): {missing}"


def test_the_contract_breaks_on_an_upward_import(tmp_path):
    """The check can fail: a copy of the tree with one upward import (store -> trace) breaks it."""
    copy = tmp_path / "tree"
    for name in ("mechhi", "probes"):
        shutil.copytree(
            ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__", "zoo", "bundled")
        )
    (copy / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    target = copy / "mechhi" / "store" / "read.py"
    target.write_text(target.read_text() + "\nfrom mechhi.trace import sites  # noqa: E402, F401\n")
    lint = Path(sys.executable).with_name("lint-imports")
    env = {"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([str(lint), "--no-cache"], cwd=copy, capture_output=True, text=True, env=env)
    assert result.returncode != 0
    assert "mechhi.store is not allowed to import mechhi.trace" in result.stdout


def test_nothing_imports_the_public_api_root(graph):
    importers = sorted(graph.find_modules_that_directly_import("mechhi"))
    assert importers == [], f"import from the stage packages, not the root: {importers}"


def _lazy_project_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if (
                    isinstance(inner, ast.ImportFrom)
                    and inner.module
                    and inner.module.split(".")[0] in ("mechhi", "probes")
                ):
                    found.append(f"{path.relative_to(ROOT)}:{inner.lineno} from {inner.module}")
                if isinstance(inner, ast.Import) and any(
                    a.name.split(".")[0] in ("mechhi", "probes") for a in inner.names
                ):
                    found.append(f"{path.relative_to(ROOT)}:{inner.lineno} import")
    return found


def test_project_imports_sit_at_the_top_of_their_files():
    files = [p for d in ("mechhi", "probes") for p in (ROOT / d).rglob("*.py")]
    lazy = [
        hit
        for p in files
        if not str(p.relative_to(ROOT)).startswith(LAZY_ALLOWED)
        for hit in _lazy_project_imports(p)
    ]
    assert not lazy, "project imports inside functions (move them to the top):\n" + "\n".join(lazy)
