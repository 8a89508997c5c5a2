"""test_runs and test_execution_context: a run's lifecycle and its context as of now.

The context row is exactly ``events.context.fold`` of the run's stream: the projector
loads the stored context, folds the page's events of that stream onto it and stores the
result, so a dashboard reads what ``baton context`` shows (secret values as ciphertext).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from events.context import Context
from events.projections._sql import Column, excluded, from_jsonb, jsonb, upsert
from events.projections.catalog import Identity, as_uuid
from events.types import RunCancelled, RunCompleted, RunStarted


class RunRow(msgspec.Struct, kw_only=True):
    id: uuid.UUID
    organization_id: uuid.UUID
    project_id: uuid.UUID
    suite_id: uuid.UUID
    environment_id: uuid.UUID
    stream: str
    suite_digest: str
    source: str
    batch_id: uuid.UUID | None
    batch_row: int | None
    tags: list[str]
    status: str
    total_tests: int
    passed_tests: int = 0
    failed_tests: int = 0
    skipped_tests: int = 0
    duration_ms: float | None = None
    cancel_reason: str | None = None
    started_at: datetime
    ended_at: datetime | None = None

    def count(self, statuses: Iterable[str]) -> None:
        """Live counts from the statuses of the run's results."""
        seen = list(statuses)
        self.passed_tests = seen.count("passed")
        self.failed_tests = seen.count("failed")
        self.skipped_tests = seen.count("skipped")


_RUNS: list[Column] = [
    ("id", "uuid"),
    ("organization_id", "uuid"),
    ("project_id", "uuid"),
    ("suite_id", "uuid"),
    ("environment_id", "uuid"),
    ("stream", "text"),
    ("suite_digest", "text"),
    ("source", "text"),
    ("batch_id", "uuid"),
    ("batch_row", "int"),
    ("tags", "jsonb"),
    ("status", "text"),
    ("total_tests", "int"),
    ("passed_tests", "int"),
    ("failed_tests", "int"),
    ("skipped_tests", "int"),
    ("duration_ms", "float8"),
    ("cancel_reason", "text"),
    ("started_at", "timestamptz"),
    ("ended_at", "timestamptz"),
]
_RUN_NAMES = ", ".join(name for name, _ in _RUNS)
# what a run's later events change; identity columns are written once
_RUN_UPDATES = excluded(
    "status",
    "passed_tests",
    "failed_tests",
    "skipped_tests",
    "duration_ms",
    "cancel_reason",
    "ended_at",
)


def start_run(started: RunStarted, stream: str, at: datetime, identity: Identity) -> RunRow:
    batch_id = as_uuid("batch", started.batch_id) if started.batch_id else None
    return RunRow(
        id=as_uuid("run", started.run_id),
        organization_id=identity.organization_id,
        project_id=identity.project_id,
        suite_id=identity.suite_id,
        environment_id=identity.environment_id,
        stream=stream,
        suite_digest=started.suite_digest,
        source=started.source,
        batch_id=batch_id,
        batch_row=started.row if batch_id is not None else None,
        tags=list(started.tags),
        status="running",
        total_tests=len(started.plan),
        started_at=at,
    )


def complete(run: RunRow, event: RunCompleted, at: datetime) -> None:
    run.status = event.status
    run.duration_ms = event.duration_ms
    run.ended_at = at


def cancel(run: RunRow, event: RunCancelled, at: datetime) -> None:
    run.status = "cancelled"
    run.cancel_reason = event.reason
    run.ended_at = at


async def load_runs(conn: asyncpg.Connection, streams: Sequence[str]) -> dict[str, RunRow]:
    rows = await conn.fetch(f"SELECT {_RUN_NAMES} FROM test_runs WHERE stream = ANY($1)", streams)
    runs: dict[str, RunRow] = {}
    for row in rows:
        values: dict[str, Any] = dict(row)
        values["tags"] = from_jsonb(values["tags"], [])
        runs[row["stream"]] = RunRow(**values)
    return runs


async def write_runs(conn: asyncpg.Connection, runs: Iterable[RunRow]) -> None:
    rows = [
        tuple(jsonb(run.tags) if name == "tags" else getattr(run, name) for name, _ in _RUNS)
        for run in runs
    ]
    await upsert(conn, "test_runs", _RUNS, rows, key=["id"], update=_RUN_UPDATES)


# ---- test_execution_context ----------------------------------------------------------------

_CONTEXT_READ = (
    "SELECT run_id, status, shared_auth_tokens, shared_variables, secret_names, captured_data,"
    " test_order, statuses, attempts, version, position"
    " FROM test_execution_context WHERE run_id = ANY($1)"
)
# A context that retention removed (baton_expired_contexts) stays removed: a rebuild must
# give back what `baton retention apply` left, though the log still holds the run.
_CONTEXT_WRITE = """
INSERT INTO test_execution_context (run_id, organization_id, status, shared_auth_tokens,
    shared_variables, secret_names, captured_data, test_order, statuses, attempts, version,
    position, updated_at)
SELECT $1::uuid, $2::uuid, $3::text, $4::jsonb, $5::jsonb, $6::jsonb, $7::jsonb, $8::text[],
    $9::jsonb, $10::jsonb, $11::int, $12::bigint, $13::timestamptz
WHERE NOT EXISTS (SELECT FROM baton_expired_contexts WHERE run_id = $1)
ON CONFLICT (run_id) DO UPDATE SET status = excluded.status,
    shared_auth_tokens = excluded.shared_auth_tokens,
    shared_variables = excluded.shared_variables, secret_names = excluded.secret_names,
    captured_data = excluded.captured_data, test_order = excluded.test_order,
    statuses = excluded.statuses, attempts = excluded.attempts, version = excluded.version,
    position = excluded.position, updated_at = excluded.updated_at
"""


async def load_contexts(conn: asyncpg.Connection, runs: Sequence[RunRow]) -> dict[str, Context]:
    """The stored contexts of these runs by stream, ready to fold the next events onto.

    Only what the table stores comes back (run_id, suite and environment stay empty): the
    fold sets those from RunStarted, which an earlier page has folded already.
    """
    streams = {run.id: run.stream for run in runs}
    contexts: dict[str, Context] = {}
    for row in await conn.fetch(_CONTEXT_READ, list(streams)):
        contexts[streams[row["run_id"]]] = Context(
            stream=streams[row["run_id"]],
            status=row["status"],
            auth=from_jsonb(row["shared_auth_tokens"], {}),
            variables=from_jsonb(row["shared_variables"], {}),
            secret_names=from_jsonb(row["secret_names"], []),
            captured=from_jsonb(row["captured_data"], {}),
            order=list(row["test_order"]),
            statuses=from_jsonb(row["statuses"], {}),
            attempts=from_jsonb(row["attempts"], {}),
            version=row["version"],
            position=row["position"],
        )
    return contexts


async def write_contexts(
    conn: asyncpg.Connection, contexts: Iterable[tuple[RunRow, Context, datetime]]
) -> None:
    rows = [
        (
            run.id,
            run.organization_id,
            context.status,
            jsonb(context.auth),
            jsonb(context.variables),
            jsonb(context.secret_names),
            jsonb(context.captured),
            context.order,
            jsonb(context.statuses),
            jsonb(context.attempts),
            context.version,
            context.position,
            at,
        )
        for run, context, at in contexts
    ]
    if rows:
        await conn.executemany(_CONTEXT_WRITE, rows)
