"""A project's analytics: the API's daily metrics, run durations, flaky tests and failure
categories over a history spread across days, scoped to the caller's organization; the
analytics page's charts and the run page's waterfall, read in headless Chromium."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from context_service.keys import create_key
from events import types as ev
from events.postgres import PostgresEventStore
from events.projections import derive
from events.store import NewEvent, StreamAppend
from tests.conftest import LiveService, Org
from tests.test_dashboard import Page, Shop, chromium, page, shop

__all__ = ["chromium", "page", "shop"]  # the browser and the demo shop, as fixtures

pytestmark = pytest.mark.timeout(90)

PLAN = [
    ev.PlannedTest("login", definition_hash="h-login"),
    ev.PlannedTest("checkout", {"login": "token"}, "h-checkout"),
]
TODAY = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
# (days ago, what becomes of checkout): 3 days ago, none 2 days ago, yesterday, today
# (the flaky rules need 30 executions over 3 days: 12, 18 and 2 of them)
HISTORY = [(3, "passed")] * 12 + [(1, "passed")] * 12 + [(1, "failed")] * 6
HISTORY += [(0, "passed")] * 2 + [(0, "skipped")]
DAYS_WITH_DATA = sorted({(TODAY - timedelta(days=ago)).date().isoformat() for ago, _ in HISTORY})


def _run(org: uuid.UUID, checkout: str, at: datetime) -> StreamAppend:
    """A run of login then checkout at ``at``; checkout passes (in 100 ms), fails an
    assertion, or is skipped because login answered 503."""
    run_id = str(uuid.uuid4())
    events: list[ev.Event] = [
        ev.RunStarted(run_id, "shop", "d1", PLAN, organization=str(org), project="shop"),
        ev.TestStarted("login"),
        ev.ResponseReceived("login", 1, 503 if checkout == "skipped" else 200, {}, "",
                            ev.Timings(40.0)),
    ]  # fmt: skip
    if checkout == "skipped":
        events += [
            ev.TestFailed("login", 1, 50.0, "server_error", "status 503"),
            ev.TestSkipped("checkout", "login failed", "dependency_skipped"),
            ev.RunCompleted("failed", 0, 1, 1, 60.0),
        ]
    else:
        failed = checkout == "failed"
        verdict = (
            ev.TestFailed("checkout", 1, 120.0, "assertion", "expected 201, got 409")
            if failed
            else ev.TestPassed("checkout", 1, 100.0)
        )
        events += [
            ev.TestPassed("login", 1, 50.0),
            ev.TestStarted("checkout"),
            ev.ResponseReceived("checkout", 1, 409 if failed else 201, {}, "", ev.Timings(90.0)),
            verdict,
            ev.RunCompleted("failed" if failed else "passed", 2 - failed, int(failed), 0, 200.0),
        ]
    start = int(at.timestamp() * 1_000_000)
    new = [NewEvent(event, at=start + 10_000 * n) for n, event in enumerate(events)]
    return StreamAppend(ev.run_stream(run_id), new)


@pytest.fixture(scope="module")
async def orgs(live_service: LiveService) -> AsyncIterator[dict[str, Org]]:
    made = {}
    for slug in ("acme", "globex"):
        key = await create_key(live_service.settings, organization=slug, scopes=["read"], name="t")
        made[slug] = Org(live_service, key)
    yield made
    for org in made.values():
        await org.http.aclose()


@pytest.fixture(scope="module")
async def project(live_service: LiveService, orgs: dict[str, Org]) -> str:
    """acme's project "shop" with HISTORY in its log, projected and judged by the service."""
    dsn = live_service.settings.database_url
    conn = await asyncpg.connect(dsn)
    try:
        org = await conn.fetchval("SELECT id FROM organizations WHERE slug = 'acme'")
    finally:
        await conn.close()
    store = await PostgresEventStore.connect(dsn, max_size=2)
    try:
        for n, (ago, checkout) in enumerate(HISTORY):
            at = TODAY - timedelta(days=ago) + timedelta(minutes=n)
            await store.append([_run(org, checkout, min(at, datetime.now(UTC)))])
        # the service "api" was healthy two days ago and is unhealthy today: its latest counts
        for ago, status in ((2, "healthy"), (0, "unhealthy")):
            at = int(min(TODAY - timedelta(days=ago), datetime.now(UTC)).timestamp() * 1_000_000)
            check = ev.ServiceHealthChecked(
                "api", "http://api/health", status, 1, 12.5, 200 if ago else 503,
                project="shop", organization=str(org), suite="shop",
            )  # fmt: skip
            stream = f"{ev.HEALTH_PREFIX}{uuid.uuid4()}"
            await store.append([StreamAppend(stream, [NewEvent(check, at=at)])])
    finally:
        await store.aclose()
    project_id = str(derive("project", org, "shop"))
    url = f"/api/v1/projects/{project_id}/analytics"
    deadline = asyncio.get_running_loop().time() + 30
    while True:  # until the projector (404 before: no project yet), then the detector, are done
        response = await orgs["acme"].http.get(url)
        found = response.json() if response.status_code == 200 else {"flaky": [], "runs": []}
        runs = sum(run["runs"] for run in found["runs"])
        if len(found["flaky"]) == 1 and found.get("service_health") and runs == len(HISTORY):
            break
        assert asyncio.get_running_loop().time() < deadline, response.text
        await asyncio.sleep(0.05)
    return project_id


