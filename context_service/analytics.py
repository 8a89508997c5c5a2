"""A project's analytics: what ``GET /api/v1/projects/{id}/analytics`` and the dashboard's
analytics page show, read from the read tables and the project's findings stream.

- daily metrics per test case and environment: ``performance_metrics`` as the projector
  keeps it (a daily rollup, recomputed exactly from the day's results);
- run durations per day, suite and environment: ``run_metrics``, the same kind of rollup
  of test_runs;
- failure categories: ``failure_metrics``, a rollup of the results with a category (a
  skipped dependent counts under ``dependency_skipped``, never as its own failure);

Only the rollups are read, never every run or result of the period: over 1,000,000 results
the endpoint answers in milliseconds (bench/ANALYTICS.md).
- flaky tests and slowdowns: the findings the detector recorded in ``analytics-<project>``
  (events.projections.detect decides them; this module only reads what it wrote), the
  latest per test case, environment and rule, with how often that rule fired in the period;
- service health: empty until the read table of service health checks exists.

Every query runs in the caller's ``Database.tenant`` transaction (row-level security), and
the findings stream is read only once that transaction has shown the project is the
caller's. The period is whole UTC days ending today.
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Annotated

import asyncpg
import msgspec

from context_service.errors import NotFound
from events.store import EventStore
from events.types import FlakyTestDetected, PerformanceDegraded, analytics_stream

MAX_DAYS = 730
"""Two years: as long as metrics are kept (DESIGN.md, retention)."""
Days = Annotated[int, msgspec.Meta(ge=1, le=MAX_DAYS)]


class Period(msgspec.Struct, frozen=True, kw_only=True):
    """What to look at: the last ``days`` UTC days up to and including ``until``."""

    until: date
    days: Days = 30
    environment: str | None = None
    test: str | None = None

    @property
    def since(self) -> date:
        return self.until - timedelta(days=self.days - 1)

    @property
    def since_at(self) -> datetime:
        return datetime(self.since.year, self.since.month, self.since.day, tzinfo=UTC)


class DailyMetric(msgspec.Struct, frozen=True):
    """One test case in one environment on one UTC day, over its passed and failed
    executions (skipped ones sent nothing). Response times are the last response's."""

    day: date
    suite: str
    test: str
    test_case_id: uuid.UUID
    definition_hash: str
    environment: str
    runs: int
    successes: int
    success_rate: float
    """Percent, 0-100."""
    avg_ms: float | None
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


class RunDay(msgspec.Struct, frozen=True):
    """The runs of one suite in one environment that ended on one UTC day."""

    day: date
    suite: str
    environment: str
    runs: int
    passed: int
    failed: int
    """Failed, cancelled or in error: every ended run that did not pass."""
    avg_duration_ms: float | None
    p50_duration_ms: float | None
    p95_duration_ms: float | None
    max_duration_ms: float | None


class FlakyTest(msgspec.Struct, frozen=True):
    """The latest time a flaky rule fired for a test in an environment, in the period."""

    suite: str
    test: str
    test_case_id: str
    environment: str
    rule: str
    """failure_rate or flip_rate (docs/analytics.md)."""
    rate: float
    threshold: float
    samples: int
    window: str
    failures: int
    flips: int
    run_id: str
    """The run whose execution crossed the rule's line."""
    detected_at: datetime
    times: int
    """How often this rule fired for this test in the period (once per crossing)."""


class Slowdown(msgspec.Struct, frozen=True):
    """The latest performance degradation found for a test in an environment."""

    suite: str
    test: str
    test_case_id: str
    environment: str
    recent_median_ms: float
    baseline_median_ms: float
    ratio: float
    threshold: float
    run_id: str
    detected_at: datetime
    times: int


class FailureCategory(msgspec.Struct, frozen=True):
    category: str
    """assertion, timeout, connection, server_error, dependency_skipped, template, capture."""
    failures: int
    tests: int
    """Distinct test cases with a failure of this category."""
    last_at: datetime


class ServiceHealth(msgspec.Struct, frozen=True):
    """A service's latest health check (issue 12 part 4)."""

    service: str
    status: str
    """healthy, degraded, unhealthy or timeout."""
    response_time_ms: float | None
    checked_at: datetime


class Analytics(msgspec.Struct, frozen=True):
    project_id: uuid.UUID
    since: date
    until: date
    environment: str | None
    test: str | None
    daily: list[DailyMetric]
    """By suite, test, environment, then day."""
    runs: list[RunDay]
    """By suite, environment, then day; not filtered by ``test`` (a run is a suite's)."""
    flaky: list[FlakyTest]
    """Newest first."""
    slowdowns: list[Slowdown]
    """Newest first."""
    failure_categories: list[FailureCategory]
    """Most failures first."""
    service_health: list[ServiceHealth]
    """Empty: Baton does not keep service health checks in a read table yet."""


_PROJECT = (
    "SELECT EXISTS (SELECT FROM service_projects WHERE id = $1)"
    " OR EXISTS (SELECT FROM projects WHERE id = $1)"
)

