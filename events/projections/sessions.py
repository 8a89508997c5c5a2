"""test_sessions and session_runs: a test session's state as its events leave it (the
same transitions as events.sessions.fold), and the runs admitted to it."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import asyncpg

from events import types as ev
from events.projections.catalog import DEFAULT_ORGANIZATION_ID, as_uuid, derive

_CREATE = """
INSERT INTO test_sessions (id, organization_id, project_id, name, description, tester, status,
    created_at)
VALUES ($1, $2, $3, $4, $5, $6, 'created', $7)
ON CONFLICT (id) DO NOTHING
"""
_STARTED = """
UPDATE test_sessions
   SET status = CASE WHEN status = 'created' THEN 'active' ELSE status END,
       started_at = coalesce(started_at, $2)
 WHERE id = $1
RETURNING organization_id
"""
_RUNS = """
INSERT INTO session_runs (session_id, run_id, organization_id, added_at)
SELECT $1, unnest($2::uuid[]), $3, $4
ON CONFLICT DO NOTHING
"""
_STATE = "UPDATE test_sessions SET status = $2, reason = $3, ended_at = $4 WHERE id = $1"


async def apply(conn: asyncpg.Connection, page: Sequence[ev.RecordedEvent]) -> None:
    for recorded in page:
        if recorded.stream.startswith(ev.SESSION_PREFIX):
            await _apply(conn, recorded)


async def _apply(conn: asyncpg.Connection, recorded: ev.RecordedEvent) -> None:
    event, at = recorded.event, recorded.recorded_at
    session = as_uuid("session", recorded.stream[len(ev.SESSION_PREFIX) :])
    if isinstance(event, ev.SessionCreated):
        org = uuid.UUID(event.organization) if event.organization else DEFAULT_ORGANIZATION_ID
        project = derive("project", org, event.project)
        await conn.execute(
            _CREATE, session, org, project, event.name, event.description, event.tester, at
        )
    elif isinstance(event, ev.SessionRunsStarted):
        org = await conn.fetchval(_STARTED, session, at)
        if org is not None:
            runs = [as_uuid("run", run_id) for run_id in event.run_ids]
            await conn.execute(_RUNS, session, runs, org, at)
    elif isinstance(event, ev.SessionPaused):
        await conn.execute(_STATE, session, "paused", event.reason, None)
    elif isinstance(event, ev.SessionResumed):
        await conn.execute(_STATE, session, "active", "", None)
    elif isinstance(event, ev.SessionCompleted):
        await conn.execute(_STATE, session, "completed", "", at)
    elif isinstance(event, ev.SessionFailed):
        await conn.execute(_STATE, session, "failed", event.reason, at)
