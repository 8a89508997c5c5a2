"""The EventStore contract, one module for every backend: in memory, on the PostgreSQL
server and on the embedded default (a database of this module's own on each server).

What only a server can be made to do runs on the two servers (``served``): an append in
memory commits as it draws its positions, so none can commit late, and there is no
connection to lose. PostgreSQL's own behaviour (schema, outages of the server, the pool)
is tested in test_event_store.py and test_postgres_restart.py.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from msgspec.structs import replace

from events.memory import MemoryEventStore
from events.postgres import PostgresEventStore
from events.store import (
    ANY_VERSION,
    EventStore,
    NewEvent,
    StoreError,
    StoreUnavailable,
    StreamAppend,
    WrongExpectedVersion,
)
from events.types import (
    AssertionEvaluated,
    Event,
    PlannedTest,
    RecordedEvent,
    ResponseReceived,
    RunStarted,
    TestPassed,
    TestStarted,
    Timings,
    VariableCaptured,
)
from tests.conftest import private_database

PATIENCE = 5.0
"""Seconds a test waits for what must come much sooner."""


class Backend:
    """A store under test, and its server's DSN when it has one (what a test does to it)."""

    def __init__(self, store: EventStore, dsn: str | None) -> None:
        self.store = store
        self._dsn = dsn

    @property
    def dsn(self) -> str:
        """The DSN of the store's database (``served`` backends have one)."""
        assert self._dsn is not None, "a test of a server takes the served fixture"
        return self._dsn

    @asynccontextmanager
    async def append_held_open(self, stream: str) -> AsyncIterator[int]:
        """An append to ``stream`` that has drawn its position (yielded) and commits when
        the block ends."""
        dsn = self.dsn
        slow = await asyncpg.connect(dsn)
        try:
            transaction = slow.transaction()
            await transaction.start()
            [position] = await slow.fetchval(
                "SELECT baton_append($1, $2, $3, $4, $5, $6::text[]::jsonb[])",
                [stream],
                [0],
                [1],
                [uuid.uuid4()],
                ["TestStarted"],
                ['{"type": "TestStarted", "test": "slow"}'],
            )
            yield position
            await transaction.commit()
        finally:
            await slow.close()


async def drop_connections(dsn: str) -> None:
    """Every other session of the database ends, as when its server restarts."""
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await admin.close()


@pytest.fixture(scope="module")
async def server_database() -> AsyncIterator[str]:
    async with private_database() as dsn:
        yield dsn


@pytest.fixture(scope="module")
async def embedded_database(embedded_dsn: str) -> AsyncIterator[str]:
    async with private_database(embedded_dsn) as dsn:
        yield dsn


@pytest.fixture(params=["memory", "server", "embedded"])
def backend_dsn(request: pytest.FixtureRequest) -> str | None:
    if request.param == "memory":
        return None
    dsn: str = request.getfixturevalue(f"{request.param}_database")
    return dsn


@pytest.fixture
async def backend(backend_dsn: str | None) -> AsyncIterator[Backend]:
    if backend_dsn is None:
        yield Backend(MemoryEventStore(), None)
        return
    store = await PostgresEventStore.connect(backend_dsn, max_size=20)
    yield Backend(store, backend_dsn)
    await store.aclose()


@pytest.fixture(params=["server", "embedded"])
def served_dsn(request: pytest.FixtureRequest) -> str:
    # looked up outside the event loop: a module's async database fixture cannot be set up
    # from inside another async fixture, which happens when this test is the module's first
    # user of it (as under pytest-xdist, where each worker runs only some of the module)
    dsn: str = request.getfixturevalue(f"{request.param}_database")
    return dsn


@pytest.fixture
async def served(served_dsn: str) -> AsyncIterator[Backend]:
    """A backend on a server: what can commit late and lose its connections."""
    dsn = served_dsn
    store = await PostgresEventStore.connect(dsn, max_size=20)
    yield Backend(store, dsn)
    await store.aclose()


@pytest.fixture
def store(backend: Backend) -> EventStore:
    return backend.store


def fresh_stream(kind: str = "run") -> str:
    return f"{kind}-{uuid.uuid4()}"


def started(test: str = "login") -> NewEvent:
    return NewEvent(TestStarted(test=test))


