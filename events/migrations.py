"""Versioned schema: schema.sql as numbered steps, applied once each, in order.

schema.sql starts with a preamble (the version table), then steps that each begin with a
line ``-- step N: name``. Every statement in the file is idempotent too, so ``psql -f
schema.sql`` also works, but Baton applies only the steps that ``baton_schema_version`` does
not list yet: a connect to an up-to-date database costs one query, and a step that was
applied is never run again. A change is a new step at the end, never an edit of an applied
one (tests/test_schema.py holds the digest of every step to catch that).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import re
from datetime import datetime
from pathlib import Path

import asyncpg
import msgspec

from events.store import StoreError

# Different key from baton_append's lock: applying the schema must not wait for appends.
SCHEMA_LOCK = 7283540231093542000

_STEP = re.compile(r"^-- step (\d+): (.+)$", re.MULTILINE)
_APPLIED = "SELECT step FROM baton_schema_version"
_RECORD = (
    "INSERT INTO baton_schema_version (step, name) VALUES ($1, $2) ON CONFLICT (step) DO NOTHING"
)


class Step(msgspec.Struct, frozen=True):
    number: int
    name: str
    sql: str

    @property
    def digest(self) -> str:
        """sha256 of the step's text: an applied step's digest never changes."""
        return hashlib.sha256(self.sql.strip().encode()).hexdigest()


class AppliedStep(msgspec.Struct, frozen=True):
    number: int
    name: str
    applied_at: datetime


class SchemaStatus(msgspec.Struct, frozen=True):
    applied: list[AppliedStep]
    available: list[Step]

    @property
    def current(self) -> int:
        """The highest applied step, 0 for an empty database."""
        return max((step.number for step in self.applied), default=0)

    @property
    def latest(self) -> int:
        """The highest step this version of Baton knows."""
        return max((step.number for step in self.available), default=0)

    @property
    def pending(self) -> list[Step]:
        done = {step.number for step in self.applied}
        return [step for step in self.available if step.number not in done]


def schema_sql() -> str:
    """The text of schema.sql.

    The one copy is the repository's top-level schema.sql. An installed wheel carries it as
    ``events/schema.sql`` (pyproject.toml's force-include); a source checkout or an editable
    install finds it beside the packages.
    """
    packaged = importlib.resources.files("events") / "schema.sql"
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    beside = Path(__file__).resolve().parent.parent / "schema.sql"
    if beside.is_file():
        return beside.read_text(encoding="utf-8")
    raise StoreError(f"schema.sql not found (looked in the events package and at {beside})")


def parse_steps(text: str) -> tuple[str, list[Step]]:
    """(preamble, steps) of a schema file; steps must be numbered 1, 2, 3... in order."""
    marks = list(_STEP.finditer(text))
    preamble = text[: marks[0].start()] if marks else text
    steps: list[Step] = []
    for index, mark in enumerate(marks):
        end = marks[index + 1].start() if index + 1 < len(marks) else len(text)
        steps.append(Step(int(mark.group(1)), mark.group(2).strip(), text[mark.start() : end]))
    numbers = [step.number for step in steps]
    if numbers != list(range(1, len(steps) + 1)):
        raise StoreError(f"schema.sql: steps must be numbered 1, 2, 3... in order, not {numbers}")
    return preamble, steps


async def _applied_numbers(conn: asyncpg.Connection) -> set[int]:
    exists = await conn.fetchval("SELECT to_regclass('baton_schema_version') IS NOT NULL")
    if not exists:
        return set()
    return {row[0] for row in await conn.fetch(_APPLIED)}


async def apply_pending(conn: asyncpg.Connection) -> list[Step]:
    """Apply the steps the database lacks, in one transaction; return them.

    Processes that start together serialise on an advisory lock, and the second one finds
    nothing left to do. Raises asyncpg errors (callers translate them).
    """
    preamble, steps = parse_steps(schema_sql())
    done = await _applied_numbers(conn)
    if all(step.number in done for step in steps):
        return []
    async with conn.transaction():
        await conn.execute("SET LOCAL client_min_messages = warning")
        await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
        done = await _applied_numbers(conn)  # another process may have applied them meanwhile
        pending = [step for step in steps if step.number not in done]
        if pending:
            await conn.execute(preamble)
        for step in pending:
            await conn.execute(step.sql)
            await conn.execute(_RECORD, step.number, step.name)
    return pending


async def status(conn: asyncpg.Connection) -> SchemaStatus:
    _, steps = parse_steps(schema_sql())
    applied: list[AppliedStep] = []
    if await _applied_numbers(conn):
        rows = await conn.fetch("SELECT step, name, applied_at FROM baton_schema_version")
        applied = [AppliedStep(row[0], row[1], row[2]) for row in rows]
        applied.sort(key=lambda step: step.number)
    return SchemaStatus(applied=applied, available=steps)


async def migrate(dsn: str) -> list[Step]:
    """``baton db migrate``: apply the pending steps of schema.sql; return those applied.

    Raises StoreUnavailable when the server cannot be reached, StoreError otherwise.
    """
    from events.postgres import driver_errors

    with driver_errors(dsn):
        conn = await asyncpg.connect(dsn)
        try:
            return await apply_pending(conn)
        finally:
            await conn.close()


async def schema_status(dsn: str) -> SchemaStatus:
    """``baton db status``: the steps applied (number, name, when) and the latest known."""
    from events.postgres import driver_errors

    with driver_errors(dsn):
        conn = await asyncpg.connect(dsn)
        try:
            return await status(conn)
        finally:
            await conn.close()
