"""Retention with a clock: runs recorded with old times, `retention apply` at a chosen now,
the archive's files read back, what left and what stayed, a rebuild that agrees."""

from __future__ import annotations

import asyncio
import gzip
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from events.archive import archive_run, restore_run
from events.cache_redis import RedisContextCache
from events.context import fold
from events.postgres import PostgresEventStore
from events.projections import DEFAULT_ORGANIZATION_ID, READ_TABLES, project, rebuild
from events.retention import DEFAULT, MonthFacts, Policy, RunFacts, due
from events.retention_apply import apply_retention
from events.settings import Settings
from events.store import NewEvent, StreamAppend
from events.types import (
    PlannedTest,
    ResponseReceived,
    RunCompleted,
    RunStarted,
    TestFailed,
    TestPassed,
    TestStarted,
    Timings,
    run_stream,
)
from tests.cli import baton

NOW = datetime(2026, 9, 15, 12, 0, tzinfo=UTC)
KEPT_TABLES = (*READ_TABLES, "performance_metrics_monthly", "baton_expired_contexts")


def _us(at: datetime) -> int:
    return int(at.timestamp() * 1_000_000)


async def record_run(
    store: PostgresEventStore,
    ended: datetime,
    *,
    status: str = "passed",
    project_name: str = "default",
    response_ms: float = 100.0,
) -> str:
    """A two-test run of suite 'shop' that ended at ``ended``: login passes, catalog passes
    or fails with the run."""
    run_id = str(uuid.uuid4())
    start = ended - timedelta(seconds=2)
    plan = [
        PlannedTest("login", definition_hash="h-login"),
        PlannedTest("catalog", {"login": "token"}, "h-catalog"),
    ]
    catalog_verdict: Any = (
        TestPassed("catalog", 1, 20.0)
        if status == "passed"
        else TestFailed("catalog", 1, 20.0, "assertion", "expected 200, got 500")
    )
    events: list[tuple[Any, datetime]] = [
        (RunStarted(run_id, "shop", "digest-1", plan, project=project_name), start),
        (TestStarted("login"), start),
        (ResponseReceived("login", 1, 200, {}, "", Timings(response_ms)), start),
        (TestPassed("login", 1, response_ms), start + timedelta(milliseconds=500)),
        (TestStarted("catalog"), start + timedelta(seconds=1)),
        (ResponseReceived("catalog", 1, 200, {}, "", Timings(response_ms * 2)), ended),
        (catalog_verdict, ended),
        (
            RunCompleted(
                "passed" if status == "passed" else "failed",
                2 if status == "passed" else 1,
                0 if status == "passed" else 1,
                0,
                2000.0,
            ),
            ended,
        ),
    ]
    await store.append(
        [StreamAppend(run_stream(run_id), [NewEvent(event, at=_us(at)) for event, at in events])]
    )
    return run_id