async def mark(store: EventStore) -> int:
    """The newest position: appended by this test, so later reads start right after it."""
    [[position]] = await store.append([StreamAppend(fresh_stream("mark"), [started()])])
    return position


def positions(recorded: list[RecordedEvent]) -> list[int]:
    return [r.position for r in recorded]


# ---- appends and the reads of a stream ------------------------------------------------------


async def test_round_trip_keeps_every_field(store: EventStore) -> None:
    stream = fresh_stream()
    events: list[Event] = [
        RunStarted(
            run_id=stream[4:],
            suite="shop checkout",
            suite_digest="sha256:ab",
            plan=[
                PlannedTest("login"),
                PlannedTest("cart", depends_on={"login": "token"}, definition_hash="h1"),
            ],
            environment="staging",
            tags=["smoke", "é✓"],
        ),
        ResponseReceived(
            test="login",
            attempt=1,
            status=201,
            headers={"content-type": "application/json"},
            body_excerpt='{"token": "x"}\x00 after a NUL byte',
            timings=Timings(total_ms=12.5),
        ),
        AssertionEvaluated(
            test="login",
            attempt=1,
            subject="$.items",
            predicate="equals",
            expected={"a": [1, 2.5, None, True, "s"]},
            actual={"a": [1, 2.5, None, True, "s"]},
            passed=True,
        ),
        VariableCaptured(test="login", name="user_id", value=42),
        TestPassed(test="login", attempts=1, duration_ms=13.0),
    ]
    new = [NewEvent(event) for event in events]
    before = datetime.now(UTC)
    [appended] = await store.append([StreamAppend(stream, new, expected_version=0)])

    assert appended == sorted(appended) and len(set(appended)) == len(events)
    recorded = await store.read_stream(stream)
    assert [r.version for r in recorded] == [1, 2, 3, 4, 5]
    assert positions(recorded) == appended
    assert [r.id for r in recorded] == [n.id for n in new]
    assert {r.stream for r in recorded} == {stream}
    assert [r.type for r in recorded] == [type(e).__name__ for e in events]
    # jsonb cannot hold U+0000: every store keeps the event, with U+FFFD in its place
    nul_replaced = replace(events[1], body_excerpt='{"token": "x"}\ufffd after a NUL byte')
    assert [r.event for r in recorded] == [events[0], nul_replaced, *events[2:]]
    # each event is recorded when it was made, to the microsecond
    assert [r.recorded_at for r in recorded] == [
        datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=n.at) for n in new
    ]
    for r in recorded:
        assert before - timedelta(seconds=5) <= r.recorded_at <= datetime.now(UTC)

    by_position = await store.read_all(after_position=appended[0] - 1, limit=len(events))
    assert by_position == recorded
    assert await store.read_stream(stream, after_version=3) == recorded[3:]
    assert await store.stream_version(stream) == 5
    assert await store.stream_version(fresh_stream()) == 0


async def test_list_streams_newest_first(store: EventStore) -> None:
    prefix = f"run-{uuid.uuid4().hex[:8]}-"
    names = [f"{prefix}{i}" for i in range(3)]
    for name in names:
        await store.append([StreamAppend(name, [started()], expected_version=0)])
    # a later event in the oldest stream does not make it newer
    await store.append([StreamAppend(names[0], [started("again")], expected_version=1)])

    assert await store.list_streams(prefix) == names[::-1]
    assert await store.list_streams(prefix, limit=2) == [names[2], names[1]]
    assert await store.list_streams(prefix + "1") == [names[1]]
    assert await store.list_streams("nothing-starts-like-this-") == []


async def test_wrong_expected_version_names_the_actual_version(store: EventStore) -> None:
    stream = fresh_stream()
    await store.append([StreamAppend(stream, [started(), started()], expected_version=0)])

    for expected in (0, 1, 3):
        with pytest.raises(WrongExpectedVersion) as caught:
            await store.append([StreamAppend(stream, [started()], expected_version=expected)])
        assert (caught.value.stream, caught.value.expected, caught.value.actual) == (
            stream,
            expected,
            2,
        )
    assert await store.stream_version(stream) == 2

    [[position]] = await store.append([StreamAppend(stream, [started()], expected_version=2)])
    [[later]] = await store.append([StreamAppend(stream, [started()], ANY_VERSION)])
    assert later > position
    assert [r.version for r in await store.read_stream(stream)] == [1, 2, 3, 4]


