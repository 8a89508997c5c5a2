"""performance_metrics: per test case, environment and UTC day, recomputed when touched.

A page that decides results recomputes the days those results fall on, from the day's
passed and failed results (percentile_cont over all of them, not an estimate from partial
aggregates). That is simple and exact, and it cannot drift: the same results always give
the same row, whatever order or pages they came in. Averages are taken over numeric, so the
sum does not depend on the order the rows are scanned in either.
"""

from __future__ import annotations

from collections.abc import Collection

import asyncpg

from events.projections._sql import delete
from events.projections.results import MetricKey

_KEY = [("test_case_id", "uuid"), ("environment_id", "uuid"), ("day", "date")]

_RECOMPUTE = """
INSERT INTO performance_metrics (organization_id, test_case_id, environment_id, day,
    total_runs, successful_runs, avg_response_time_ms, p50_response_time_ms,
    p95_response_time_ms, p99_response_time_ms, success_rate)
SELECT r.organization_id, k.test_case_id, k.environment_id, k.day,
    count(*),
    count(*) FILTER (WHERE r.status = 'passed'),
    round(avg(r.response_time_ms::numeric), 3)::float8,
    round(percentile_cont(0.50) WITHIN GROUP (ORDER BY r.response_time_ms)::numeric, 3)::float8,
    round(percentile_cont(0.95) WITHIN GROUP (ORDER BY r.response_time_ms)::numeric, 3)::float8,
    round(percentile_cont(0.99) WITHIN GROUP (ORDER BY r.response_time_ms)::numeric, 3)::float8,
    round(100.0 * count(*) FILTER (WHERE r.status = 'passed') / count(*), 2)
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