async def snapshot(conn: asyncpg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    return {
        table: sorted((tuple(row) for row in await conn.fetch(f"SELECT * FROM {table}")), key=repr)
        for table in KEPT_TABLES
    }


def read_lines(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt") as lines:
        return [json.loads(line) for line in lines]


@pytest.fixture
async def db(fresh_store: PostgresEventStore) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(fresh_store.dsn)
    yield conn
    await conn.close()


# ---- what is due: the policy alone ----------------------------------------------------------


def _facts(project_name: str, status: str, ended_ago: timedelta) -> RunFacts:
    ended = NOW - ended_ago
    return RunFacts(
        run_id=uuid.uuid4(),
        stream=f"run-{project_name}-{status}-{ended_ago}",
        organization_id=uuid.uuid4(),
        project=project_name,
        status=status,
        started_at=ended,
        ended_at=ended,
        has_context=True,
    )


def test_what_is_due_follows_the_windows_at_the_given_time() -> None:
    day, hour = timedelta(days=1), timedelta(hours=1)
    runs = {
        "passed 91 days": _facts("p", "passed", 91 * day),
        "passed 89 days": _facts("p", "passed", 89 * day),
        "failed 179 days": _facts("p", "failed", 179 * day),
        "failed 181 days": _facts("p", "failed", 181 * day),
        "cancelled 181 days": _facts("p", "cancelled", 181 * day),
        "passed 25 hours": _facts("p", "passed", 25 * hour),
        "passed 23 hours": _facts("p", "passed", 23 * hour),
        "short: passed 8 days": _facts("short", "passed", 8 * day),
    }
    months = [
        MonthFacts(
            organization_id=uuid.uuid4(),
            project="p",
            month=NOW.date().replace(year=NOW.year - 2, month=month, day=1),
            rows=3,
        )
        for month in (8, 9)
    ]
    policies = {"short": DEFAULT.overridden(passed_days=7)}

    found = due(runs.values(), months, policies, NOW)

    name = {id(run): key for key, run in runs.items()}
    assert sorted(name[id(run)] for run in found.runs) == [
        "cancelled 181 days",
        "failed 181 days",
        "passed 91 days",
        "short: passed 8 days",
    ]
    assert sorted(name[id(run)] for run in found.contexts) == [
        "failed 179 days",
        "passed 25 hours",
        "passed 89 days",
    ]
    # August two years ago ended 2 years and ~2 weeks ago; September's has not ended 730 days ago
    assert [month.month.month for month in found.months] == [8]
    assert Policy() == DEFAULT and DEFAULT.passed_days == 90 and DEFAULT.metrics_days == 730


# ---- apply on PostgreSQL ----------------------------------------------------------------------


async def test_dry_run_says_what_is_due_and_changes_nothing(
    fresh_store: PostgresEventStore, db: asyncpg.Connection, tmp_path: Path
) -> None:
    await record_run(fresh_store, NOW - timedelta(days=100))
    await record_run(fresh_store, NOW - timedelta(days=200), status="failed")
    await record_run(fresh_store, NOW - timedelta(days=2))
    await project(fresh_store)
    before, head = await snapshot(db), await fresh_store.head()

    report = await apply_retention(fresh_store, tmp_path / "archive", NOW, dry_run=True)

    assert report.lines() == [
        "retention at 2026-09-15T12:00:00+00:00: would archive and remove (dry run: nothing"
        " changed)",
        "  default                   1 contexts",
        "  default                   1 failed runs",
        "  default                   1 passed runs",
    ]
    assert await snapshot(db) == before
    assert await fresh_store.head() == head
    assert len(await db.fetch("SELECT * FROM events")) == 3 * 8
    assert not (tmp_path / "archive").exists()


async def test_apply_archives_first_then_removes_and_a_second_apply_does_nothing(
    fresh_store: PostgresEventStore, db: asyncpg.Connection, tmp_path: Path
) -> None:
    old_passed = await record_run(fresh_store, NOW - timedelta(days=100))
    old_failed = await record_run(fresh_store, NOW - timedelta(days=100), status="failed")
    older_failed = await record_run(fresh_store, NOW - timedelta(days=200), status="failed")
    recent = await record_run(fresh_store, NOW - timedelta(hours=1))
    for run_id in (old_passed, recent):  # as if the service had started them
        await db.execute(
            "INSERT INTO service_runs (id, organization_id, state) VALUES ($1, $2, 'finished')",
            uuid.UUID(run_id),
            DEFAULT_ORGANIZATION_ID,
        )
    archive = tmp_path / "archive"

    report = await apply_retention(fresh_store, archive, NOW)

    # the run's events, as the log held them, by project and month of the run's start
    events_file = archive / "default" / "2026-06" / "events" / f"{old_passed}.jsonl.gz"
    recorded = read_lines(events_file)
    assert recorded[0]["event"]["type"] == "RunStarted"
    assert [line["version"] for line in recorded] == list(range(1, 9))
    # its read rows: the run, its results, their details, its history and context
    rows = read_lines(archive / "default" / "2026-06" / "results" / f"{old_passed}.jsonl.gz")
    tables = [line["table"] for line in rows]
    assert tables.count("test_runs") == 1 and tables.count("test_results") == 2
    assert {"test_result_details", "test_run_history", "test_execution_context"} <= set(tables)
    assert tables.count("service_runs") == 1
    service_runs = [str(row[0]) for row in await db.fetch("SELECT id FROM service_runs")]
    assert service_runs == [recent]
    assert (archive / "default" / "2026-02" / "events" / f"{older_failed}.jsonl.gz").exists()

    remaining = {row["stream"] for row in await db.fetch("SELECT stream FROM test_runs")}
    assert remaining == {run_stream(old_failed), run_stream(recent)}
    assert await fresh_store.read_stream(run_stream(old_passed)) == []
    assert await fresh_store.read_stream(run_stream(older_failed)) == []
    assert len(await fresh_store.read_stream(run_stream(old_failed))) == 8
    assert await db.fetchval("SELECT count(*) FROM test_results WHERE run_id = $1", old_passed) == 0
    # contexts go 24 hours after the end: the failed run of 100 days keeps only its results
    contexts = {str(row[0]) for row in await db.fetch("SELECT run_id FROM test_execution_context")}
    assert contexts == {recent}
    assert (
        read_lines(archive / "default" / "2026-06" / "contexts" / f"{old_failed}.jsonl.gz")[0][
            "run_id"
        ]
        == old_failed
    )

    # the months the leaving runs fell in were taken whole first: June holds both 100-day runs
    june = await db.fetchrow(
        "SELECT total_runs, successful_runs, project, suite, environment"
        " FROM performance_metrics_monthly WHERE test_name = 'catalog' AND month = '2026-06-01'"
    )
    assert tuple(june) == (2, 1, "default", "shop", "default")
    assert report.months_taken == 4  # two tests, June and February

    before = await snapshot(db)
    again = await apply_retention(fresh_store, archive, NOW)
    assert again.lines() == ["retention at 2026-09-15T12:00:00+00:00: nothing is due"]
    assert await snapshot(db) == before


async def test_a_rebuild_after_apply_gives_the_same_tables(
    fresh_store: PostgresEventStore, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """The catalog too: the oldest runs of the suite are gone, so its first time, the
    environment's and the test cases' move to the oldest remaining run, as a rebuild sees
    it; recorded out of time order (an import, a worker's clock), the oldest is not the
    first in the log."""
    for days, status in [(120, "passed"), (1, "passed"), (300, "passed"), (95, "passed")]:
        await record_run(fresh_store, NOW - timedelta(days=days), status=status)
    await record_run(fresh_store, NOW - timedelta(days=3), project_name="other")
    await record_run(fresh_store, NOW - timedelta(days=100), status="failed")

    await apply_retention(fresh_store, tmp_path / "archive", NOW)
    after_apply = await snapshot(db)
    assert len(after_apply["test_runs"]) == 3
    assert len(after_apply["projects"]) == 2
    first = await db.fetchval(
        "SELECT s.created_at FROM test_suites s JOIN projects p ON p.id = s.project_id"
        " WHERE p.name = 'default'"
    )
    assert first == NOW - timedelta(days=100, seconds=2)

    await rebuild(fresh_store)

    assert await snapshot(db) == after_apply


def test_a_projects_own_windows_are_honoured(
    fresh_database_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def record() -> tuple[str, str]:
        store = await PostgresEventStore.connect(fresh_database_dsn, max_size=4)
        try:
            short = await record_run(store, NOW - timedelta(days=10), project_name="short")
            return short, await record_run(store, NOW - timedelta(days=10))
        finally:
            await store.aclose()

    short, normal = asyncio.run(record())
    monkeypatch.setenv("BATON_DATABASE_URL", fresh_database_dsn)
    monkeypatch.setenv("BATON_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("BATON_ARCHIVE_DIR", str(tmp_path / "archive"))

    code, out, err = baton("retention", "set", "short", "--passed-days", "7")
    assert code == 0, err
    assert "retention of project short: passed runs 7 days, failed runs 180 days" in out
    code, out, err = baton("retention", "apply", "--now", "2026-09-15T12:00:00Z")
    assert code == 0, err
    assert "  short                     1 passed runs" in out
    assert (tmp_path / "archive" / "short" / "2026-09" / "events" / f"{short}.jsonl.gz").exists()
    code, out, _ = baton("show", normal)
    assert code == 0 and "status passed" in out
    assert baton("show", short)[0] == 2

    # back to the defaults: nothing more is due
    assert baton("retention", "set", "short", "--reset")[0] == 0
    code, out, err = baton("retention", "apply", "--dry-run", "--now", "2026-09-15T12:00:00Z")
    assert code == 0, err
    assert out.strip() == "retention at 2026-09-15T12:00:00+00:00: nothing is due"


def test_usage_errors_name_the_option_and_the_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("BATON_HOME", str(tmp_path / "home"))
    code, _, err = baton("retention", "apply", "--now", "yesterday")
    assert code == 2
    assert err.strip() == (
        "error: --now 'yesterday' is not an ISO 8601 time: give e.g. 2026-03-01T00:00:00Z"
    )
    code, _, err = baton("retention", "set", "shop")
    assert code == 2 and "give a window to change" in err


def test_an_archived_run_is_restored_for_inspection(
    fresh_database_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def archived_run() -> tuple[str, dict[str, list[tuple[Any, ...]]]]:
        store = await PostgresEventStore.connect(fresh_database_dsn, max_size=4)
        conn = await asyncpg.connect(fresh_database_dsn)
        try:
            run_id = await record_run(store, NOW - timedelta(days=200), status="failed")
            await project(store)
            before = await snapshot(conn)
            await apply_retention(store, tmp_path / "archive", NOW)
            assert await conn.fetchval("SELECT count(*) FROM test_runs") == 0
            return run_id, before
        finally:
            await conn.close()
            await store.aclose()

    async def tables() -> dict[str, list[tuple[Any, ...]]]:
        conn = await asyncpg.connect(fresh_database_dsn)
        try:
            return await snapshot(conn)
        finally:
            await conn.close()

    run_id, before = asyncio.run(archived_run())
    monkeypatch.setenv("BATON_DATABASE_URL", fresh_database_dsn)
    monkeypatch.setenv("BATON_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("BATON_ARCHIVE_DIR", str(tmp_path / "archive"))
    assert baton("show", run_id)[0] == 2

    code, out, err = baton("archive", "restore", run_id)
    assert (code, out.strip()) == (0, f"restored run {run_id}: 8 events"), err
    code, out, err = baton("show", run_id)
    assert code == 0, err
    assert "status failed, 1 passed, 1 failed, 0 skipped of 2" in out
    assert "[assertion] expected 200, got 500" in out
    code, out, err = baton("events", run_id)
    assert code == 0 and "RunCompleted" in out
    code, out, err = baton("context", run_id)
    assert code == 0, err
    assert "failed" in out and "catalog" in out
    restored = asyncio.run(tables())
    # the read tables are back as they were, but for the monthly rows taken on the way out
    assert {k: v for k, v in restored.items() if k != "performance_metrics_monthly"} == {
        k: v for k, v in before.items() if k != "performance_metrics_monthly"
    }


async def test_expired_contexts_leave_the_cache_and_the_read_table(
    fresh_store: PostgresEventStore,
    db: asyncpg.Connection,
    tmp_path: Path,
    redis_url: str,
    redis_prefix: str,
) -> None:
    day_old = await record_run(fresh_store, NOW - timedelta(hours=25))
    fresh = await record_run(fresh_store, NOW - timedelta(hours=23))
    cache = RedisContextCache.from_url(redis_url, prefix=redis_prefix)
    try:
        for run_id in (day_old, fresh):
            await cache.put(fold(await fresh_store.read_stream(run_stream(run_id))), ttl=3600)

        report = await apply_retention(fresh_store, tmp_path / "archive", NOW, cache=cache)

        assert report.counts == {("contexts", "default"): 1}
        assert await cache.get(day_old) is None
        cached = await cache.get(fresh)
        assert cached is not None and cached.run_id == fresh
    finally:
        await cache.aclose()
    kept = [str(row[0]) for row in await db.fetch("SELECT run_id FROM test_execution_context")]
    assert kept == [fresh]
    # the run and its results stay; its context does not come back with a rebuild
    assert await db.fetchval("SELECT count(*) FROM test_results WHERE run_id = $1", day_old) == 2
    await rebuild(fresh_store)
    kept = [str(row[0]) for row in await db.fetch("SELECT run_id FROM test_execution_context")]
    assert kept == [fresh]


async def test_monthly_metrics_outlive_the_results_and_leave_after_two_years(
    fresh_store: PostgresEventStore, db: asyncpg.Connection, tmp_path: Path
) -> None:
    for response_ms in (100.0, 200.0, 300.0):
        await record_run(
            fresh_store, datetime(2026, 1, 10, 12, tzinfo=UTC), response_ms=response_ms
        )
    archive = tmp_path / "archive"
    await project(fresh_store)
    daily = await db.fetchval("SELECT count(*) FROM performance_metrics WHERE day = '2026-01-10'")
    assert daily == 2

    await apply_retention(fresh_store, archive, datetime(2026, 5, 1, tzinfo=UTC))

    # the daily rows went with their results, January stays as one row per test
    assert await db.fetchval("SELECT count(*) FROM performance_metrics") == 0
    login = await db.fetchrow(
        "SELECT total_runs, successful_runs, avg_response_time_ms, p50_response_time_ms,"
        " p95_response_time_ms, success_rate FROM performance_metrics_monthly"
        " WHERE test_name = 'login' AND month = '2026-01-01'"
    )
    assert tuple(login) == (3, 3, 200.0, 200.0, 290.0, 100)

    # still there a day short of two years after January ended, gone the day after
    almost = datetime(2028, 1, 30, tzinfo=UTC)
    assert (await apply_retention(fresh_store, archive, almost)).counts == {}
    report = await apply_retention(fresh_store, archive, almost + timedelta(days=2))
    assert report.counts == {("monthly metric rows", "default"): 2}
    assert await db.fetchval("SELECT count(*) FROM performance_metrics_monthly") == 0
    [archived] = (archive / "default" / "2026-01" / "metrics").glob("*.jsonl.gz")
    rows = read_lines(archived)
    assert sorted((row["test_name"], row["total_runs"]) for row in rows) == [
        ("catalog", 3),
        ("login", 3),
    ]


async def test_the_service_applies_retention_on_its_interval(
    fresh_store: PostgresEventStore, tmp_path: Path
) -> None:
    """`baton serve`'s background apply, its clock set: an old run leaves at start-up, one
    recorded later leaves at the next interval."""
    from context_service.services import Services

    archive = tmp_path / "archive"
    first = await record_run(fresh_store, NOW - timedelta(days=100))
    settings = Settings(
        database_url=fresh_store.dsn,
        home=tmp_path / "home",
        archive_dir=archive,
        retention_interval=0.3,
    )
    services = await Services.open(settings, clock=lambda: NOW)
    try:
        for run_id in (first, await record_run(fresh_store, NOW - timedelta(days=100))):
            path = archive / "default" / "2026-06" / "events" / f"{run_id}.jsonl.gz"
            for _ in range(100):
                if path.exists() and not await fresh_store.read_stream(run_stream(run_id)):
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail(f"run {run_id} was not archived by the service within 10 s")
    finally:
        await services.aclose()


def test_the_interval_is_a_setting() -> None:
    assert Settings.from_env({}).retention_interval == 24 * 3600
    assert Settings.from_env({"BATON_RETENTION_INTERVAL": "3600"}).retention_interval == 3600
    assert Settings.from_env({"BATON_RETENTION_INTERVAL": "off"}).retention_interval is None
    archive = Settings.from_env({"BATON_ARCHIVE_DIR": "/srv/baton-archive"}).archive_dir
    assert archive == Path("/srv/baton-archive")


async def test_an_apply_cut_short_after_the_events_left_is_finished_by_the_next(
    fresh_store: PostgresEventStore, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """A crash between removing a run's events and its rows: the run is still due, its
    events are found in the archive (not lost, not archived empty) and its rows go."""
    archive = tmp_path / "archive"
    run_id = await record_run(fresh_store, NOW - timedelta(days=100))
    await project(fresh_store)
    events_file = await archive_run(fresh_store, run_id, archive)  # the first half, then a crash
    written = read_lines(events_file)

    report = await apply_retention(fresh_store, archive, NOW)

    assert report.counts == {("passed runs", "default"): 1}
    assert events_file in report.files
    assert read_lines(events_file) == written
    assert await db.fetchval("SELECT count(*) FROM test_runs") == 0


async def test_a_run_archived_before_the_project_level_is_still_restored(
    fresh_store: PostgresEventStore, tmp_path: Path
) -> None:
    archive = tmp_path / "archive"
    run_id = await record_run(fresh_store, NOW - timedelta(days=1))
    original = await fresh_store.read_stream(run_stream(run_id))
    path = await archive_run(fresh_store, run_id, archive)
    old_layout = archive / "2026-09" / "events" / path.name
    old_layout.parent.mkdir(parents=True)
    path.rename(old_layout)

    assert await restore_run(fresh_store, run_id, archive) == 8
    assert await fresh_store.read_stream(run_stream(run_id)) == original


def test_an_archive_that_cannot_be_written_removes_nothing(
    fresh_database_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def record() -> str:
        store = await PostgresEventStore.connect(fresh_database_dsn, max_size=4)
        try:
            return await record_run(store, NOW - timedelta(days=100))
        finally:
            await store.aclose()

    run_id = asyncio.run(record())
    not_a_folder = tmp_path / "archive"
    not_a_folder.write_text("a file where the archive should be\n")
    monkeypatch.setenv("BATON_DATABASE_URL", fresh_database_dsn)
    monkeypatch.setenv("BATON_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("BATON_ARCHIVE_DIR", str(not_a_folder))

    code, out, err = baton("retention", "apply", "--now", "2026-09-15T12:00:00Z")

    assert code == 3
    [line] = err.splitlines()
    assert line.startswith(f"error: cannot write the archive file {not_a_folder}/default/")
    assert line.endswith(
        "make BATON_ARCHIVE_DIR a writable folder with free space (nothing was removed)"
    )
    code, out, _ = baton("show", run_id)
    assert code == 0 and "status passed" in out
    assert baton("events", run_id)[0] == 0
