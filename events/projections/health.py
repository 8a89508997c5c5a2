"""service_health_checks: every ServiceHealthChecked, as a row (the history of a service's
health; the latest row per service is its state)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import asyncpg

from events.projections.catalog import DEFAULT_ORGANIZATION_ID, as_uuid, derive
from events.types import HEALTH_PREFIX, RecordedEvent, ServiceHealthChecked

_INSERT = """
INSERT INTO service_health_checks (id, organization_id, project_id, suite, service, url,
    status, attempts, response_time_ms, status_code, error, session_id, position, checked_at)
SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[],
    $7::text[], $8::int[], $9::float8[], $10::int[], $11::text[], $12::uuid[], $13::int8[],
    $14::timestamptz[])
ON CONFLICT (id) DO NOTHING
"""


async def apply(conn: asyncpg.Connection, page: Sequence[RecordedEvent]) -> None:
    rows = [
        _row(recorded, recorded.event)
        for recorded in page
        if recorded.stream.startswith(HEALTH_PREFIX)
        and isinstance(recorded.event, ServiceHealthChecked)
    ]
    if rows:
        await conn.execute(_INSERT, *[list(column) for column in zip(*rows, strict=True)])


def _row(recorded: RecordedEvent, event: ServiceHealthChecked) -> tuple[object, ...]:
    organization = uuid.UUID(event.organization) if event.organization else DEFAULT_ORGANIZATION_ID
    return (
        recorded.id,
        organization,
        derive("project", organization, event.project),
        event.suite,
        event.service,
        event.url,
        event.status,
        event.attempts,
        event.response_time_ms,
        event.status_code,
        event.error,
        as_uuid("session", event.session_id) if event.session_id else None,
        recorded.position,
        recorded.recorded_at,
    )