async def test_an_expected_version_below_any_is_not_a_version(store: EventStore) -> None:
    with pytest.raises(ValueError, match="not a version"):
        await store.append([StreamAppend(fresh_stream(), [started()], expected_version=-2)])


@pytest.mark.parametrize("existing", [0, 3])
async def test_concurrent_appends_with_one_expected_version_one_wins(
    store: EventStore, existing: int
) -> None:
    for _ in range(5):
        stream = fresh_stream()
        if existing:
            await store.append([StreamAppend(stream, [started() for _ in range(existing)])])
        racers = [
            store.append([StreamAppend(stream, [started(f"t{i}")], expected_version=existing)])
            for i in range(20)
        ]
        outcomes = await asyncio.gather(*racers, return_exceptions=True)

        winners = [o for o in outcomes if isinstance(o, list)]
        losers = [o for o in outcomes if isinstance(o, WrongExpectedVersion)]
        assert len(winners) == 1 and len(losers) == 19, outcomes
        assert all(loser.actual == existing + 1 for loser in losers)
        recorded = await store.read_stream(stream)
        assert [r.version for r in recorded] == list(range(1, existing + 2))
        assert recorded[-1].position == winners[0][0][0]


async def test_resending_event_ids_returns_the_original_positions(store: EventStore) -> None:
    stream, other = fresh_stream(), fresh_stream()
    batch = [
        StreamAppend(stream, [started("a"), started("b")], expected_version=0),
        StreamAppend(other, [started("c")], expected_version=0),
    ]
    first = await store.append(batch)

    assert await store.append(batch) == first  # the same call again, as after a lost reply
    resent_any = [StreamAppend(stream, batch[0].events, ANY_VERSION)]
    assert await store.append(resent_any) == [first[0]]
    assert positions(await store.read_stream(stream)) == first[0]
    assert await store.stream_version(stream) == 2
    assert await store.stream_version(other) == 1

    # new events after the re-sends continue the stream where it was
    [[position]] = await store.append([StreamAppend(stream, [started("d")], 2)])
    assert position > max(first[1])


async def test_mixing_stored_and_new_event_ids_is_refused(store: EventStore) -> None:
    stream = fresh_stream()
    stored, repeated = started("a"), started("c")
    await store.append([StreamAppend(stream, [stored])])
    for events in ([stored, started("b")], [repeated, repeated]):
        with pytest.raises(StoreError) as caught:
            await store.append([StreamAppend(stream, events, ANY_VERSION)])
        assert not isinstance(caught.value, WrongExpectedVersion)
    # an id is stored in one stream: re-sent to another, it is refused there
    with pytest.raises(StoreError) as caught:
        await store.append([StreamAppend(fresh_stream(), [stored])])
    assert not isinstance(caught.value, WrongExpectedVersion)
    assert await store.stream_version(stream) == 1


async def test_append_to_several_streams_is_all_or_nothing(store: EventStore) -> None:
    fresh, busy = fresh_stream(), fresh_stream()
    await store.append([StreamAppend(busy, [started()])])
    before = await mark(store)

    with pytest.raises(WrongExpectedVersion) as caught:
        await store.append(
            [
                StreamAppend(fresh, [started("a"), started("b")], expected_version=0),
                StreamAppend(busy, [started("c")], expected_version=0),
            ]
        )
    assert caught.value.stream == busy
    assert await store.read_stream(fresh) == []
    assert await store.stream_version(fresh) == 0
    assert await store.list_streams(fresh) == []
    assert await store.read_all(after_position=before) == []
    assert await store.head() == before

    both = await store.append(
        [
            StreamAppend(fresh, [started("a"), started("b")], expected_version=0),
            StreamAppend(busy, [started("c")], expected_version=1),
            StreamAppend(fresh, [started("d")], expected_version=2),
        ]
    )
    assert [len(p) for p in both] == [2, 1, 1]
    flat = [p for appended in both for p in appended]
    assert flat == sorted(flat)
    assert [r.version for r in await store.read_stream(fresh)] == [1, 2, 3]
    assert await store.append([]) == []


