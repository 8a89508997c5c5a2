"""Flaky tests and slowdowns found in a test's history: recorded once, when a run crosses a
rule's line, by the detector behind the projector, and the same again after a rebuild in
any page size; and carried live
on the project's stream (SSE and WebSocket), replayed once after Last-Event-ID."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import msgspec
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


async def append_run(
    store: PostgresEventStore, events: Sequence[ev.Event], at: datetime | None = None
) -> str:
    """One append per run: each run has its own recorded time, as runs in a log do; ``at``
    (default now) is when it started, its events a millisecond apart."""
    started = events[0]
    assert isinstance(started, ev.RunStarted)
    start = int((at or datetime.now(UTC)).timestamp() * 1_000_000)
    new = [NewEvent(event, at=start + 1000 * i) for i, event in enumerate(events)]
    await store.append([StreamAppend(ev.run_stream(started.run_id), new)])
    return started.run_id


DEFAULT_PROJECT = derive("project", DEFAULT_ORGANIZATION_ID, "default")
DAY = timedelta(days=1)
T0 = datetime(2026, 3, 2, 9, tzinfo=UTC)


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


def days_of_runs(
    days: int, outcome: Callable[[int], dict[str, Any]]
) -> list[tuple[datetime, list[ev.Event]]]:
    """10 runs a day, a minute apart, from T0; run n (from 0) has ``outcome(n)``."""
    return [
        (T0 + (n // 10) * DAY + (n % 10) * timedelta(minutes=1),
         run_events(str(uuid.uuid4()), **outcome(n)))
        for n in range(10 * days)
    ]  # fmt: skip


def every_fifth_fails(n: int) -> dict[str, Any]:
    return {"checkout": "failed"} if n % 5 == 4 else {}


async def test_a_flaky_test_is_reported_once_per_rule_and_the_same_after_a_rebuild(
    store: PostgresEventStore,
) -> None:
    # checkout fails 1 run in 5 for 6 days: both rules need 30 executions over 3 days
    runs = await append_runs(store, days_of_runs(6, every_fifth_fails))
    await rebuild(store)
    recorded = await findings(store)
    assert summary(recorded, runs) == [
        ("checkout", 30, "failure_rate"),
        ("checkout", 30, "flip_rate"),
    ]
    found = recorded[0].event
    assert isinstance(found, ev.FlakyTestDetected)
    suite = derive("suite", DEFAULT_PROJECT, "shop")
    case = derive("test", suite, "checkout", "h-checkout")
    assert found == ev.FlakyTestDetected(
        run_id=runs[29],
        suite="shop",
        test="checkout",
        test_case_id=str(case),
        environment="default",
        environment_id=found.environment_id,
        rule="failure_rate",
        rate=0.2,
        threshold=0.1,
        samples=30,
        window="7 days",
        failures=6,
    )
    # the log again, in pages of 7 events: the same decision, so the store answers the
    # re-sent findings with their positions and nothing is added
    await rebuild(store, page_size=7)
    assert await findings(store) == recorded


def phases(*spans: tuple[int, int]) -> Callable[[int], dict[str, Any]]:
    """Outcomes by phase: (days, k) is ``days`` days of 10 runs in which checkout fails
    every k-th run (k = 0: never)."""
    plan = [every for days, every in spans for _ in range(10 * days)]

    def outcome(n: int) -> dict[str, Any]:
        every = plan[n]
        return {"checkout": "failed"} if every and n % every == every - 1 else {}

    return outcome


async def test_a_flaky_rate_that_dips_under_its_line_and_comes_back_is_reported_once(
    store: PostgresEventStore,
) -> None:
    # 20% failing, then 10% for 8 days (under the line, never shown clear of it), then
    # 20% again: a week without the rule holding is no recovery, so no second finding
    spans = [(6, 5), (8, 10), (7, 5)]
    runs = await append_runs(store, days_of_runs(21, phases(*spans)))
    await rebuild(store)
    assert summary(await findings(store), runs) == [
        ("checkout", 30, "failure_rate"),
        ("checkout", 30, "flip_rate"),
    ]


async def test_a_flaky_test_that_recovered_for_a_week_is_reported_again(
    store: PostgresEventStore,
) -> None:
    # 20% failing, 8 days of passes (a week shown clear after the last day it held),
    # then 20% failing again: two findings per rule, and the same judged run by run
    spans = [(6, 5), (8, 0), (6, 5)]
    runs = await append_runs(store, days_of_runs(20, phases(*spans)))
    await rebuild(store)
    recorded = await findings(store)
    assert summary(recorded, runs) == [
        ("checkout", 30, "failure_rate"),
        ("checkout", 30, "flip_rate"),
        ("checkout", 190, "flip_rate"),
        ("checkout", 195, "failure_rate"),
    ]
    await rebuild(store, page_size=7)
    assert await findings(store) == recorded


async def test_the_detector_judges_only_what_the_projector_has_written(
    store: PostgresEventStore,
) -> None:
    runs = await append_runs(store, days_of_runs(4, every_fifth_fails))
    assert await Detector(store).catch_up() == 0  # no history written yet: nothing to judge
    assert await Projector(store).catch_up() > 0
    # the read tables alone (what baton run waits for) record no finding
    assert await findings(store) == []
    assert await Detector(store).catch_up() > 0
    assert [rule for _, _, rule in summary(await findings(store), runs)] == [
        "failure_rate",
        "flip_rate",
    ]


async def test_runs_skipped_for_a_failed_dependency_are_neither_failures_nor_flips(
    store: PostgresEventStore,
) -> None:
    # login fails 1 run in 3, and checkout is skipped then: counted as failures or flips,
    # the skips would make checkout flaky; login is
    def login_fails(n: int) -> dict[str, Any]:
        return {"checkout": "skipped"} if n % 3 == 0 else {}

    runs = await append_runs(store, days_of_runs(6, login_fails))
    await rebuild(store)
    assert {(test, rule) for test, _, rule in summary(await findings(store), runs)} == {
        ("login", "failure_rate"),
        ("login", "flip_rate"),
    }


async def test_one_batch_with_failures_is_not_flaky_history(store: PostgresEventStore) -> None:
    # 50 runs within a second, 1 in 5 failing: an incident of one moment, not a history
    runs = [
        (T0 + n * timedelta(milliseconds=20), run_events(str(uuid.uuid4()), **every_fifth_fails(n)))
        for n in range(50)
    ]
    await append_runs(store, runs)
    await rebuild(store)
    assert await findings(store) == []


def batch(
    day: int, runs: int, rng: random.Random, *, checkout_ms: float = 100.0, batch_id: str = ""
) -> list[tuple[datetime, list[ev.Event]]]:
    """``runs`` runs started 20 ms apart on ``day`` (from T0), all passing, checkout's time
    noisy around ``checkout_ms`` with a scheduling hiccup (3.5x) now and then."""
    made = []
    for n in range(runs):
        noise = 3.5 if rng.random() < 0.05 else rng.uniform(0.85, 1.15)
        events = run_events(str(uuid.uuid4()), checkout_ms=checkout_ms * noise,
                            login_ms=50.0 * rng.uniform(0.8, 1.2))  # fmt: skip
        started = events[0]
        assert isinstance(started, ev.RunStarted)
        events[0] = msgspec.structs.replace(
            started, batch_id=batch_id, row=n + 1 if batch_id else -1
        )
        made.append((T0 + day * DAY + n * timedelta(milliseconds=20), events))
    return made


async def append_runs(
    store: PostgresEventStore, runs: Sequence[tuple[datetime, list[ev.Event]]]
) -> list[str]:
    return [await append_run(store, events, at) for at, events in runs]


async def test_one_healthy_batch_of_50_runs_finds_nothing_after_a_rebuild(
    store: PostgresEventStore,
) -> None:
    # the reported case: get_order at 1.33x its "baseline" within one second of runs
    rng = random.Random(1)
    await append_runs(store, batch(0, 50, rng, batch_id="nightly-1"))
    await rebuild(store)
    assert await findings(store) == []


async def test_two_healthy_batches_find_nothing(store: PostgresEventStore) -> None:
    # back to back (as reported: 21 findings), then a day apart: a batch or two is no
    # baseline, and neither judges the other
    rng = random.Random(2)
    runs = batch(0, 50, rng, batch_id="b1") + batch(0, 50, rng, batch_id="b2")
    runs += batch(1, 50, rng, batch_id="b3")
    await append_runs(store, runs)
    await rebuild(store)
    assert await findings(store) == []


async def test_a_slowdown_of_30_percent_over_days_is_reported_once(
    store: PostgresEventStore,
) -> None:
    rng = random.Random(3)
    steady = [run for day in range(10) for run in batch(day, 8, rng)]
    slow = [run for day in range(10, 14) for run in batch(day, 8, rng, checkout_ms=130.0)]
    runs = await append_runs(store, steady + slow)
    await rebuild(store)
    recorded = await findings(store)
    assert [(test, rule) for test, _, rule in summary(recorded, runs)] == [("checkout", "slowdown")]
    found = recorded[0].event
    assert isinstance(found, ev.PerformanceDegraded)
    # on day 11, its 3rd run: two batches (here hours) of at least 3 runs are slow; the
    # baseline is days 0 to 9, day 10 being recent
    assert runs.index(found.run_id) == 11 * 8 + 2
    assert 1.2 < found.ratio < 1.45
    assert (found.recent_samples, found.threshold, found.baseline_days) == (11, 1.2, 30)
    assert found.baseline_samples == 10 * 8
    # judged live, run by run, the same finding; and again after a rebuild in small pages
    await rebuild(store, page_size=7)
    assert await findings(store) == recorded


async def test_a_slowdown_is_reported_again_only_after_it_recovered(
    store: PostgresEventStore,
) -> None:
    rng = random.Random(4)
    days = [100.0] * 8 + [150.0] * 2 + [100.0] * 8 + [150.0] * 2
    runs = [run for day, ms in enumerate(days) for run in batch(day, 6, rng, checkout_ms=ms)]
    ids = await append_runs(store, runs)
    await rebuild(store)
    days_found = [(number - 1) // 6 for _, number, _ in summary(await findings(store), ids)]
    # once on day 9 (the second slow batch), recovered on day 10, quiet for a week after it
    # last held, once again on day 19
    assert days_found == [9, 19]


async def test_a_test_s_first_days_are_no_slowdown(store: PostgresEventStore) -> None:
    # two days at 100 ms, then twice as slow: two days are not a baseline yet
    rng = random.Random(5)
    runs = [run for day in range(2) for run in batch(day, 10, rng)]
    await append_runs(store, runs + batch(2, 10, rng, checkout_ms=200.0))
    await rebuild(store)
    assert await findings(store) == []


async def test_a_baseline_of_less_than_a_week_is_no_slowdown(store: PostgresEventStore) -> None:
    # five days at 100 ms, then two days twice as slow: runs on 5 days are enough of them,
    # but not a week of the test's batches to measure their spread on
    rng = random.Random(7)
    runs = [run for day in range(5) for run in batch(day, 10, rng)]
    slow = [run for day in (5, 6) for run in batch(day, 10, rng, checkout_ms=200.0)]
    await append_runs(store, runs + slow)
    await rebuild(store)
    assert await findings(store) == []


async def test_2_ms_to_3_ms_is_no_slowdown(store: PostgresEventStore) -> None:
    # 1.5x for days on end, but under the 10 ms floor
    rng = random.Random(6)
    runs = [run for day in range(6) for run in batch(day, 10, rng, checkout_ms=2.0)]
    await append_runs(store, runs + batch(6, 10, rng, checkout_ms=3.0))
    await rebuild(store)
    assert await findings(store) == []


async def test_four_executions_are_too_few_to_call_a_test_flaky(
    store: PostgresEventStore,
) -> None:
    runs = await live(store, [{}, {"checkout": "failed"}, {"checkout": "failed"}, {}])
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
        # checkout fails 1 run in 3 (both flaky rules cross at run 30: 30 executions over
        # 5 days); login takes 50 ms for 7 days (the least a baseline spans), 6 runs a day
        # in 2 hours of 3 runs, then 100 ms on day 8 (slower at run 48, once 2 hours of it
        # are slow)
        outcomes: list[dict[str, Any]] = [
            {
                "checkout": "failed" if n % 3 == 2 else "passed",
                "login_ms": 50.0 if n < 42 else 100.0,
            }
            for n in range(48)
        ]
        started = [
            T0 + (n // 6 + (n >= 42)) * DAY + (n % 6 // 3) * 6 * timedelta(hours=1)
            + (n % 3) * timedelta(minutes=5)
            for n in range(48)
        ]  # fmt: skip
        runs: list[str] = []
        async with http.stream("GET", url) as response:
            assert response.status_code == 200

            async def appending() -> None:
                for outcome, at in zip(outcomes, started, strict=True):
                    events = run_events(
                        str(uuid.uuid4()), **outcome, organization=str(org), project="shop"
                    )
                    runs.append(await append_run(store, events, at))

            writer = asyncio.create_task(appending())
            got = await asyncio.wait_for(
                _messages_until(response, lambda m: m.event == "performance_degradation"), 30
            )
            await writer
        kinds = [m.event for m in got]
        assert kinds.count("RunCompleted") == 48
        assert kinds.count("flaky_test_detected") == 2
        flaky = json.loads(next(m.data for m in got if m.event == "flaky_test_detected"))
        assert (flaky["run_id"], flaky["test"], flaky["rule"]) == (
            runs[29],
            "checkout",
            "failure_rate",
        )
        assert (flaky["samples"], flaky["failures"]) == (30, 10)
        assert "type" not in flaky
        slower = json.loads(got[-1].data)
        assert (slower["run_id"], slower["test"], slower["ratio"]) == (runs[47], "login", 2.0)
        # each after the RunCompleted of its run
        completed = [int(m.id or 0) for m in got if m.event == "RunCompleted"]
        positions: dict[str, int] = {}
        for m in got:
            if m.event in FINDING_MESSAGES:
                positions.setdefault(m.event, int(m.id or 0))
        assert completed[29] < positions["flaky_test_detected"]
        assert completed[47] < positions["performance_degradation"]

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
