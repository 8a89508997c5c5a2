"""Retention applied: what ``events.retention.due`` names is archived, then removed.

Archive layout (docs/retention.md), under the archive directory and a project's folder,
by the month the run started (or the metrics' month)::

    <project>/<YYYY-MM>/events/<run id>.jsonl.gz     the run's events (events.archive)
    <project>/<YYYY-MM>/results/<run id>.jsonl.gz    its read rows, {"table", "row"} a line
    <project>/<YYYY-MM>/contexts/<run id>.jsonl.gz   a context that expired before its run
    <project>/<YYYY-MM>/metrics/<organization id>.jsonl.gz   monthly metric rows

Every file is written and fsynced before a row or an event it holds is removed, so a crash
at any point leaves each thing in the database, the archive, or both; the next apply
finishes what is left (a run whose events are gone already is not archived twice). A second
apply at the same time finds nothing due. One apply at a time per database (an advisory
lock): ``baton serve`` on several machines does not archive a run twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import msgspec

from events.archive import (
    archived,
    durable,
    events_path,
    project_dir,
    restore_run,
    write_lines,
)
from events.cache import ContextCache
from events.errors import ArchiveError
from events.postgres import PostgresEventStore, driver_errors
from events.projections import metrics, project
from events.projections.page import apply_page
from events.retention import DEFAULT, Due, MonthFacts, Policy, RunFacts, due, earliest_window
from events.retention_sql import (
    CONTEXT_ROW,
    ENDED_RUNS,
    LOCK,
    MARK_CONTEXTS_EXPIRED,
    MONTH_ROWS,
    MONTHS,
    POLICIES,
    REMOVE_CONTEXTS,
    REMOVE_MONTH,
    REMOVE_RUNS,
    RESET_POLICY,
    RESULT_DAYS,
    RUN_DAYS,
    RUN_PROJECTS,
    RUN_ROWS,
    SET_POLICY,
    TAKE_MONTHS,
    TIDY_CATALOG,
    UNLOCK,
)
from events.types import run_stream

_encode = msgspec.json.Encoder().encode
_log = logging.getLogger("baton.retention")
CHUNK = 200
"""Runs removed per transaction: each one recomputes the rollups of its runs' days."""


class Report(msgspec.Struct, kw_only=True):
    now: datetime
    dry_run: bool
    counts: dict[tuple[str, str], int] = {}
    """(what, project) -> how many: 'passed runs', 'failed runs', 'contexts',
    'monthly metric rows'."""
    months_taken: int = 0
    """Monthly metric rows written from the results that left."""
    files: list[Path] = []

    def lines(self) -> list[str]:
        verb = "would archive and remove" if self.dry_run else "archived and removed"
        head = f"retention at {self.now.isoformat(timespec='seconds')}"
        if not self.counts:
            return [f"{head}: nothing is due"]
        lines = [f"{head}: {verb}" + (" (dry run: nothing changed)" if self.dry_run else "")]
        for (what, name), count in sorted(self.counts.items(), key=lambda item: item[0][::-1]):
            lines.append(f"  {name:<20} {count:>6} {what}")
        if not self.dry_run:
            lines.append(f"  monthly metric rows taken from the results: {self.months_taken}")
            lines.append(f"  {len(self.files)} archive files written")
        return lines


async def load_policies(conn: asyncpg.Connection) -> dict[str, Policy]:
    return {
        row["project"]: DEFAULT.overridden(
            passed_days=row["passed_days"],
            failed_days=row["failed_days"],
            metrics_days=row["metrics_days"],
            context_hours=row["context_hours"],
        )
        for row in await conn.fetch(POLICIES)
    }


async def find_due(conn: asyncpg.Connection, now: datetime) -> Due:
    policies = await load_policies(conn)
    any_window, run_window = earliest_window(policies)
    runs = [
        RunFacts(
            run_id=row["id"],
            stream=row["stream"],
            organization_id=row["organization_id"],
            project=row["project"],
            status=row["status"],
            started_at=row["started_at"],
            ended_at=row["ended_at"],
            has_context=row["has_context"],
        )
        for row in await conn.fetch(ENDED_RUNS, now - any_window, now - run_window)
    ]
    months = [
        MonthFacts(
            organization_id=row["organization_id"],
            project=row["project"],
            month=row["month"],
            rows=row["rows"],
        )
        for row in await conn.fetch(MONTHS)
    ]
    return due(runs, months, policies, now)


