"""Reads of the read tables that a user needs: recent runs with filters, one run's results.

The CLI runs these as the tables' owner (one organization on a laptop); the service runs
its own queries under row-level security.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import msgspec

from events.postgres import PostgresEventStore


class RunFilter(msgspec.Struct, frozen=True, kw_only=True):
    status: str | None = None
    suite: str | None = None
    tag: str | None = None
    environment: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 20


class RunRow(msgspec.Struct, frozen=True):
    run_id: str
    suite: str
    environment: str
    status: str
    total: int
    passed: int
    failed: int
    skipped: int
    duration_ms: float | None
    started_at: datetime
    batch_row: int | None
    ended_at: datetime | None
    cancel_reason: str | None
    tags: list[str]


class ResultRow(msgspec.Struct, frozen=True):
    test: str
    status: str
    attempts: int
    duration_ms: float | None
    response_status: int | None
    category: str | None
    message: str


_SELECT_RUNS = """
SELECT r.id::text, s.name, e.name, r.status, r.total_tests, r.passed_tests, r.failed_tests,
       r.skipped_tests, r.duration_ms, r.started_at, r.batch_row, r.ended_at, r.cancel_reason,
       r.tags::text
FROM test_runs r
JOIN test_suites s ON s.id = r.suite_id
JOIN environments e ON e.id = r.environment_id
"""

_ONE_RUN = _SELECT_RUNS + "WHERE r.id = $1"

_RUNS = (
    _SELECT_RUNS
    + """
WHERE ($1::text IS NULL OR r.status = $1)
  AND ($2::text IS NULL OR s.name = $2)
  AND ($3::text IS NULL OR r.tags @> jsonb_build_array($3::text))
  AND ($4::text IS NULL OR e.name = $4)
  AND ($5::timestamptz IS NULL OR r.started_at >= $5)
  AND ($6::timestamptz IS NULL OR r.started_at < $6)
ORDER BY r.started_at DESC, r.id
LIMIT $7
"""
)

_RESULTS = """
SELECT test_name, status, attempts, duration_ms, response_status, category, message
FROM test_results WHERE run_id = $1
ORDER BY started_at NULLS LAST, test_name
"""


async def recent_runs(store: PostgresEventStore, where: RunFilter) -> list[RunRow]:
    rows = await store.pool.fetch(
        _RUNS,
        where.status,
        where.suite,
        where.tag,
        where.environment,
        where.since,
        where.until,
        where.limit,
    )
    return [_run(row) for row in rows]


async def run_with_results(
    store: PostgresEventStore, run_id: str
) -> tuple[RunRow, list[ResultRow]] | None:
    """A run and its tests' results, or None if the read tables do not hold it."""
    try:
        key = uuid.UUID(run_id)
    except ValueError:
        return None
    rows = await store.pool.fetch(_ONE_RUN, key)
    if not rows:
        return None
    results = await store.pool.fetch(_RESULTS, key)
    return _run(rows[0]), [ResultRow(*row) for row in results]


def _run(row: Any) -> RunRow:
    values = list(row)
    values[-1] = msgspec.json.decode(values[-1])
    return RunRow(*values)
