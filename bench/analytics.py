"""The analytics endpoint's queries over 1,000,000 stored results (issue 12: under 200 ms).

One private database on the PostgreSQL server (created, dropped at the end), the schema
applied as Baton applies it. The history is loaded straight into the read tables with
INSERT ... SELECT over generate_series, not through the log and the projector: running
1,000,000 results through the runner would take hours and measure the projector, not the
reads. What it loads is what the projector would have written for such a history:

- one organization, project and suite of --tests tests, two environments (2/3 and 1/3 of
  the runs), runs spread evenly over the last --days days, each with one result per test;
- results: about 3% failed (assertion, timeout, server_error, connection), about 1%
  skipped for a failed dependency, durations and response times around 80-400 ms;
- failure_analysis: a row per failed or skipped result, as the projector writes it;
- performance_metrics, failure_metrics and run_metrics: the daily rollups, computed from
  those rows by the projector's own functions (events.projections.metrics), every day at
  once;
- findings: --findings FlakyTestDetected / PerformanceDegraded events appended through the
  EventStore to the project's analytics stream, spread over the days (the detector's
  output; the endpoint reads them through the store).

Then, for --periods (days looked at), ``context_service.analytics.analytics`` in a
``Database.tenant`` transaction (the service's role, row-level security in force), as the
endpoint runs it: one warm-up, then the median of --repeat, each query timed alone as
well, and beside them the queries of run durations and failure categories without the
rollups (over test_runs and failure_analysis, what the endpoint read before schema step
11); and EXPLAIN (ANALYZE, BUFFERS) of each query. Results: a JSON file in
bench/results/ and the table in bench/ANALYTICS.md.

    python bench/analytics.py [--pg DSN] [--results 1000000] [--tests 6] [--days 90]
        [--findings 400] [--periods 30,90] [--repeat 7] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from cache_bench import private_database

from context_service.analytics import DAILY, FAILURES, RUNS, Period, analytics, findings
from context_service.database import Database
from events import types as ev
from events.postgres import PostgresEventStore
from events.projections import derive, metrics
from events.store import NewEvent, StreamAppend

HERE = Path(__file__).parent
TABLES = ("test_runs", "test_results", "failure_analysis", "performance_metrics",
          "run_metrics", "failure_metrics")  # fmt: skip
CATEGORIES = ("assertion", "timeout", "server_error", "connection")

_RUNS = """
INSERT INTO test_runs (id, organization_id, project_id, suite_id, environment_id, stream,
    suite_digest, source, status, total_tests, passed_tests, duration_ms, started_at, ended_at)
SELECT id, $1, $2, $3, CASE WHEN g % 3 = 0 THEN $5::uuid ELSE $4::uuid END,
       'run-' || id::text, 'bench', '', 'passed', $6, $6, 0, started, started
FROM (SELECT g, gen_random_uuid() AS id,
             $8::timestamptz - ($7 * 86400.0 * (g - 0.5) / $9) * interval '1 second' AS started
      FROM generate_series(1, $9) AS g) AS runs
"""
_RESULTS = """
INSERT INTO test_results (id, organization_id, run_id, test_case_id, environment_id,
    test_name, status, attempts, requests, duration_ms, response_status, response_time_ms,
    category, message, started_at, ended_at)
SELECT gen_random_uuid(), r.organization_id, r.id, c.id, r.environment_id, c.name,
       o.status, 1, CASE WHEN o.status = 'skipped' THEN 0 ELSE 1 END,
       CASE WHEN o.status = 'skipped' THEN NULL ELSE o.ms END,
       CASE WHEN o.status = 'skipped' THEN NULL WHEN o.status = 'failed' THEN 500 ELSE 200 END,
       CASE WHEN o.status = 'skipped' THEN NULL ELSE o.ms * 0.9 END,
       CASE o.status WHEN 'failed' THEN (ARRAY['assertion', 'timeout', 'server_error',
            'connection'])[1 + (o.roll * 1000)::int % 4]
            WHEN 'skipped' THEN 'dependency_skipped' END,
       CASE o.status WHEN 'failed' THEN 'expected 201, got 500'
            WHEN 'skipped' THEN 'a dependency failed' ELSE '' END,
       r.started_at + c.ord * interval '400 milliseconds',
       r.started_at + c.ord * interval '400 milliseconds' + o.ms * interval '1 millisecond'