async def test_daily_metrics_per_test_and_environment_over_the_days_with_executions(
    orgs: dict[str, Org], project: str
) -> None:
    found = await orgs["acme"].ok("GET", f"/api/v1/projects/{project}/analytics?days=30")
    assert found["until"] == TODAY.date().isoformat()
    assert found["since"] == (TODAY - timedelta(days=29)).date().isoformat()
    checkout = [(r["day"], r["runs"], r["successes"], r["success_rate"], r["p95_ms"])
                for r in found["daily"] if r["test"] == "checkout"]  # fmt: skip
    # the skipped checkout of today sent nothing: it is not an execution
    assert checkout == [
        (DAYS_WITH_DATA[0], 12, 12, 100.0, 90.0),
        (DAYS_WITH_DATA[1], 18, 12, 66.67, 90.0),
        (DAYS_WITH_DATA[2], 2, 2, 100.0, 90.0),
    ]
    login_today = [
        r for r in found["daily"] if r["test"] == "login" and r["day"] == DAYS_WITH_DATA[2]
    ]
    assert [(r["runs"], r["successes"], r["environment"]) for r in login_today] == [
        (3, 2, "default")
    ]
    runs = {
        r["day"]: (r["runs"], r["passed"], r["failed"], r["p95_duration_ms"]) for r in found["runs"]
    }
    assert runs[DAYS_WITH_DATA[1]] == (18, 12, 6, 200.0)
    assert runs[DAYS_WITH_DATA[2]][:3] == (3, 2, 1)


async def test_flaky_tests_name_the_rule_that_fired_and_failures_are_categorised(
    orgs: dict[str, Org], project: str
) -> None:
    found = await orgs["acme"].ok("GET", f"/api/v1/projects/{project}/analytics")
    [flaky] = found["flaky"]
    # the sixth failure of checkout yesterday: 6 of 30 executions in 7 days
    assert (flaky["test"], flaky["rule"], flaky["samples"], flaky["failures"]) == (
        "checkout", "failure_rate", 30, 6,
    )  # fmt: skip
    assert flaky["times"] == 1  # once: when the line was crossed
    assert found["slowdowns"] == []
    categories = {c["category"]: (c["failures"], c["tests"]) for c in found["failure_categories"]}
    assert categories == {"assertion": (6, 1), "server_error": (1, 1), "dependency_skipped": (1, 1)}
    assert [(h["service"], h["status"]) for h in found["service_health"]] == [("api", "unhealthy")]


async def test_the_period_and_filters_narrow_every_part(orgs: dict[str, Org], project: str) -> None:
    url = f"/api/v1/projects/{project}/analytics"
    two_days = await orgs["acme"].ok("GET", f"{url}?days=2")
    assert {r["day"] for r in two_days["daily"]} == set(DAYS_WITH_DATA[1:])
    assert sum(r["runs"] for r in two_days["runs"]) == 21
    login = await orgs["acme"].ok("GET", f"{url}?test=login")
    assert {r["test"] for r in login["daily"]} == {"login"}
    assert login["flaky"] == [] and [c["category"] for c in login["failure_categories"]] == [
        "server_error"
    ]
    elsewhere = await orgs["acme"].ok("GET", f"{url}?environment=staging")
    assert elsewhere["daily"] == elsewhere["runs"] == elsewhere["flaky"] == []
    earlier = await orgs["acme"].ok("GET", f"{url}?days=1&until={DAYS_WITH_DATA[0]}")
    assert {r["day"] for r in earlier["daily"]} == {DAYS_WITH_DATA[0]} and earlier["flaky"] == []
    refused = await orgs["acme"].http.get(f"{url}?days=0")
    assert refused.status_code == 400
    assert refused.json()["errors"][0]["location"] == "query.days"


async def test_another_organization_does_not_see_the_projects_analytics(
    orgs: dict[str, Org], project: str, live_service: LiveService
) -> None:
    response = await orgs["globex"].http.get(f"/api/v1/projects/{project}/analytics")
    assert response.status_code == 404 and f"no project {project}" in response.text
    async with live_service.client() as anonymous:
        assert (await anonymous.get(f"/api/v1/projects/{project}/analytics")).status_code == 401
    schema = await orgs["acme"].ok("GET", "/schema/openapi.json")
    operation = schema["paths"]["/api/v1/projects/{project_id}/analytics"]["get"]
    assert {p["name"] for p in operation["parameters"]} >= {"days", "until", "environment", "test"}
    assert {"daily", "flaky", "slowdowns", "failure_categories", "service_health"} <= set(
        schema["components"]["schemas"]["Analytics"]["properties"]
    )


