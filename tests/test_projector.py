"""The projector's guarantees, on events written by the test: each page exactly once with
its checkpoint, never passing an append that commits late, a failed page changing nothing,
projectors in several processes taking turns, serve waking on a commit."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg
import msgspec
import pytest

from events.postgres import PostgresEventStore
from events.projections import Projector, project
from events.store import NewEvent, StreamAppend
from events.types import (
    AssertionEvaluated,
    AuthTokenUpdated,
    Event,
    PlannedTest,
    RecordedEvent,
    RequestSent,
    ResponseReceived,
    RunCompleted,
    RunStarted,
    TestFailed,
    TestPassed,
    TestSkipped,
    TestStarted,
    Timings,
    VariableCaptured,
)
from tests.test_projections import snapshot


def run_events(run_id: str, *, fail: bool = False, response_ms: float = 10.0) -> list[Event]:
    """A run of two tests: login (fails if asked) and profile, which needs its token."""
    plan = [
        PlannedTest("login", definition_hash="h-login"),
        PlannedTest("profile", {"login": "token"}, "h-profile"),
    ]
    events: list[Event] = [
        RunStarted(run_id=run_id, suite="synthetic", suite_digest="d1", plan=plan),
        TestStarted(test="login"),
        RequestSent(test="login", attempt=1, method="POST", url="http://api/login"),
        ResponseReceived(
            test="login",
            attempt=1,
            status=200,
            headers={},
            body_excerpt="{}",
            timings=Timings(total_ms=response_ms),
        ),
        AssertionEvaluated(
            test="login",
            attempt=1,
            subject="status",
            predicate="equals",
            expected=200,
            actual=500 if fail else 200,
            passed=not fail,
        ),
    ]
    if fail:
        return [
            *events,
            TestFailed(
                test="login",
                attempts=1,
                duration_ms=12.0,
                category="assertion",
                message=f"status: expected 200, got 500 (request {run_id[:8]})",
            ),
            TestSkipped(test="profile", reason="depends on login", category="dependency_skipped"),
            RunCompleted(status="failed", passed=0, failed=1, skipped=1, duration_ms=20.0),
        ]
    return [
        *events,
        AuthTokenUpdated(test="login", name="auth.token", value="sealed-token"),
        VariableCaptured(test="login", name="user_id", value=7),
        TestPassed(test="login", attempts=1, duration_ms=12.0),
        TestStarted(test="profile"),
        TestPassed(test="profile", attempts=1, duration_ms=3.0),
        RunCompleted(status="passed", passed=2, failed=0, skipped=0, duration_ms=20.0),
    ]


def appended(events: Sequence[Event], run_id: str | None = None) -> StreamAppend:
    run_id = run_id or str(uuid.uuid4())
    return StreamAppend(f"run-{run_id}", [NewEvent(event) for event in events])


async def write_runs(store: PostgresEventStore, count: int, **kwargs: Any) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in range(count)]
    await store.append([appended(run_events(run_id, **kwargs), run_id) for run_id in ids])
    return ids


@pytest.fixture
def store(fresh_store: PostgresEventStore) -> PostgresEventStore:
    return fresh_store


async def test_projector_never_passes_an_append_that_commits_late(
    store: PostgresEventStore, fresh_database_dsn: str
) -> None:
    projector = Projector(store)
    await write_runs(store, 1)
    first = await projector.catch_up()
    slow = await asyncpg.connect(fresh_database_dsn)
    try:
        transaction = slow.transaction()
        await transaction.start()
        slow_run = str(uuid.uuid4())
        # an append that has drawn its positions but not committed yet
        await slow.execute(
            "SELECT baton_append($1, $2, $3, $4, $5, $6::text[]::jsonb[])",
            [f"run-{slow_run}"],
            [0],
            [1],
            [uuid.uuid4()],
            ["RunStarted"],
            [msgspec.json.encode(run_events(slow_run)[0]).decode()],
        )
        later = asyncio.create_task(write_runs(store, 2))
        await asyncio.sleep(0.2)
        assert await projector.catch_up() == 0
        assert await projector.position() == first
        await transaction.commit()
    finally:
        await slow.close()
    later_ids = await later
    assert await projector.catch_up() == 1 + 2 * len(run_events("x"))
    conn = await asyncpg.connect(fresh_database_dsn)
    try:
        runs = {str(row[0]): row[1] for row in await conn.fetch("SELECT id, status FROM test_runs")}
        head = await conn.fetchval("SELECT max(position) FROM events")
    finally:
        await conn.close()
    assert runs[slow_run] == "running"
    assert [runs[run_id] for run_id in later_ids] == ["passed", "passed"]
    assert await projector.position() == head


async def test_a_failed_page_changes_nothing_and_the_next_attempt_finishes_it(
    store: PostgresEventStore, fresh_database_dsn: str
) -> None:
    await write_runs(store, 3)
    await Projector(store).catch_up()
    conn = await asyncpg.connect(fresh_database_dsn)
    try:
        before = await snapshot(conn)
        await write_runs(store, 2, fail=True)
        checkpoint = await Projector(store).position()

        async def crash(_: asyncpg.Connection, page: Sequence[RecordedEvent]) -> None:
            raise RuntimeError("the projector died here")

        with pytest.raises(RuntimeError, match="died here"):
            await Projector(store, handlers=[crash]).catch_up()
        assert await snapshot(conn) == before
        assert await Projector(store).position() == checkpoint
        assert await Projector(store).behind() == 2 * len(run_events("x", fail=True))

        assert await Projector(store).catch_up() == 2 * len(run_events("x", fail=True))
        assert await Projector(store).behind() == 0
        after = await snapshot(conn)
        assert len(after["failure_analysis"]) == 4  # per run: login failed, profile skipped
        assert await Projector(store).rebuild() > 0
        assert await snapshot(conn) == after
    finally:
        await conn.close()


async def test_projectors_running_at_once_apply_each_event_once(
    store: PostgresEventStore, fresh_database_dsn: str
) -> None:
    applied: list[int] = []

    async def note(_: asyncpg.Connection, page: Sequence[RecordedEvent]) -> None:
        applied.extend(recorded.position for recorded in page)

    for _ in range(5):
        await write_runs(store, 4)
    others = [await PostgresEventStore.connect(fresh_database_dsn, max_size=2) for _ in range(3)]
    try:
        counts = await asyncio.gather(
            *(Projector(s, page_size=10, handlers=[note]).catch_up() for s in [store, *others])
        )
    finally:
        for other in others:
            await other.aclose()
    total = 20 * len(run_events("x"))
    assert sum(counts) == total
    assert sorted(applied) == sorted(set(applied)) and len(applied) == total


async def test_serve_wakes_when_an_append_commits(store: PostgresEventStore) -> None:
    projector = Projector(store)
    stop = asyncio.Event()
    # a fallback far beyond the test's patience: only the notification can wake it
    serving = asyncio.create_task(projector.serve(fallback=60.0, stop=stop))
    try:
        await asyncio.sleep(0.2)
        for _ in range(2):
            await write_runs(store, 1)
            last = await store.pool.fetchval("SELECT max(position) FROM events")
            for _ in range(150):  # 3 s
                if await projector.position() >= last:
                    break
                await asyncio.sleep(0.02)
            else:
                pytest.fail("the projector did not wake up on the notification")
    finally:
        stop.set()
        await asyncio.wait_for(serving, 5)


async def test_a_test_decided_again_in_its_run_keeps_only_the_last_verdict(
    store: PostgresEventStore, fresh_database_dsn: str
) -> None:
    run_id = str(uuid.uuid4())
    stream = f"run-{run_id}"
    await store.append([appended(run_events(run_id, fail=True)[:-1], run_id)])
    await Projector(store).catch_up()
    await store.append(
        [
            StreamAppend(
                stream,
                [
                    NewEvent(TestStarted(test="login", attempt=1)),
                    NewEvent(TestPassed(test="login", attempts=1, duration_ms=5.0)),
                ],
            )
        ]
    )
    await Projector(store).catch_up()
    conn = await asyncpg.connect(fresh_database_dsn)
    try:
        result = await conn.fetchrow(
            "SELECT status, category, message FROM test_results WHERE test_name = 'login'"
        )
        case = await conn.fetchval("SELECT id FROM test_cases WHERE name = 'login'")
        failures = await conn.fetchval(
            "SELECT count(*) FROM failure_analysis WHERE test_case_id = $1", case
        )
        metric = await conn.fetchrow(
            "SELECT total_runs, successful_runs FROM performance_metrics WHERE test_case_id = $1",
            case,
        )
    finally:
        await conn.close()
    assert tuple(result) == ("passed", None, "")
    assert failures == 0
    assert tuple(metric) == (1, 1)


async def test_runs_are_found_by_tag_through_the_gin_index(
    store: PostgresEventStore, fresh_database_dsn: str
) -> None:
    tagged, plain = str(uuid.uuid4()), str(uuid.uuid4())
    first, *rest = run_events(tagged)
    assert isinstance(first, RunStarted)
    await store.append(
        [
            appended([msgspec.structs.replace(first, tags=["smoke", "nightly"]), *rest], tagged),
            appended(run_events(plain), plain),
        ]
    )
    await project(store)
    conn = await asyncpg.connect(fresh_database_dsn)
    try:
        query = "SELECT id FROM test_runs WHERE tags @> $1::jsonb"
        assert [str(row[0]) for row in await conn.fetch(query, '["smoke"]')] == [tagged]
        assert await conn.fetch(query, '["smoke", "weekly"]') == []
        await conn.execute("SET enable_seqscan = off")
        plan = "\n".join(row[0] for row in await conn.fetch(f"EXPLAIN {query}", '["smoke"]'))
        assert "test_runs_tags" in plan
    finally:
        await conn.close()


async def test_catch_ups_at_once_on_one_small_pool_never_deadlock(
    fresh_database_dsn: str,
) -> None:
    """Issue 9: every pooled connection waited on the checkpoint's lock while the one that
    held it waited for a pooled connection to read its page. Ten catch-ups at once on a
    pool of two: all finish, each event applied once."""
    store = await PostgresEventStore.connect(fresh_database_dsn, max_size=2)
    try:
        for _ in range(5):
            await write_runs(store, 4)
        counts = await asyncio.wait_for(
            asyncio.gather(*(Projector(store, page_size=10).catch_up() for _ in range(10))), 30
        )
    finally:
        await store.aclose()
    assert sum(counts) == 20 * len(run_events("x"))


async def test_wait_until_wakes_when_the_serving_projector_passes_the_position(
    store: PostgresEventStore,
) -> None:
    """What a finished run in the service waits on instead of projecting itself."""
    projector = Projector(store)
    stop = asyncio.Event()
    serving = asyncio.create_task(projector.serve(fallback=60.0, stop=stop))
    try:
        await asyncio.sleep(0.2)
        [run] = await write_runs(store, 1)
        last: int = await store.pool.fetchval("SELECT max(position) FROM events")
        assert await projector.wait_until(last, within=5)
        status = await store.pool.fetchval(
            "SELECT status FROM test_runs WHERE stream = $1", f"run-{run}"
        )
        assert status == "passed"
        # nothing will reach a position beyond the log: a bounded wait says so
        assert not await projector.wait_until(last + 1, within=0.3)
    finally:
        stop.set()
        await asyncio.wait_for(serving, 5)