FROM test_runs r
CROSS JOIN (SELECT id, name, row_number() OVER (ORDER BY name) - 1 AS ord FROM test_cases) c
CROSS JOIN LATERAL (
    SELECT roll, CASE WHEN roll < 0.03 THEN 'failed' WHEN roll < 0.04 THEN 'skipped'
                      ELSE 'passed' END AS status,
           80 + 40 * c.ord + 120 * random() AS ms
    FROM (SELECT random() + 0 * r.duration_ms AS roll) AS x
) o
"""
_RUN_TOTALS = """
UPDATE test_runs r SET
    passed_tests = t.passed, failed_tests = t.failed, skipped_tests = t.skipped,
    status = CASE WHEN t.failed + t.skipped > 0 THEN 'failed' ELSE 'passed' END,
    duration_ms = t.span, ended_at = r.started_at + t.span * interval '1 millisecond'
FROM (SELECT run_id, count(*) FILTER (WHERE status = 'passed') AS passed,
             count(*) FILTER (WHERE status = 'failed') AS failed,
             count(*) FILTER (WHERE status = 'skipped') AS skipped,
             extract(epoch FROM max(ended_at) - min(started_at)) * 1000 AS span
      FROM test_results GROUP BY run_id) t
WHERE t.run_id = r.id
"""
_FAILURE_ROWS = """
INSERT INTO failure_analysis (result_id, organization_id, test_case_id, run_id, category,
    message, fingerprint, occurred_at)
SELECT id, organization_id, test_case_id, run_id, category, message,
       md5(test_case_id::text || category), ended_at
FROM test_results WHERE category IS NOT NULL
"""
# What the endpoint read before schema step 11's rollups: every ended run and every failure
# of the period (the "before" of bench/ANALYTICS.md), timed beside the rollups' queries.
RUNS_UNROLLED = """
SELECT (r.ended_at AT TIME ZONE 'UTC')::date AS day, s.name, e.name, count(*),
       count(*) FILTER (WHERE r.status = 'passed'),
       count(*) FILTER (WHERE r.status <> 'passed'),
       round(avg(r.duration_ms)::numeric, 3)::float8,
       round(percentile_cont(0.50) WITHIN GROUP (ORDER BY r.duration_ms)::numeric, 3)::float8,
       round(percentile_cont(0.95) WITHIN GROUP (ORDER BY r.duration_ms)::numeric, 3)::float8,
       max(r.duration_ms)
FROM test_runs r
JOIN test_suites s ON s.id = r.suite_id
JOIN environments e ON e.id = r.environment_id
WHERE r.project_id = $1 AND r.ended_at >= $2 AND r.ended_at < $3
  AND ($4::text IS NULL OR e.name = $4)
GROUP BY 1, 2, 3
ORDER BY 2, 3, 1
"""
FAILURES_UNROLLED = """
SELECT f.category, count(*), count(DISTINCT f.test_case_id), max(f.occurred_at)
FROM test_suites s
JOIN test_cases c ON c.suite_id = s.id
JOIN failure_analysis f ON f.test_case_id = c.id
JOIN test_results t ON t.id = f.result_id
JOIN environments e ON e.id = t.environment_id
WHERE s.project_id = $1 AND f.occurred_at >= $2 AND f.occurred_at < $3
  AND ($4::text IS NULL OR e.name = $4) AND ($5::text IS NULL OR c.name = $5)
