"""Flaky tests and slowdowns found in a test's history: recorded once, when a run crosses a
rule's line, by the detector behind the projector, and the same again after a rebuild in
any page size; and carried live
on the project's stream (SSE and WebSocket), replayed once after Last-Event-ID."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect

from context_service.keys import create_key
from context_service.watch import SseMessage, sse_messages
from events import types as ev
from events.postgres import PostgresEventStore
from events.projections import DEFAULT_ORGANIZATION_ID, Detector, Projector, derive
from events.store import NewEvent, StreamAppend
from tests.conftest import LiveService

pytestmark = pytest.mark.timeout(60)

FINDING_MESSAGES = ("flaky_test_detected", "performance_degradation")
PLAN = [
    ev.PlannedTest("login", definition_hash="h-login"),
    ev.PlannedTest("checkout", {"login": "token"}, "h-checkout"),
]


def run_events(
    run_id: str,
    checkout: str = "passed",
    *,
    checkout_ms: float = 100.0,
    login_ms: float = 50.0,
    organization: str = "",
    project: str = "default",
) -> list[ev.Event]:
    """A run of login, then checkout (which needs login's token). ``checkout`` is what
    becomes of checkout: passed, failed, or skipped because login failed."""
    started = ev.RunStarted(run_id, "shop", "d1", PLAN, organization=organization, project=project)
    events: list[ev.Event] = [started, ev.TestStarted("login")]
    if checkout == "skipped":
        return [
            *events,
            ev.TestFailed("login", 1, login_ms, "server_error", "status 503"),
            ev.TestSkipped("checkout", "login failed", "dependency_skipped"),
            ev.RunCompleted("failed", 0, 1, 1, 200.0),
        ]
    events += [ev.TestPassed("login", 1, login_ms), ev.TestStarted("checkout")]
    if checkout == "failed":
        failed = ev.TestFailed("checkout", 1, checkout_ms, "assertion", "expected 201, got 409")
        return [*events, failed, ev.RunCompleted("failed", 1, 1, 0, 200.0)]
    passed = ev.TestPassed("checkout", 1, checkout_ms)
    return [*events, passed, ev.RunCompleted("passed", 2, 0, 0, 200.0)]


async def append_run(store: PostgresEventStore, events: Sequence[ev.Event]) -> str:
    """One append per run: each run has its own recorded time, as runs in a log do."""
    started = events[0]
    assert isinstance(started, ev.RunStarted)
    new = [NewEvent(event) for event in events]
    await store.append([StreamAppend(ev.run_stream(started.run_id), new)])
    return started.run_id


DEFAULT_PROJECT = derive("project", DEFAULT_ORGANIZATION_ID, "default")


async def findings(store: PostgresEventStore) -> list[ev.RecordedEvent]:
    """The findings recorded about the default project (the runs of these tests)."""
    return await store.read_stream(ev.analytics_stream(DEFAULT_PROJECT))


def summary(recorded: Sequence[ev.RecordedEvent], runs: list[str]) -> list[tuple[str, int, str]]:
    """(test, run number from 1, rule) of each finding."""
    rows = []
    for r in recorded:
        event = r.event
        assert isinstance(event, ev.Finding)
        rule = event.rule if isinstance(event, ev.FlakyTestDetected) else "slowdown"
        rows.append((event.test, runs.index(event.run_id) + 1, rule))
    return rows


async def live(store: PostgresEventStore, outcomes: Sequence[dict[str, Any]]) -> list[str]:
    """Runs with these outcomes, the projector and the detector catching up after each, as
    in ``baton serve``."""
    projector, detector = Projector(store), Detector(store)
    runs = []
    for outcome in outcomes:
        runs.append(await append_run(store, run_events(str(uuid.uuid4()), **outcome)))
        await projector.catch_up()
        await detector.catch_up()
    return runs


async def rebuild(store: PostgresEventStore, page_size: int = 1000) -> None:
    """``baton projections rebuild``, in pages of ``page_size`` events."""
    assert await Projector(store, page_size=page_size).rebuild() > 0
    assert await Detector(store, page_size=page_size).rebuild() > 0


@pytest.fixture
def store(fresh_store: PostgresEventStore) -> PostgresEventStore:
    return fresh_store


async def test_a_test_becomes_flaky_once_when_its_failure_rate_passes_10_percent(
    store: PostgresEventStore,
) -> None:
    # 1 failure in 10 is 10%, not above it; the second failure makes it 2 in 11
    outcomes = [{}] * 9 + [{"checkout": "failed"}] * 2 + [{}] * 2
    runs = await live(store, outcomes)
    recorded = await findings(store)
    assert summary(recorded, runs) == [("checkout", 11, "failure_rate")]
    found = recorded[0].event
    assert isinstance(found, ev.FlakyTestDetected)
    suite = derive("suite", DEFAULT_PROJECT, "shop")
    case = derive("test", suite, "checkout", "h-checkout")
    assert found == ev.FlakyTestDetected(
        run_id=runs[10],
        suite="shop",
        test="checkout",
        test_case_id=str(case),
        environment="default",
        environment_id=found.environment_id,
        rule="failure_rate",
        rate=round(2 / 11, 4),
        threshold=0.1,
        samples=11,
        window="7 days",
        failures=2,
    )
    # the log again, in one page and in pages of 7 events: the same decision, so the
    # store answers the re-sent finding with its position and nothing is added
    await rebuild(store)
    await rebuild(store, page_size=7)
    assert await findings(store) == recorded


async def test_the_detector_judges_only_what_the_projector_has_written(
    store: PostgresEventStore,
) -> None:
    outcomes = [{}] * 9 + [{"checkout": "failed"}] * 2
    runs = [await append_run(store, run_events(str(uuid.uuid4()), **o)) for o in outcomes]
    assert await Detector(store).catch_up() == 0  # no history written yet: nothing to judge
    assert await Projector(store).catch_up() > 0
    # the read tables alone (what baton run waits for) record no finding
    assert await findings(store) == []
    assert await Detector(store).catch_up() > 0
    assert summary(await findings(store), runs) == [("checkout", 11, "failure_rate")]


async def test_runs_skipped_for_a_failed_dependency_are_neither_failures_nor_flips(
    store: PostgresEventStore,
) -> None:
    # counted as failures, the 3 skips would make checkout flaky at run 5 (1 of 5) or 7
    outcomes = [{}] * 4 + [{"checkout": "skipped"}] * 3 + [{}, {"checkout": "failed"}]
    runs = await live(store, outcomes)
    checkout = [r for r in await findings(store) if getattr(r.event, "test", "") == "checkout"]
    assert summary(checkout, runs) == [
        ("checkout", 9, "failure_rate"),
        ("checkout", 9, "flip_rate"),
    ]
    by_rule = {r.event.rule: r.event for r in checkout if isinstance(r.event, ev.FlakyTestDetected)}
    assert (by_rule["failure_rate"].samples, by_rule["failure_rate"].failures) == (6, 1)
    assert (by_rule["flip_rate"].samples, by_rule["flip_rate"].flips) == (6, 1)
    assert by_rule["flip_rate"].rate == 0.2
    assert by_rule["flip_rate"].window == "last 30 executions"


async def test_a_failure_rate_counts_the_last_7_days_and_a_flip_rate_the_last_executions(
    store: PostgresEventStore,
) -> None:
    old = [await append_run(store, run_events(str(uuid.uuid4()), "failed")) for _ in range(2)]
    # the store stamps now(): move these two runs 8 days back, as if the log had been
    # written then, before any projector has read them
    await store.pool.execute(
        "UPDATE events SET recorded_at = recorded_at - interval '8 days' WHERE stream = ANY($1)",
        [ev.run_stream(run_id) for run_id in old],
    )
    runs = old + await live(store, [{}] * 5)
    # with the old failures the failure rate would be 2 of 5 at run 5: they are out of the
    # window; the flips have no window (F F P P P: 1 change in 4)
    assert summary(await findings(store), runs) == [("checkout", 5, "flip_rate")]


async def test_a_slowdown_above_20_percent_is_reported_once_and_15_percent_not_at_all(
    store: PostgresEventStore,
) -> None:
    # checkout goes from 100 to 130 ms (+30%), login from 50 to 57.5 ms (+15%)
    outcomes = [{}] * 15 + [{"checkout_ms": 130.0, "login_ms": 57.5}] * 4
    runs = await live(store, outcomes)
    recorded = await findings(store)
    # run 18: the last 5 checkouts are 100, 100, 130, 130, 130; 13 runs before them
    assert summary(recorded, runs) == [("checkout", 18, "slowdown")]
    found = recorded[0].event
    assert isinstance(found, ev.PerformanceDegraded)
    assert (found.recent_median_ms, found.baseline_median_ms, found.ratio) == (130.0, 100.0, 1.3)
    assert (found.recent_samples, found.baseline_samples, found.baseline_days) == (5, 13, 30)
    assert found.threshold == 1.2
    await rebuild(store)
    assert await findings(store) == recorded


async def test_four_executions_are_too_few_to_call_a_test_flaky(
    store: PostgresEventStore,
) -> None:
    runs = await live(store, [{}, {"checkout": "failed"}, {"checkout": "failed"}, {}])
    assert summary(await findings(store), runs) == []


async def test_a_slowdown_needs_10_passed_executions_before_the_recent_5(
    store: PostgresEventStore,
) -> None:
    # login doubles its time after 9 runs: 9 are too few to be sure of the baseline
    runs = await live(store, [{}] * 9 + [{"login_ms": 100.0}] * 5)
    assert summary(await findings(store), runs) == []


# ---- through the service: the project's stream ---------------------------------------------


async def _messages_until(
    response: httpx.Response, last: Callable[[SseMessage], bool]
) -> list[SseMessage]:
    got = []
    async for message in sse_messages(response.aiter_lines()):
        got.append(message)
        if last(message):
            return got
    raise AssertionError(f"the stream ended after {[m.event for m in got]}")


async def test_the_project_stream_carries_findings_live_and_replays_them_once(
    live_service: LiveService,
) -> None:
    settings = live_service.settings
    key = await create_key(settings, organization="acme", scopes=["read", "admin"], name="t")
    store = await PostgresEventStore.connect(str(settings.database_url), max_size=2)
    http = live_service.client(key)
    try:
        org = await store.pool.fetchval("SELECT id FROM organizations WHERE slug = 'acme'")
        project = (await http.post("/api/v1/projects", json={"name": "shop"})).json()["id"]
        url = f"/api/v1/projects/{project}/stream"
        # checkout: 8 passes, then failures (flaky at run 9); login: 15 runs at 50 ms,
        # then 3 at 100 ms (slower at run 18)
        outcomes: list[dict[str, Any]] = [
            {"checkout": "passed" if n < 8 else "failed", "login_ms": 50.0 if n < 15 else 100.0}
            for n in range(18)
        ]
        runs: list[str] = []
        async with http.stream("GET", url) as response:
            assert response.status_code == 200

            async def appending() -> None:
                for outcome in outcomes:
                    events = run_events(
                        str(uuid.uuid4()), **outcome, organization=str(org), project="shop"
                    )
                    runs.append(await append_run(store, events))

            writer = asyncio.create_task(appending())
            got = await asyncio.wait_for(
                _messages_until(response, lambda m: m.event == "performance_degradation"), 30
            )
            await writer
        kinds = [m.event for m in got]
        assert kinds.count("RunCompleted") == 18
        assert kinds.count("flaky_test_detected") == 1
        flaky = json.loads(next(m.data for m in got if m.event == "flaky_test_detected"))
        assert (flaky["run_id"], flaky["test"], flaky["rule"]) == (
            runs[8],
            "checkout",
            "failure_rate",
        )
        assert (flaky["samples"], flaky["failures"]) == (9, 1)
        assert "type" not in flaky
        slower = json.loads(got[-1].data)
        assert (slower["run_id"], slower["test"], slower["ratio"]) == (runs[17], "login", 2.0)
        # each after the RunCompleted of its run
        completed = [int(m.id or 0) for m in got if m.event == "RunCompleted"]
        positions = {m.event: int(m.id or 0) for m in got if m.event in FINDING_MESSAGES}
        assert completed[8] < positions["flaky_test_detected"]
        assert completed[17] < positions["performance_degradation"]

        # reconnect after run 9 started: replayed from the log once, then on to the end
        headers = {"Last-Event-ID": str(completed[7])}
        async with http.stream("GET", url, headers=headers) as response:
            again = await asyncio.wait_for(
                _messages_until(response, lambda m: m.event == "performance_degradation"), 30
            )
        assert [m for m in again if m.event == "flaky_test_detected"] == [
            m for m in got if m.event == "flaky_test_detected"
        ]
        assert again == [m for m in got if int(m.id or 0) > completed[7]]

        # the WebSocket: the same message, typed
        base = live_service.url.replace("http", "ws", 1)
        socket_url = f"{base}/api/v1/projects/{project}/ws?after={completed[7]}"
        auth = {"Authorization": f"Bearer {key}"}
        async with ws_connect(socket_url, additional_headers=auth) as socket:
            while (message := json.loads(await socket.recv()))["type"] != "flaky_test_detected":
                pass
        assert message["position"] == positions["flaky_test_detected"]
        assert message["event"] == flaky
    finally:
        await http.aclose()
        await store.aclose()