async def apply_retention(
    store: PostgresEventStore,
    directory: Path,
    now: datetime,
    *,
    dry_run: bool = False,
    cache: ContextCache | None = None,
) -> Report:
    """Archive and remove what is due at ``now``; with ``dry_run`` only say what that is.

    The read tables are brought up to date with the log first, so every ended run counts.
    ``cache``: where contexts are cached, to drop the entries of expired contexts.
    """
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    await project(store)
    with driver_errors(store.dsn):
        async with store.pool.acquire() as conn:
            await conn.execute(LOCK)
            try:
                found = await find_due(conn, now)
                report = Report(now=now, dry_run=dry_run, counts=_counts(found), files=[])
                if not dry_run:
                    await _apply(store, conn, found, directory, now, report, cache)
            finally:
                await conn.execute(UNLOCK)
    return report


def _counts(found: Due) -> dict[tuple[str, str], int]:
    counts: Counter[tuple[str, str]] = Counter()
    for run in found.runs:
        counts[("passed runs" if run.status == "passed" else "failed runs", run.project)] += 1
    for run in found.contexts:
        counts[("contexts", run.project)] += 1
    for month in found.months:
        counts[("monthly metric rows", month.project)] += month.rows
    return dict(counts)


async def _apply(
    store: PostgresEventStore,
    conn: asyncpg.Connection,
    found: Due,
    directory: Path,
    now: datetime,
    report: Report,
    cache: ContextCache | None,
) -> None:
    for start in range(0, len(found.runs), CHUNK):
        chunk = found.runs[start : start + CHUNK]
        leaving, written = [], []
        by_run = await _run_rows(conn, [run.run_id for run in chunk])
        for run in chunk:
            files, in_log = await _archive_run(store, by_run.get(run.run_id, []), run, directory)
            written += files
            if in_log:
                leaving.append(run.stream)
        durable(written)
        report.files += written
        for stream in leaving:
            await store.remove_stream(stream)
        report.months_taken += await _remove_runs(conn, [run.run_id for run in chunk])
    for start in range(0, len(found.contexts), CHUNK):
        chunk = found.contexts[start : start + CHUNK]
        written = []
        for run in chunk:
            rows = [row[0].encode() for row in await conn.fetch(CONTEXT_ROW, run.run_id)]
            written.append(write_lines(_run_path(directory, run, "contexts"), rows, sync=False))
        durable(written)
        report.files += written
        async with conn.transaction():
            ids = [run.run_id for run in chunk]
            await conn.execute(MARK_CONTEXTS_EXPIRED, ids, now)
            await conn.execute(REMOVE_CONTEXTS, ids)
    if cache is not None:
        for run in [*found.runs, *found.contexts]:
            await cache.delete(run.stream.removeprefix("run-"))
    for month in found.months:
        await _remove_month(conn, month, directory, report)


def _run_path(directory: Path, run: RunFacts, kind: str) -> Path:
    month = run.started_at.astimezone(UTC).strftime("%Y-%m")
    run_id = run.stream.removeprefix("run-")
    return project_dir(directory, run.project) / month / kind / f"{run_id}.jsonl.gz"


async def _run_rows(
    conn: asyncpg.Connection, run_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, list[bytes]]:
    """The archive lines of these runs' read rows, by run."""
    lines: dict[uuid.UUID, list[bytes]] = {}
    for table, query in RUN_ROWS.items():
        for run_id, row in await conn.fetch(query, run_ids):
            line = b'{"table":' + _encode(table) + b',"row":' + row.encode() + b"}"
            lines.setdefault(run_id, []).append(line)
    return lines


async def _archive_run(
    store: PostgresEventStore, lines: list[bytes], run: RunFacts, directory: Path
) -> tuple[list[Path], bool]:
    """Write the run's read rows and events to the archive (not yet fsynced: ``durable``
    does a chunk at once); return the files and whether the log still holds the events."""
    files = [write_lines(_run_path(directory, run, "results"), lines, sync=False)]
    run_id = run.stream.removeprefix("run-")
    recorded = list(await store.read_stream(run_stream(run_id)))
    if recorded:
        encoded = (_encode(event) for event in recorded)
        files.append(write_lines(events_path(directory, recorded), encoded, sync=False))
    else:
        # a crash after the events left: they are archived already (or never were)
        with contextlib.suppress(ArchiveError):
            files.append(archived(run_id, directory))
    return files, bool(recorded)