async def test_head_a_stream_by_position_and_the_first_and_last_events_of_streams(
    store: EventStore,
) -> None:
    stream, other, empty = fresh_stream(), fresh_stream(), fresh_stream()
    [[a1, a2]] = await store.append([StreamAppend(stream, [started("a"), started("b")])])
    [[o1]] = await store.append([StreamAppend(other, [started("o")])])
    [[a3]] = await store.append([StreamAppend(stream, [started("c")])])
    assert await store.head() == a3
    whole = await store.read_stream(stream)
    assert positions(whole) == [a1, a2, a3]

    assert await store.read_stream(stream, after_position=a1) == whole[1:]
    assert await store.read_stream(stream, after_position=a1, through_position=o1) == whole[1:2]
    assert await store.read_stream(stream, through_position=a2) == whole[:2]
    assert await store.read_stream(stream, 2, through_position=a3) == whole[2:]
    assert await store.read_stream(stream, after_position=a3) == []

    [only] = await store.read_stream(other)
    assert await store.first_events([stream, other, empty]) == {stream: whole[0], other: only}
    assert await store.last_events([stream, other, empty]) == {stream: whole[2], other: only}
    assert await store.first_events([]) == {} and await store.last_events([]) == {}


async def test_a_stream_is_read_in_pages_and_as_of_a_log_position(
    store: EventStore,
) -> None:
    stream, other = fresh_stream(), fresh_stream()
    written: list[int] = []
    for test in ("a", "b", "c", "d"):  # interleaved with another stream's events
        [[position]], _ = await asyncio.gather(
            store.append([StreamAppend(stream, [started(test)])]),
            store.append([StreamAppend(other, [started(test)])]),
        )
        written.append(position)
    recorded = await store.read_stream(stream)

    assert await store.read_stream(stream, limit=2) == recorded[:2]
    assert await store.read_stream(stream, after_position=written[1], limit=1) == recorded[2:3]
    assert await store.read_stream(stream, 1, through_position=written[2], limit=5) == recorded[1:3]
    assert await store.stream_version(stream, through_position=written[0] - 1) == 0
    assert await store.stream_version(stream, through_position=written[2]) == 3
    assert await store.stream_version(stream, through_position=written[3] + 100) == 4


async def test_read_all_bounded_and_by_type(store: EventStore) -> None:
    before = await mark(store)
    stream = fresh_stream()
    events = [started("a"), NewEvent(TestPassed("a", 1, 2.0)), started("b"), started("c")]
    await store.append([StreamAppend(stream, events)])
    whole = await store.read_all(before)
    assert [r.id for r in whole] == [n.id for n in events]

    assert await store.read_all(before, limit=2) == whole[:2]
    assert await store.read_all(whole[1].position, limit=2) == whole[2:]
    assert await store.read_all(before, through_position=whole[1].position) == whole[:2]
    assert await store.read_all(before, types=["TestPassed"]) == [whole[1]]
    # the limit counts what is returned, not what is passed over
    assert await store.read_all(before, 2, types=["TestStarted"]) == [whole[0], whole[2]]
    assert await store.read_all(
        before, types=["TestStarted"], through_position=whole[2].position
    ) == [whole[0], whole[2]]
    assert await store.read_all(before, types=[]) == []
    assert await store.read_all(whole[-1].position) == []


# ---- archival: a stream removed and restored -------------------------------------------------


async def test_a_removed_stream_leaves_a_hole_and_comes_back_where_it_was(
    store: EventStore,
) -> None:
    before = await mark(store)
    archived, kept = fresh_stream(), fresh_stream()
    for test in ("a", "b", "c"):  # interleaved, so the hole is in the middle of the log
        await store.append([StreamAppend(archived, [started(test)])])
        await store.append([StreamAppend(kept, [started(test)])])
    whole = await store.read_all(before)
    original = await store.read_stream(archived)
    head = await store.head()

    assert await store.remove_stream(archived) == 3
    assert await store.remove_stream(archived) == 0
    # readers by position pass the hole: every other event, in order, nothing skipped
    assert await store.read_all(before) == [r for r in whole if r.stream == kept]
    assert await store.read_all(before, limit=2) == [r for r in whole if r.stream == kept][:2]
    assert await store.read_stream(archived) == []
    assert await store.stream_version(archived) == 0
    assert await store.first_events([archived]) == {} and await store.last_events([archived]) == {}
    assert archived not in await store.list_streams("run-", limit=1000)
    assert await store.head() == head  # the kept stream holds the newest event

    await store.restore_stream(original)
    assert await store.read_stream(archived) == original
    assert await store.read_all(before) == whole
    assert await store.stream_version(archived) == 3
    assert await store.stream_version(archived, through_position=original[1].position) == 2
    assert await store.last_events([archived]) == {archived: original[-1]}
    listed = await store.list_streams("run-", limit=1000)
    assert listed.index(kept) < listed.index(archived)  # newest first, as before
    # the restored stream goes on from its version
    await store.append([StreamAppend(archived, [started("d")], expected_version=3)])
    assert await store.stream_version(archived) == 4


