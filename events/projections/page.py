"""One page of the log applied to every read table, inside the caller's transaction.

Load the rows the page touches, move them on in memory event by event, write each table
once: a handful of statements per page instead of several per event.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg

from events.context import Context, fold
from events.projections import health, metrics, sessions
from events.projections.catalog import DEFAULT_ORGANIZATION_ID, Catalog
from events.projections.results import Results, load_results
from events.projections.runs import (
    RunRow,
    cancel,
    complete,
    load_contexts,
    load_runs,
    start_run,
    write_contexts,
    write_runs,
)
from events.types import RecordedEvent, RunCancelled, RunCompleted, RunStarted

RUN_PREFIX = "run-"

READ_TABLES = (
    "projects",
    "environments",
    "test_suites",
    "test_cases",
    "test_dependencies",
    "test_runs",
    "test_execution_context",
    "test_results",
    "test_result_details",
    "performance_metrics",
    "test_run_history",
    "failure_analysis",
    "service_health_checks",
    "test_sessions",
    "session_runs",
    "run_metrics",
    "failure_metrics",
)
"""Every table the projector writes, parents first. organizations is not one of them: its
rows are not derived from events (schema.sql creates the default one)."""


async def apply_page(conn: asyncpg.Connection, page: Sequence[RecordedEvent]) -> None:
    """Apply events (in position order, a run's events in version order) to the read tables.

    Health checks go to service_health_checks, sessions to test_sessions; events of
    other streams (batches) change no table. The events of a run
    whose RunStarted the read tables do not hold are ignored: there is no run to attach
    them to (a log always starts a run's stream with RunStarted).
    """
    await health.apply(conn, page)
    await sessions.apply(conn, page)
    by_stream: dict[str, list[RecordedEvent]] = {}
    for recorded in page:
        if recorded.stream.startswith(RUN_PREFIX):
            by_stream.setdefault(recorded.stream, []).append(recorded)
    if not by_stream:
        return
    runs = await load_runs(conn, list(by_stream))
    known = list(runs.values())
    contexts = await load_contexts(conn, known)
    results = Results(await load_results(conn, [run.id for run in known]))
    catalog = Catalog()
    touched: dict[str, tuple[RunRow, datetime]] = {}
    for recorded in page:
        event = recorded.event
        stream = recorded.stream
        if isinstance(event, RunStarted) and stream in by_stream and stream not in runs:
            # CLI runs belong to the default organization; the service's runs name theirs
            organization = (
                uuid.UUID(event.organization) if event.organization else DEFAULT_ORGANIZATION_ID
            )
            identity = catalog.add(event, recorded.recorded_at, organization)
            runs[stream] = start_run(event, stream, recorded.recorded_at, identity)
            results.start(runs[stream], identity)
        run = runs.get(stream)
        if run is None:
            continue
        if isinstance(event, RunCompleted):
            complete(run, event, recorded.recorded_at)
        elif isinstance(event, RunCancelled):
            cancel(run, event, recorded.recorded_at)
        else:
            results.apply(run, recorded)
        touched[stream] = (run, recorded.recorded_at)
    folded: list[tuple[RunRow, Context, datetime]] = []
    for stream, (run, at) in touched.items():
        run.count(results.statuses(run.id))
        context = fold(by_stream[stream], contexts.get(stream))
        folded.append((run, context, at))
    await catalog.write(conn)
    await write_runs(conn, [run for run, _ in touched.values()])
    await write_contexts(conn, folded)
    days = await results.write(conn)
    await metrics.refresh(conn, days)
    await metrics.refresh_failures(conn, results.failure_days)
    await metrics.refresh_runs(
        conn,
        {
            (run.suite_id, run.environment_id, run.ended_at.astimezone(UTC).date())
            for run, _ in touched.values()
            if run.ended_at is not None
        },
    )