# ---- in a browser -------------------------------------------------------------------------

_CHARTS = """(() => Object.fromEntries([...document.querySelectorAll(".test-chart")].map(
  (section) => [section.dataset.test, {
    success: [...section.querySelectorAll(".success circle.point")].map((c) => c.dataset.day),
    p95: [...section.querySelectorAll(".p95 circle.point")].map(
      (c) => [c.dataset.day, Number(c.dataset.value)]),
    xs: [...section.querySelectorAll(".success circle.point")].map(
      (c) => c.getBoundingClientRect().x),
  }])))()"""


async def _log_in(page: Page, live_service: LiveService, org: Org, path: str) -> None:
    await page.open(f"{live_service.url}{path}", lands_on="/login")
    await page.js(f"document.getElementById('key').value = {org.key!r}")
    await page.js("document.getElementById('login').click()")
    await page.until(f"location.pathname === {path.split('?')[0]!r}")
    await page.until("document.readyState === 'complete'")


async def test_the_analytics_page_charts_a_point_for_each_day_with_data(
    page: Page, live_service: LiveService, orgs: dict[str, Org], project: str
) -> None:
    await _log_in(page, live_service, orgs["acme"], f"/analytics?project={project}&days=30")
    charts = await page.js(_CHARTS)
    assert set(charts) == {"login", "checkout"}
    assert charts["checkout"]["success"] == DAYS_WITH_DATA  # two days ago: no point
    assert charts["checkout"]["p95"] == [[day, 90.0] for day in DAYS_WITH_DATA]
    assert charts["checkout"]["xs"] == sorted(charts["checkout"]["xs"])  # later is further right
    assert len(set(charts["checkout"]["xs"])) == 3
    flaky = await page.js(
        "[...document.querySelectorAll('#flaky tbody tr')].map((tr) => [tr.dataset.test,"
        " tr.dataset.rule])"
    )
    assert flaky == [["checkout", "failure_rate"]]
    runs = await page.js("document.querySelectorAll('.run-chart circle.point').length")
    assert runs == 6  # p50 and p95 on each of the 3 days
    health = await page.js("document.querySelector('#service-health tbody').textContent")
    assert "api" in health and "unhealthy" in health


WATERFALL_FLOW = """
name: waterfall
base_url: "{{ env.SHOP_URL }}"
tests:
  first: {request: {url: /slow, params: {ms: "150"}}}
  left: {depends_on: [first], request: {url: /slow, params: {ms: "400"}}}
  right: {depends_on: [first], request: {url: /slow, params: {ms: "300"}}}
  last: {depends_on: [left], request: {url: /slow, params: {ms: "150"}}}
"""
_BARS = """(() => Object.fromEntries([...document.querySelectorAll("#waterfall g.bar")].map(
  (g) => [g.dataset.test, {offset: Number(g.dataset.offsetMs),
    duration: Number(g.dataset.durationMs), critical: g.dataset.critical === "yes",
    left: g.querySelector("rect").getBoundingClientRect().left,
    right: g.querySelector("rect").getBoundingClientRect().right}])))()"""


async def test_the_run_page_draws_a_waterfall_with_the_critical_path(
    page: Page, live_service: LiveService, shop: Shop
) -> None:
    key = await create_key(
        live_service.settings, organization="initech", scopes=["read", "run", "admin"], name="t"
    )
    org = Org(live_service, key)
    try:
        created = await org.ok("POST", "/api/v1/projects", 201, json={"name": "waterfall"})
        env = {"project_id": created["id"], "name": "local",
               "variables": [{"name": "SHOP_URL", "value": shop[1]}]}  # fmt: skip
        env_id = (await org.ok("POST", "/api/v1/environments", 201, json=env))["id"]
        body = {"project_id": created["id"], "content": WATERFALL_FLOW}
        suite = (await org.ok("POST", "/api/v1/suites", 201, json=body))["id"]
        run_id = await org.start(suite, env_id)
        assert (await org.finished(run_id))["status"] == "passed"
        await _log_in(page, live_service, org, f"/runs/{run_id}")
    finally:
        await org.http.aclose()
    bars: dict[str, dict[str, Any]] = await page.js(_BARS)
    first, left, right, last = (bars[name] for name in ("first", "left", "right", "last"))
    # the chain starts at increasing offsets, each after what it waited for had ended
    assert first["offset"] < left["offset"] < last["offset"]
    assert left["offset"] >= first["offset"] + first["duration"] - 1
    assert last["offset"] >= left["offset"] + left["duration"] - 1
    assert first["left"] < left["left"] < last["left"]  # and so they are drawn
    assert left["duration"] >= 400 and last["duration"] >= 150
    # left and right ran at once: their bars overlap
    assert right["offset"] < left["offset"] + left["duration"]
    assert left["offset"] < right["offset"] + right["duration"]
    assert right["left"] < left["right"] and left["left"] < right["right"]
    critical = {name for name, bar in bars.items() if bar["critical"]}
    assert critical == {"first", "left", "last"}