async def test_removing_the_newest_stream_never_lets_its_positions_be_drawn_again(
    store: EventStore,
) -> None:
    await mark(store)
    newest = fresh_stream()
    await store.append([StreamAppend(newest, [started("a"), started("b")])])
    original = await store.read_stream(newest)
    await store.remove_stream(newest)
    assert await store.head() < original[0].position

    [[later]] = await store.append([StreamAppend(fresh_stream(), [started()])])
    assert later > original[-1].position
    await store.restore_stream(original)
    assert await store.read_stream(newest) == original
    assert await store.head() == later


async def test_a_restore_that_would_clash_is_refused_whole(store: EventStore) -> None:
    stream = fresh_stream()
    await store.append([StreamAppend(stream, [started("a"), started("b")])])
    original = await store.read_stream(stream)
    await store.remove_stream(stream)

    with pytest.raises(StoreError, match=r"versions 1\.\.1"):
        await store.restore_stream(original[1:])
    with pytest.raises(StoreError, match="one stream"):
        await store.restore_stream([original[0], replace(original[1], stream=fresh_stream())])

    # the stream began again meanwhile: restoring over it would fork it
    await store.append([StreamAppend(stream, [started("new")], expected_version=0)])
    with pytest.raises(StoreError, match="holds events again"):
        await store.restore_stream(original)
    again = await store.read_stream(stream)
    await store.remove_stream(stream)

    # an id taken by another stream: nothing of the restore is written
    other = fresh_stream()
    clash = replace(original[1], id=again[0].id, position=original[1].position)
    await store.restore_stream([replace(again[0], stream=other, version=1)])
    with pytest.raises(StoreError, match="taken"):
        await store.restore_stream([original[0], clash])
    assert await store.read_stream(stream) == []
    await store.restore_stream(original)
    assert await store.read_stream(stream) == original


async def test_reader_never_skips_an_append_that_commits_late(served: Backend) -> None:
    store = served.store
    before = await mark(store)
    slow_stream = fresh_stream()
    later_streams = [fresh_stream(), fresh_stream()]
    async with served.append_held_open(slow_stream) as slow_position:
        later = [
            asyncio.create_task(store.append([StreamAppend(s, [started("later")])]))
            for s in later_streams
        ]
        await asyncio.sleep(0.3)
        # a reader polling by position sees nothing past the open append...
        assert await store.read_all(after_position=before) == []
        # ...because appends commit in position order: the later ones wait for it
        assert not any(task.done() for task in later)
    later_positions = [appended[0][0] for appended in await asyncio.gather(*later)]

    seen = await store.read_all(after_position=before)
    assert [r.stream for r in seen[:1]] == [slow_stream]
    assert positions(seen) == [slow_position, *sorted(later_positions)]
    assert sorted(r.stream for r in seen[1:]) == sorted(later_streams)


