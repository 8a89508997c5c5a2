"""The dashboard's analytics page: a project's trends as server-rendered SVG charts.

It shows what ``GET /api/v1/projects/{id}/analytics`` answers (context_service.analytics),
read in the same tenant transaction: p95 response time and success rate per test (a line
per environment), run duration per suite and environment (p50 and p95), the flaky tests,
the slowdowns, the failure categories and service health.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import msgspec
from litestar import Response, Router, get
from litestar.params import FromQuery

from context_service.analytics import MAX_DAYS, Analytics, DailyMetric, Period, analytics
from context_service.api.common import PrincipalDep, ServicesDep
from context_service.charts import Series, by_series, line_chart
from context_service.dashboard import error_page, page, to_login
from context_service.errors import BadRequest, ServiceError, Unauthorized

PERIODS = (7, 30, 90, 365)
_PROJECTS = """
SELECT id, name FROM service_projects
UNION SELECT id, name FROM projects
ORDER BY 2, 1
"""


class TestCharts(msgspec.Struct, frozen=True):
    __test__ = False  # not a pytest class
    suite: str
    test: str
    definition_hash: str
    p95: Any
    success: Any


def _test_charts(found: Analytics) -> list[TestCharts]:
    cases: dict[tuple[str, str, str], list[DailyMetric]] = {}
    for row in found.daily:
        cases.setdefault((row.suite, row.test, row.definition_hash), []).append(row)
    charts = []
    for (suite, test, definition), rows in cases.items():
        p95 = by_series((row.environment, row.day, row.p95_ms) for row in rows)
        success = by_series((row.environment, row.day, row.success_rate) for row in rows)
        charts.append(
            TestCharts(
                suite,
                test,
                definition,
                line_chart(p95, since=found.since, until=found.until, unit="ms"),
                line_chart(success, since=found.since, until=found.until, unit="%", top=100),
            )
        )
    return charts


def _run_charts(found: Analytics) -> list[tuple[str, Any]]:
    groups: dict[str, list[Any]] = {}
    for row in found.runs:
        groups.setdefault(f"{row.suite} in {row.environment}", []).append(row)
    charts = []
    for name, rows in groups.items():
        lines: list[Series] = [
            *by_series(("p50", row.day, row.p50_duration_ms) for row in rows),
            *by_series(("p95", row.day, row.p95_duration_ms) for row in rows),
        ]
        charts.append((name, line_chart(lines, since=found.since, until=found.until, unit="ms")))
    return charts


@get("/analytics", name="dashboard:analytics")
async def analytics_page(
    services: ServicesDep,
    principal: PrincipalDep,
    project: FromQuery[str | None] = None,
    days: FromQuery[str] = "30",
    environment: FromQuery[str | None] = None,
    test: FromQuery[str | None] = None,
) -> Response[str]:
    """A project's trends over the last ``days`` (its first project unless one is chosen)."""
    period = Period(
        until=datetime.now(UTC).date(),
        days=_days(days),
        environment=environment or None,
        test=test or None,
    )
    async with services.db.tenant(principal.organization_id) as conn:
        projects = [(row[0], row[1]) for row in await conn.fetch(_PROJECTS)]
        chosen = _chosen(project, projects)
        found = None
        if chosen is not None:
            found = await analytics(conn, services.store, chosen, period)
    return page(
        "analytics.html",
        projects=projects,
        chosen=chosen,
        period=period,
        periods=sorted({*PERIODS, period.days}),
        found=found,
        tests=_test_charts(found) if found else [],
        runs=_run_charts(found) if found else [],
    )


def _days(given: str) -> int:
    # read here, not by the framework: a page's error is a page, in the dashboard's words
    try:
        days = int(given)
    except ValueError:  # not a number, or one of thousands of digits
        days = 0
    if not 1 <= days <= MAX_DAYS:
        raise BadRequest(
            f"days must be a whole number of days between 1 and {MAX_DAYS}, not {given!r}"
        )
    return days


def _chosen(project: str | None, projects: list[tuple[uuid.UUID, str]]) -> uuid.UUID | None:
    if not project:
        return projects[0][0] if projects else None
    try:
        return uuid.UUID(project)
    except ValueError:
        raise BadRequest(f"project must be a project's id, not {project!r}") from None


router = Router(
    "/",
    route_handlers=[analytics_page],
    exception_handlers={Unauthorized: to_login, ServiceError: error_page},
    include_in_schema=False,
)
"""The analytics page, for ``create_app``."""