DAILY = """
SELECT m.day, s.name, c.name, c.id, c.definition_hash, e.name, m.total_runs,
       m.successful_runs, m.success_rate::float8, m.avg_response_time_ms,
       m.p50_response_time_ms, m.p95_response_time_ms, m.p99_response_time_ms
FROM test_suites s
JOIN test_cases c ON c.suite_id = s.id
JOIN performance_metrics m ON m.test_case_id = c.id
JOIN environments e ON e.id = m.environment_id
WHERE s.project_id = $1 AND m.day >= $2 AND m.day <= $3
  AND ($4::text IS NULL OR e.name = $4) AND ($5::text IS NULL OR c.name = $5)
ORDER BY s.name, c.name, c.definition_hash, e.name, m.day
"""

RUNS = """
SELECT m.day, s.name, e.name, m.runs, m.passed, m.runs - m.passed, m.avg_duration_ms,
       m.p50_duration_ms, m.p95_duration_ms, m.max_duration_ms
FROM run_metrics m
JOIN test_suites s ON s.id = m.suite_id
JOIN environments e ON e.id = m.environment_id
WHERE m.project_id = $1 AND m.day >= $2 AND m.day <= $3
  AND ($4::text IS NULL OR e.name = $4)
ORDER BY s.name, e.name, m.day
"""

FAILURES = """
SELECT f.category, sum(f.failures)::int, count(DISTINCT f.test_case_id)::int, max(f.last_at)
FROM test_suites s
JOIN test_cases c ON c.suite_id = s.id
JOIN failure_metrics f ON f.test_case_id = c.id
JOIN environments e ON e.id = f.environment_id
WHERE s.project_id = $1 AND f.day >= $2 AND f.day <= $3
  AND ($4::text IS NULL OR e.name = $4) AND ($5::text IS NULL OR c.name = $5)
GROUP BY f.category
ORDER BY 2 DESC, f.category
"""

HEALTH = """
SELECT DISTINCT ON (service) service, status, response_time_ms, checked_at
FROM service_health_checks
WHERE project_id = $1 AND checked_at < $2
ORDER BY service, checked_at DESC, id DESC
"""


async def analytics(
    conn: asyncpg.Connection, store: EventStore, project_id: uuid.UUID, period: Period
) -> Analytics:
    """The project's analytics over ``period``; NotFound unless ``conn``'s organization has
    the project."""
    if not await conn.fetchval(_PROJECT, project_id):
        raise NotFound(f"no project {project_id}")
    since, until = period.since, period.until
    start, end = period.since_at, period.since_at + timedelta(days=period.days)
    daily = await conn.fetch(DAILY, project_id, since, until, period.environment, period.test)
    runs = await conn.fetch(RUNS, project_id, start, end, period.environment)
    failures = await conn.fetch(FAILURES, project_id, start, end, period.environment, period.test)
    health = await conn.fetch(HEALTH, project_id, end)
    flaky, slowdowns = await findings(store, project_id, period)
    return Analytics(
        project_id=project_id,
        since=since,
        until=until,
        environment=period.environment,
        test=period.test,
        daily=[DailyMetric(*row) for row in daily],
        runs=[RunDay(*row) for row in runs],
        flaky=flaky,
        slowdowns=slowdowns,
        failure_categories=[FailureCategory(*row) for row in failures],
        service_health=[ServiceHealth(*row) for row in health],
    )


async def findings(
    store: EventStore, project_id: uuid.UUID, period: Period
) -> tuple[list[FlakyTest], list[Slowdown]]:
    """The latest finding per test case, environment and rule in the period, newest first.

    The stream holds a finding once per crossing of a rule's line, so it stays small next
    to the results it was judged from: it is read whole."""
    start = period.since_at
    end = start + timedelta(days=period.days)
    flaky: dict[tuple[str, str, str], FlakyTest] = {}
    slow: dict[tuple[str, str], Slowdown] = {}
    for recorded in await store.read_stream(analytics_stream(project_id)):
        event, at = recorded.event, recorded.recorded_at
        if not start <= at < end or not isinstance(event, FlakyTestDetected | PerformanceDegraded):
            continue
        if period.environment is not None and event.environment != period.environment:
            continue
        if period.test is not None and event.test != period.test:
            continue
        if isinstance(event, FlakyTestDetected):
            key = (event.test_case_id, event.environment_id, event.rule)
            times = flaky[key].times + 1 if key in flaky else 1
            flaky[key] = FlakyTest(
                event.suite, event.test, event.test_case_id, event.environment, event.rule,
                event.rate, event.threshold, event.samples, event.window, event.failures,
                event.flips, event.run_id, at, times,
            )  # fmt: skip
        else:
            found = (event.test_case_id, event.environment_id)
            times = slow[found].times + 1 if found in slow else 1
            slow[found] = Slowdown(
                event.suite, event.test, event.test_case_id, event.environment,
                event.recent_median_ms, event.baseline_median_ms, event.ratio, event.threshold,
                event.run_id, at, times,
            )  # fmt: skip
    newest = sorted(flaky.values(), key=lambda item: item.detected_at, reverse=True)
    return newest, sorted(slow.values(), key=lambda item: item.detected_at, reverse=True)
