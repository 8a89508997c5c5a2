"""performance_metrics, run_metrics and failure_metrics: daily rollups, recomputed when touched.

performance_metrics is per test case, environment and UTC day; run_metrics per suite,
environment and day (the runs that ended then); failure_metrics per test case,
environment, day and failure category (schema step 11: what the analytics endpoint reads
instead of every run and failure of a period).

A page that decides results recomputes the days those results fall on, from the day's
passed and failed results (percentile_cont over all of them, not an estimate from partial
aggregates). That is simple and exact, and it cannot drift: the same results always give
the same row, whatever order or pages they came in. Averages are taken over numeric, so the
sum does not depend on the order the rows are scanned in either.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from datetime import date

import asyncpg

from events.projections._sql import delete
from events.projections.results import MetricKey

RunDayKey = tuple[uuid.UUID, uuid.UUID, date]
"""(suite, environment, UTC day the run ended) of a run_metrics row."""

_KEY = [("test_case_id", "uuid"), ("environment_id", "uuid"), ("day", "date")]

RESULT_AGGREGATES = """
    count(*),
    count(*) FILTER (WHERE r.status = 'passed'),
    round(avg(r.response_time_ms::numeric), 3)::float8,
    round(percentile_cont(0.50) WITHIN GROUP (ORDER BY r.response_time_ms)::numeric, 3)::float8,
    round(percentile_cont(0.95) WITHIN GROUP (ORDER BY r.response_time_ms)::numeric, 3)::float8,
    round(percentile_cont(0.99) WITHIN GROUP (ORDER BY r.response_time_ms)::numeric, 3)::float8,
    round(100.0 * count(*) FILTER (WHERE r.status = 'passed') / count(*), 2)"""
"""A metrics row's figures over the test_results ``r`` of its group: runs, passed, the
average, p50, p95 and p99 response time, the success rate (daily rows and monthly ones)."""

_RECOMPUTE = f"""
INSERT INTO performance_metrics (organization_id, test_case_id, environment_id, day,
    total_runs, successful_runs, avg_response_time_ms, p50_response_time_ms,
    p95_response_time_ms, p99_response_time_ms, success_rate)
SELECT r.organization_id, k.test_case_id, k.environment_id, k.day,{RESULT_AGGREGATES}
FROM unnest($1::uuid[], $2::uuid[], $3::date[]) AS k(test_case_id, environment_id, day)
JOIN test_results r
  ON r.test_case_id = k.test_case_id
 AND r.environment_id = k.environment_id
 AND r.ended_at >= k.day::timestamp AT TIME ZONE 'UTC'
 AND r.ended_at < (k.day + 1)::timestamp AT TIME ZONE 'UTC'
WHERE r.status IN ('passed', 'failed')
GROUP BY r.organization_id, k.test_case_id, k.environment_id, k.day
"""


async def refresh(conn: asyncpg.Connection, days: Collection[MetricKey]) -> None:
    """Recompute these (test case, environment, day) rows from test_results; a day with no
    execution left has no row."""
    if not days:
        return
    keys = sorted(days)
    await delete(conn, "performance_metrics", _KEY, keys)
    await conn.execute(_RECOMPUTE, *[list(column) for column in zip(*keys, strict=True)])


_RUN_KEY = [("suite_id", "uuid"), ("environment_id", "uuid"), ("day", "date")]
_RECOMPUTE_RUNS = """
INSERT INTO run_metrics (organization_id, project_id, suite_id, environment_id, day, runs,
    passed, avg_duration_ms, p50_duration_ms, p95_duration_ms, max_duration_ms)
SELECT r.organization_id, r.project_id, k.suite_id, k.environment_id, k.day,
    count(*), count(*) FILTER (WHERE r.status = 'passed'),
    round(avg(r.duration_ms::numeric), 3)::float8,
    round(percentile_cont(0.50) WITHIN GROUP (ORDER BY r.duration_ms)::numeric, 3)::float8,
    round(percentile_cont(0.95) WITHIN GROUP (ORDER BY r.duration_ms)::numeric, 3)::float8,
    max(r.duration_ms)
FROM unnest($1::uuid[], $2::uuid[], $3::date[]) AS k(suite_id, environment_id, day)
JOIN test_runs r
  ON r.suite_id = k.suite_id
 AND r.environment_id = k.environment_id
 AND r.ended_at >= k.day::timestamp AT TIME ZONE 'UTC'
 AND r.ended_at < (k.day + 1)::timestamp AT TIME ZONE 'UTC'
GROUP BY r.organization_id, r.project_id, k.suite_id, k.environment_id, k.day
"""
_RECOMPUTE_FAILURES = """
INSERT INTO failure_metrics (organization_id, test_case_id, environment_id, day, category,
    failures, last_at)
SELECT r.organization_id, k.test_case_id, k.environment_id, k.day, r.category, count(*),
    max(r.ended_at)
FROM unnest($1::uuid[], $2::uuid[], $3::date[]) AS k(test_case_id, environment_id, day)
JOIN test_results r
  ON r.test_case_id = k.test_case_id
 AND r.environment_id = k.environment_id
 AND r.ended_at >= k.day::timestamp AT TIME ZONE 'UTC'
 AND r.ended_at < (k.day + 1)::timestamp AT TIME ZONE 'UTC'
WHERE r.category IS NOT NULL
GROUP BY r.organization_id, k.test_case_id, k.environment_id, k.day, r.category
"""


async def refresh_runs(conn: asyncpg.Connection, days: Collection[RunDayKey]) -> None:
    """Recompute these (suite, environment, day) rows of run_metrics from test_runs."""
    if not days:
        return
    keys = sorted(days)
    await delete(conn, "run_metrics", _RUN_KEY, keys)
    await conn.execute(_RECOMPUTE_RUNS, *[list(column) for column in zip(*keys, strict=True)])


async def refresh_failures(conn: asyncpg.Connection, days: Collection[MetricKey]) -> None:
    """Recompute these (test case, environment, day) rows of failure_metrics, every
    category, from test_results."""
    if not days:
        return
    keys = sorted(days)
    await delete(conn, "failure_metrics", _KEY, keys)
    await conn.execute(_RECOMPUTE_FAILURES, *[list(column) for column in zip(*keys, strict=True)])