async def append_once_it_answers(
    store: EventStore, appended: StreamAppend, *, within: float = 10.0
) -> list[int]:
    """``appended``'s positions, re-sent (harmless) while the store is unavailable."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            [written] = await store.append([appended])
            return written
        except StoreUnavailable:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.1)


# ---- subscribe --------------------------------------------------------------------------


async def next_page(pages: AsyncIterator[list[RecordedEvent]]) -> list[RecordedEvent]:
    return await asyncio.wait_for(anext(pages), PATIENCE)


async def test_subscribe_catches_up_page_by_page_then_follows_the_log(store: EventStore) -> None:
    before = await mark(store)
    stream = fresh_stream()
    [written] = await store.append([StreamAppend(stream, [started(f"t{i}") for i in range(5)])])
    async with aclosing(store.subscribe(before, limit=2, idle=30)) as pages:
        caught_up = [await next_page(pages) for _ in range(3)]
        assert [positions(page) for page in caught_up] == [written[:2], written[2:4], written[4:]]

        waiting = asyncio.create_task(anext(pages))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # nothing new: nothing yielded, not even a heartbeat
        [[one], [two]] = await store.append(
            [StreamAppend(stream, [started("x")]), StreamAppend(fresh_stream(), [started("y")])]
        )
        live = await asyncio.wait_for(waiting, PATIENCE)
    assert positions(live) == [one, two]


async def test_subscribe_wakes_on_an_append_well_within_idle(store: EventStore) -> None:
    before = await mark(store)
    loop = asyncio.get_running_loop()
    async with aclosing(store.subscribe(before, idle=30)) as pages:
        waiting = asyncio.create_task(anext(pages))
        await asyncio.sleep(0.3)  # subscribed and waiting
        start = loop.time()
        [[position]] = await store.append([StreamAppend(fresh_stream(), [started()])])
        page = await asyncio.wait_for(waiting, PATIENCE)
        woke_after = loop.time() - start
    assert positions(page) == [position]
    assert woke_after < 0.5  # a thirtieth of idle at most: the notification woke it


async def test_subscribe_with_a_pace_gathers_appends_that_trickle_in(store: EventStore) -> None:
    """What a projector follows with: appends 50 ms apart come in one page, not three."""
    before = await mark(store)
    async with aclosing(store.subscribe(before, idle=30, pace=0.5)) as pages:
        [[first]] = await store.append([StreamAppend(fresh_stream(), [started()])])
        assert positions(await next_page(pages)) == [first]
        later = []
        for _ in range(3):
            await asyncio.sleep(0.05)
            [[position]] = await store.append([StreamAppend(fresh_stream(), [started()])])
            later.append(position)
        assert positions(await next_page(pages)) == later


async def test_subscribe_yields_a_heartbeat_when_idle(store: EventStore) -> None:
    before = await mark(store)
    loop = asyncio.get_running_loop()
    async with aclosing(store.subscribe(before, idle=0.3)) as pages:
        start = loop.time()
        assert await next_page(pages) == []
        assert 0.25 <= loop.time() - start < 2
        [[position]] = await store.append([StreamAppend(fresh_stream(), [started()])])
        assert positions(await next_page(pages)) == [position]
        start = loop.time()
        assert await next_page(pages) == []  # idle counts from the last page
        assert 0.25 <= loop.time() - start < 2


async def test_subscribe_never_skips_an_append_that_commits_late(served: Backend) -> None:
    store = served.store
    before = await mark(store)
    async with aclosing(store.subscribe(before, idle=0.2)) as pages:
        async with served.append_held_open(fresh_stream()) as slow_position:
            later = asyncio.create_task(store.append([StreamAppend(fresh_stream(), [started()])]))
            await asyncio.sleep(0.3)
            # the later append waits for the open one; neither is readable yet
            assert await next_page(pages) == []
        [[later_position]] = await later
        seen: list[RecordedEvent] = []
        while len(seen) < 2:
            seen += await next_page(pages)
    assert positions(seen) == [slow_position, later_position]


async def test_subscribe_goes_on_after_losing_its_connections(served: Backend) -> None:
    dsn = served.dsn
    store = served.store
    before = await mark(store)
    loop = asyncio.get_running_loop()
    async with aclosing(store.subscribe(before, idle=2.0)) as pages:
        waiting = asyncio.create_task(anext(pages))
        await asyncio.sleep(0.3)  # listening, and the next heartbeat is 1.7 s away
        await drop_connections(dsn)
        assert await asyncio.wait_for(waiting, PATIENCE) == []  # a heartbeat, no error
        waiting = asyncio.create_task(anext(pages))
        # the pool may hand out a dropped connection once
        [position] = await append_once_it_answers(store, StreamAppend(fresh_stream(), [started()]))
        start = loop.time()
        page = await asyncio.wait_for(waiting, PATIENCE)
        woke_after = loop.time() - start
    assert positions(page) == [position]
    assert woke_after < 1.0  # before the next heartbeat's read: it listens again