async def _remove_runs(conn: asyncpg.Connection, run_ids: Sequence[uuid.UUID]) -> int:
    """Remove the runs' read rows in one transaction, the months they fall in taken first;
    return how many monthly rows were taken."""
    async with conn.transaction():
        taken: str = await conn.execute(TAKE_MONTHS, run_ids)
        days = [tuple(row) for row in await conn.fetch(RESULT_DAYS, run_ids)]
        run_days = [tuple(row) for row in await conn.fetch(RUN_DAYS, run_ids)]
        projects = [row[0] for row in await conn.fetch(RUN_PROJECTS, run_ids)]
        for statement in REMOVE_RUNS:
            await conn.execute(statement, run_ids)
        await metrics.refresh(conn, days)
        await metrics.refresh_failures(conn, days)
        await metrics.refresh_runs(conn, run_days)
        for statement in TIDY_CATALOG:
            await conn.execute(statement, projects)
    return int(taken.rsplit(" ", 1)[-1])


async def _remove_month(
    conn: asyncpg.Connection, month: MonthFacts, directory: Path, report: Report
) -> None:
    key = (month.organization_id, month.project, month.month)
    rows = [row[0].encode() for row in await conn.fetch(MONTH_ROWS, *key)]
    path = (
        project_dir(directory, month.project)
        / month.month.strftime("%Y-%m")
        / "metrics"
        / f"{month.organization_id}.jsonl.gz"
    )
    report.files.append(write_lines(path, rows))
    await conn.execute(REMOVE_MONTH, *key)


def parse_now(text: str) -> datetime:
    """An ISO 8601 time for ``--now``; no zone means UTC. Raises ValueError."""
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


async def restore_for_inspection(store: PostgresEventStore, run_id: str, directory: Path) -> int:
    """Put an archived run's events back (events.archive.restore_run) and, when retention
    removed its read rows, project it again so ``baton show`` and the dashboard read it;
    return how many events came back. The next apply archives it again if it is still due.
    """
    count = await restore_run(store, run_id, directory)
    recorded = list(await store.read_stream(run_stream(run_id)))
    with driver_errors(store.dsn):
        async with store.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval(_HAS_RUN, recorded[0].stream):
                await apply_page(conn, recorded)
    return count


_HAS_RUN = "SELECT EXISTS (SELECT FROM test_runs WHERE stream = $1)"


async def set_policy(
    store: PostgresEventStore,
    project: str,
    passed_days: int | None,
    failed_days: int | None,
    metrics_days: int | None,
    context_hours: int | None,
    *,
    reset: bool = False,
) -> None:
    """Store a project's own windows (None keeps what it had); ``reset``: the defaults."""
    with driver_errors(store.dsn):
        async with store.pool.acquire() as conn, conn.transaction():
            if reset:
                await conn.execute(RESET_POLICY, project)
            if any(value is not None for value in (passed_days, failed_days, metrics_days)) or (
                context_hours is not None
            ):
                await conn.execute(
                    SET_POLICY, project, passed_days, failed_days, metrics_days, context_hours
                )


async def policy_of(store: PostgresEventStore, project: str) -> str:
    """One line: the project's windows as apply uses them."""
    with driver_errors(store.dsn):
        async with store.pool.acquire() as conn:
            policy = (await load_policies(conn)).get(project, DEFAULT)
    return (
        f"retention of project {project}: passed runs {policy.passed_days} days, failed runs"
        f" {policy.failed_days} days, monthly metrics {policy.metrics_days} days, contexts"
        f" {policy.context_hours} hours after the run ends"
    )


Clock = Callable[[], datetime]


def wall_clock() -> datetime:
    return datetime.now(UTC)


async def apply_periodically(
    store: PostgresEventStore,
    directory: Path,
    *,
    interval: float,
    stop: asyncio.Event,
    clock: Clock = wall_clock,
    cache: ContextCache | None = None,
) -> None:
    """Apply retention at once, then every ``interval`` seconds, until ``stop`` is set: what
    ``baton serve`` runs. A failed apply (the database away) is logged and tried again at
    the next interval; what it left half done, the next one finishes."""
    while not stop.is_set():
        try:
            report = await apply_retention(store, directory, clock(), cache=cache)
            for line in report.lines():
                _log.info("%s", line)
        except Exception as exc:  # the service keeps serving; the next apply retries
            _log.warning("retention apply failed: %s; next try in %g s", exc, interval)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