GROUP BY f.category
ORDER BY count(*) DESC, f.category
"""


_CASE_DAYS = """
SELECT DISTINCT test_case_id, environment_id, (ended_at AT TIME ZONE 'UTC')::date
FROM test_results WHERE ended_at IS NOT NULL
"""
_RUN_DAYS = """
SELECT DISTINCT suite_id, environment_id, (ended_at AT TIME ZONE 'UTC')::date
FROM test_runs WHERE ended_at IS NOT NULL
"""


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


async def load(
    store: PostgresEventStore, results: int, tests: int, days: int, finding_count: int
) -> tuple[uuid.UUID, uuid.UUID, dict[str, float]]:
    """The history, into the read tables; returns (organization, project, seconds per step)."""
    org = uuid.uuid4()
    project = derive("project", org, "bench")
    suite = derive("suite", project, "shop checkout")
    envs = [derive("environment", project, name) for name in ("staging", "production")]
    now = datetime.now(UTC)
    runs = results // tests
    steps: dict[str, float] = {}
    async with store.pool.acquire() as conn:

        async def step(name: str, sql: str, *args: Any) -> None:
            started = time.perf_counter()
            await conn.execute(sql, *args)
            steps[name] = round(time.perf_counter() - started, 2)

        await conn.execute(
            "INSERT INTO organizations (id, slug, name) VALUES ($1, 'bench', 'Bench')", org
        )
        await conn.execute(
            "INSERT INTO projects VALUES ($1, $2, 'bench', $3, $3)", project, org, now
        )
        for env, name in zip(envs, ("staging", "production"), strict=True):
            await conn.execute(
                "INSERT INTO environments VALUES ($1, $2, $3, $4, $5)", env, org, project, name, now
            )
        await conn.execute(
            "INSERT INTO test_suites VALUES ($1, $2, $3, 'shop checkout', 'bench', '', $4, $4)",
            suite, org, project, now,
        )  # fmt: skip
        for n in range(tests):
            name = f"test_{n:02d}"
            await conn.execute(
                "INSERT INTO test_cases VALUES ($1, $2, $3, $4, 'h', $5, $5)",
                derive("test", suite, name, "h"), org, suite, name, now,
            )  # fmt: skip
        await step("test_runs", _RUNS, org, project, suite, *envs, tests, float(days), now, runs)
        await step("test_results", _RESULTS)
        await step("run totals", _RUN_TOTALS)
        await step("failure_analysis", _FAILURE_ROWS)
        # the daily rollups, by the projector's own functions, every day at once
        started = time.perf_counter()
        case_days = [tuple(row) for row in await conn.fetch(_CASE_DAYS)]
        await metrics.refresh(conn, case_days)
        steps["performance_metrics"] = round(time.perf_counter() - started, 2)
        started = time.perf_counter()
        await metrics.refresh_failures(conn, case_days)
        steps["failure_metrics"] = round(time.perf_counter() - started, 2)
        started = time.perf_counter()
        await metrics.refresh_runs(conn, [tuple(row) for row in await conn.fetch(_RUN_DAYS)])
        steps["run_metrics"] = round(time.perf_counter() - started, 2)
        await step("analyze", "ANALYZE")
    cases = [
        (str(derive("test", suite, f"test_{n:02d}", "h")), f"test_{n:02d}") for n in range(tests)
    ]
    started = time.perf_counter()
    batch: list[NewEvent] = []
    for n in range(finding_count):
        case, name = cases[n % len(cases)]
        at = now - timedelta(days=days) * (n + 0.5) / finding_count
        common: dict[str, Any] = dict(
            run_id=str(uuid.uuid4()), suite="shop checkout", test=name, test_case_id=case,
            environment="staging", environment_id=str(envs[0]),
        )  # fmt: skip
        event: ev.Event = (
            ev.FlakyTestDetected(**common, rule="failure_rate", rate=0.12, threshold=0.1,
                                 samples=40, window="7 days", failures=5)
            if n % 3
            else ev.PerformanceDegraded(**common, recent_median_ms=260.0, baseline_median_ms=200.0,
                                        ratio=1.3, threshold=1.2, recent_samples=5,
                                        baseline_samples=300, baseline_days=30)
        )  # fmt: skip
        batch.append(NewEvent(event, at=int(at.timestamp() * 1_000_000)))
    batch.reverse()  # oldest first, as the detector appends them
    for start in range(0, len(batch), 100):
        await store.append([StreamAppend(ev.analytics_stream(project), batch[start : start + 100])])
    steps["findings"] = round(time.perf_counter() - started, 2)
    return org, project, steps


async def timed(call: Callable[[], Awaitable[Any]], repeat: int) -> dict[str, float]:
    await call()  # warm
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        await call()
        times.append(time.perf_counter() - started)
    return {"median_ms": ms(statistics.median(times)), "min_ms": ms(min(times)),
            "max_ms": ms(max(times))}  # fmt: skip


async def measure(
    store: PostgresEventStore, org: uuid.UUID, project: uuid.UUID, days: int, repeat: int
) -> dict[str, Any]:
    db = Database(store.pool, store.dsn)
    period = Period(until=datetime.now(UTC).date(), days=days)
    start = period.since_at
    end = start + timedelta(days=days)
    queries: dict[str, tuple[str, tuple[Any, ...]]] = {
        "daily": (DAILY, (project, period.since, period.until, None, None)),
        "runs": (RUNS, (project, period.since, period.until, None)),
        "failure_categories": (FAILURES, (project, period.since, period.until, None, None)),
        "runs without rollup": (RUNS_UNROLLED, (project, start, end, None)),
        "failure_categories without rollup": (FAILURES_UNROLLED, (project, start, end, None, None)),
    }

    async def whole() -> Any:
        async with db.tenant(org) as conn:
            return await analytics(conn, store, project, period)

    def one(sql: str, args: tuple[Any, ...]) -> Callable[[], Awaitable[Any]]:
        async def call() -> Any:
            async with db.tenant(org) as conn:
                return await conn.fetch(sql, *args)

        return call

    async def stream() -> Any:
        return await findings(store, project, period)

    found = await whole()
    out: dict[str, Any] = {
        "days": days,
        "endpoint": await timed(whole, repeat),
        "rows": {
            "daily": len(found.daily),
            "runs": len(found.runs),
            "flaky": len(found.flaky),
            "slowdowns": len(found.slowdowns),
            "failure_categories": len(found.failure_categories),
        },
        "queries": {
            name: await timed(one(sql, args), repeat) for name, (sql, args) in queries.items()
        },
        "plans": {},
    }
    out["queries"]["findings (store)"] = await timed(stream, repeat)
    for name, (sql, args) in queries.items():
        async with db.tenant(org) as conn:
            rows = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", *args)
        out["plans"][name] = [row[0] for row in rows]
    return out


async def page_cost(store: PostgresEventStore, repeat: int) -> dict[str, dict[str, float]]:
    """What the rollups add to a projector page that decides a run of today: the
    recomputation of today's run_metrics row of its suite and environment, and of today's
    failure_metrics rows of its tests (in a transaction rolled back, so nothing changes)."""
    async with store.pool.acquire() as conn:
        today = await conn.fetchval(
            "SELECT max((ended_at AT TIME ZONE 'UTC')::date) FROM test_runs"
        )
        run_day = await conn.fetchrow(
            "SELECT suite_id, environment_id, $1::date FROM test_runs"
            " WHERE (ended_at AT TIME ZONE 'UTC')::date = $1 LIMIT 1",
            today,
        )
        case_days = [
            (row[0], run_day[1], today)
            for row in await conn.fetch("SELECT id FROM test_cases ORDER BY name")
        ]

        def rolled_back(
            refresh: Callable[[asyncpg.Connection, Any], Awaitable[None]], keys: Any
        ) -> Callable[[], Awaitable[None]]:
            async def call() -> None:
                transaction = conn.transaction()
                await transaction.start()
                try:
                    await refresh(conn, keys)
                finally:
                    await transaction.rollback()

            return call

        return {
            "run_metrics (1 day of 1 suite)": await timed(
                rolled_back(metrics.refresh_runs, [tuple(run_day)]), repeat
            ),
            "failure_metrics (1 day of each test)": await timed(
                rolled_back(metrics.refresh_failures, case_days), repeat
            ),
            "performance_metrics (1 day of each test), for comparison": await timed(
                rolled_back(metrics.refresh, case_days), repeat
            ),
        }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    async with private_database(args.pg) as dsn:
        store = await PostgresEventStore.connect(dsn, max_size=4)
        try:
            started = time.perf_counter()
            org, project, steps = await load(
                store, args.results, args.tests, args.days, args.findings
            )
            loaded = round(time.perf_counter() - started, 1)
            async with store.pool.acquire() as conn:
                counts = {
                    table: await conn.fetchval(f"SELECT count(*) FROM {table}") for table in TABLES
                }
                sizes = await conn.fetchval(
                    "SELECT pg_size_pretty(pg_database_size(current_database()))"
                )
            cost = await page_cost(store, args.repeat)
            periods = [await measure(store, org, project, int(d), args.repeat)
                       for d in args.periods.split(",")]  # fmt: skip
        finally:
            await store.aclose()
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": {key: value for key, value in vars(args).items() if key not in ("pg", "json")},
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "load_seconds": loaded,
        "load_steps_seconds": steps,
        "rows": counts,
        "database_size": sizes,
        "periods": periods,
        "projector_page_cost": cost,
    }


def _report(result: dict[str, Any]) -> None:
    print(f"loaded in {result['load_seconds']} s: {result['rows']} ({result['database_size']})")
    for name, timing in result["projector_page_cost"].items():
        print(f"recompute {name}: {timing['median_ms']} ms")
    for period in result["periods"]:
        print(f"last {period['days']} days: endpoint {period['endpoint']['median_ms']} ms median")
        for name, timing in period["queries"].items():
            print(f"  {name}: {timing['median_ms']} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--results", type=int, default=1_000_000)
    parser.add_argument("--tests", type=int, default=6)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--findings", type=int, default=400)
    parser.add_argument("--periods", default="30,90")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", type=Path)
    options = parser.parse_args()
    outcome = asyncio.run(main(options))
    _report(outcome)
    target = (
        options.json or HERE / "results" / f"analytics-{outcome['date'][:19].replace(':', '')}.json"
    )
    target.write_text(json.dumps(outcome, indent=2) + "\n")
    print(f"written: {target}")
