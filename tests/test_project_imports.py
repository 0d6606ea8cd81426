"""Every name the project's code imports from its own modules exists, also in imports inside functions that no test
runs (a benchmark imported a check that had been folded into another: its first run stopped with an ImportError)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("modeling_cell2text", "processing", "training", "hub_cards")
SOURCES = sorted(path for folder in (*PACKAGES, "benchmarks", "examples") for path in (REPO / folder).rglob("*.py"))


def own_imports(path: Path) -> list[tuple[str, str, int]]:
    """(module, name, line) of every `from <project module> import name` in the file, at any depth."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:  # relative: from the file's package
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            module = f"{base}.{node.module}" if node.module else base
        else:
            module = node.module or ""
        if module.split(".")[0] in (*PACKAGES, "benchmarks", "cell2text_cli"):
            found += [(module, alias.name, node.lineno) for alias in node.names if alias.name != "*"]
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(REPO)))
def test_every_name_imported_from_the_project_exists(path):
    missing = []
    for module, name, line in own_imports(path):
        imported = importlib.import_module(module)
        if not hasattr(imported, name):
            try:  # a submodule imported by name
                importlib.import_module(f"{module}.{name}")
            except ModuleNotFoundError:
                missing.append(f"line {line}: {module}.{name}")
    assert not missing, missing
