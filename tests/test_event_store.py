"""The EventStore contract, on the PostgreSQL server and on the embedded default alike."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from msgspec.structs import replace

from events import Settings, mask_dsn, open_store
from events.postgres import PostgresEventStore, apply_schema, schema_sql
from events.settings import SettingsError
from events.store import (
    ANY_VERSION,
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
    ResponseReceived,
    RunStarted,
    TestPassed,
    TestStarted,
    Timings,
    VariableCaptured,
)

REPO = Path(__file__).resolve().parent.parent


def fresh_stream(kind: str = "run") -> str:
    return f"{kind}-{uuid.uuid4()}"


def started(test: str = "login") -> NewEvent:
    return NewEvent(TestStarted(test=test))


async def head(store: PostgresEventStore) -> int:
    """The newest position: appended by this test, so later reads start right after it."""
    [[position]] = await store.append([StreamAppend(fresh_stream("mark"), [started()])])
    return position


async def test_round_trip_keeps_every_field(store: PostgresEventStore) -> None:
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
    [positions] = await store.append([StreamAppend(stream, new, expected_version=0)])

    assert positions == sorted(positions) and len(set(positions)) == len(events)
    recorded = await store.read_stream(stream)
    assert [r.version for r in recorded] == [1, 2, 3, 4, 5]
    assert [r.position for r in recorded] == positions
    assert [r.id for r in recorded] == [n.id for n in new]
    assert {r.stream for r in recorded} == {stream}
    assert [r.type for r in recorded] == [type(e).__name__ for e in events]
    # jsonb cannot hold U+0000: the store keeps the event, with U+FFFD in its place
    nul_replaced = replace(events[1], body_excerpt='{"token": "x"}\ufffd after a NUL byte')
    assert [r.event for r in recorded] == [events[0], nul_replaced, *events[2:]]
    for r in recorded:
        assert before - timedelta(seconds=5) <= r.recorded_at <= datetime.now(UTC)

    by_position = await store.read_all(after_position=positions[0] - 1, limit=len(events))
    assert by_position == recorded
    assert await store.read_stream(stream, after_version=3) == recorded[3:]
    assert await store.stream_version(stream) == 5
    assert await store.stream_version(fresh_stream()) == 0


async def test_a_stream_is_read_in_pages_and_as_of_a_log_position(
    store: PostgresEventStore,
) -> None:
    stream, other = fresh_stream(), fresh_stream()
    positions: list[int] = []
    for test in ("a", "b", "c", "d"):  # interleaved with another stream's events
        [[position]], _ = await asyncio.gather(
            store.append([StreamAppend(stream, [started(test)])]),
            store.append([StreamAppend(other, [started(test)])]),
        )
        positions.append(position)
    recorded = await store.read_stream(stream)

    assert await store.read_stream(stream, limit=2) == recorded[:2]
    assert await store.read_stream(stream, after_position=positions[1], limit=1) == recorded[2:3]
    assert (
        await store.read_stream(stream, 1, through_position=positions[2], limit=5)
        == (recorded[1:3])
    )
    assert await store.stream_version(stream, through_position=positions[0] - 1) == 0
    assert await store.stream_version(stream, through_position=positions[2]) == 3
    assert await store.stream_version(stream, through_position=positions[3] + 100) == 4


async def test_list_streams_newest_first(store: PostgresEventStore) -> None:
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


async def test_wrong_expected_version_names_the_actual_version(
    store: PostgresEventStore,
) -> None:
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


@pytest.mark.parametrize("existing", [0, 3])
async def test_concurrent_appends_with_one_expected_version_one_wins(
    store: PostgresEventStore, existing: int
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


async def test_resending_event_ids_returns_the_original_positions(
    store: PostgresEventStore,
) -> None:
    stream, other = fresh_stream(), fresh_stream()
    batch = [
        StreamAppend(stream, [started("a"), started("b")], expected_version=0),
        StreamAppend(other, [started("c")], expected_version=0),
    ]
    first = await store.append(batch)

    assert await store.append(batch) == first  # the same call again, as after a lost reply
    resent_any = [StreamAppend(stream, batch[0].events, ANY_VERSION)]
    assert await store.append(resent_any) == [first[0]]
    assert [r.position for r in await store.read_stream(stream)] == first[0]
    assert await store.stream_version(stream) == 2
    assert await store.stream_version(other) == 1

    # new events after the re-sends continue the stream where it was
    [[position]] = await store.append([StreamAppend(stream, [started("d")], 2)])
    assert position > max(first[1])


async def test_mixing_stored_and_new_event_ids_is_refused(store: PostgresEventStore) -> None:
    stream = fresh_stream()
    stored, repeated = started("a"), started("c")
    await store.append([StreamAppend(stream, [stored])])
    for events in ([stored, started("b")], [repeated, repeated]):
        with pytest.raises(StoreError) as caught:
            await store.append([StreamAppend(stream, events, ANY_VERSION)])
        assert not isinstance(caught.value, WrongExpectedVersion)
    assert await store.stream_version(stream) == 1


async def test_append_to_several_streams_is_all_or_nothing(store: PostgresEventStore) -> None:
    fresh, busy = fresh_stream(), fresh_stream()
    await store.append([StreamAppend(busy, [started()])])
    mark = await head(store)

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
    assert await store.read_all(after_position=mark) == []

    both = await store.append(
        [
            StreamAppend(fresh, [started("a"), started("b")], expected_version=0),
            StreamAppend(busy, [started("c")], expected_version=1),
            StreamAppend(fresh, [started("d")], expected_version=2),
        ]
    )
    assert [len(p) for p in both] == [2, 1, 1]
    flat = [p for positions in both for p in positions]
    assert flat == sorted(flat)
    assert [r.version for r in await store.read_stream(fresh)] == [1, 2, 3]


async def test_reader_never_skips_an_append_that_commits_late(
    store: PostgresEventStore, store_dsn: str
) -> None:
    mark = await head(store)
    slow_stream = fresh_stream()
    later_streams = [fresh_stream(), fresh_stream()]
    slow = await asyncpg.connect(store_dsn)
    try:
        transaction = slow.transaction()
        await transaction.start()
        # an append that has drawn its position but not committed yet
        [slow_position] = await slow.fetchval(
            "SELECT baton_append($1, $2, $3, $4, $5, $6::text[]::jsonb[])",
            [slow_stream],
            [0],
            [1],
            [uuid.uuid4()],
            ["TestStarted"],
            ['{"type": "TestStarted", "test": "slow"}'],
        )
        later = [
            asyncio.create_task(store.append([StreamAppend(s, [started("later")])]))
            for s in later_streams
        ]
        await asyncio.sleep(0.3)
        # a reader polling by position sees nothing past the open append...
        assert await store.read_all(after_position=mark) == []
        # ...because appends commit in position order: the later ones wait for it
        assert not any(task.done() for task in later)
        await transaction.commit()
    finally:
        await slow.close()
    later_positions = [positions[0][0] for positions in await asyncio.gather(*later)]

    seen = await store.read_all(after_position=mark)
    assert [r.stream for r in seen[:1]] == [slow_stream]
    assert [r.position for r in seen] == [slow_position, *sorted(later_positions)]
    assert sorted(r.stream for r in seen[1:]) == sorted(later_streams)


async def test_schema_applies_twice_without_change(
    store: PostgresEventStore, store_dsn: str
) -> None:
    stream = fresh_stream()
    await store.append([StreamAppend(stream, [started()])])
    conn = await asyncpg.connect(store_dsn)
    try:
        before = await conn.fetch("SELECT step, name, applied_at FROM baton_schema_version")
        await apply_schema(conn)
        await conn.execute(schema_sql())  # as psql -f would: no lock, no transaction
        after = await conn.fetch("SELECT step, name, applied_at FROM baton_schema_version")
    finally:
        await conn.close()
    assert [tuple(r) for r in after] == [tuple(r) for r in before]
    assert (after[0]["step"], after[0]["name"]) == (1, "event store")
    assert "-- step 1: event store" in schema_sql()
    assert await store.stream_version(stream) == 1
    # processes starting together all apply the schema at once, without tripping over it
    stores = await asyncio.gather(*(PostgresEventStore.connect(store_dsn) for _ in range(4)))
    for opened in stores:
        await opened.aclose()


async def test_unreachable_server_is_store_unavailable_without_password() -> None:
    dsn = "postgresql://baton:s3cret-pw@127.0.0.1:1/baton"
    for attempt in (
        PostgresEventStore.connect(dsn),
        open_store(Settings(database_url=dsn)),
    ):
        with pytest.raises(StoreUnavailable) as caught:
            await attempt
        message = str(caught.value)
        assert "s3cret-pw" not in message
        assert "postgresql://baton:***@127.0.0.1:1/baton" in message


async def test_open_store_without_database_url_uses_the_embedded_server(
    embedded_home: Path, embedded_dsn: str
) -> None:
    stream = fresh_stream()
    opened = await open_store(Settings(home=embedded_home))  # joins the running server
    await opened.append([StreamAppend(stream, [started()])])
    await opened.aclose()
    other = await PostgresEventStore.connect(embedded_dsn)
    assert await other.stream_version(stream) == 1
    await other.aclose()
    assert opened.dsn == embedded_dsn


def test_embedded_server_is_quiet_and_stops_with_the_last_process(
    fresh_baton_home: Path,
) -> None:
    script = textwrap.dedent(
        """
        import asyncio, os, signal, sys
        from events import Settings, StreamAppend, NewEvent, open_store
        from events.types import TestStarted

        async def main():
            store = await open_store(Settings.from_env())
            await store.append([StreamAppend("run-1", [NewEvent(TestStarted(test="t"))])])
            print(await store.stream_version("run-1"), flush=True)
            if sys.argv[1:] == ["crash"]:
                os.kill(os.getpid(), signal.SIGKILL)
            await store.aclose()

        asyncio.run(main())
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATON_", "XDG_"))}
    env |= {"BATON_HOME": str(fresh_baton_home), "PYTHONPATH": str(REPO)}
    running = fresh_baton_home / "pgdata" / "postmaster.pid"
    # initdb on first use; a crash that skips the exit handlers; a start of the existing data
    for version, how in enumerate(["first", "crash", "again"], start=1):
        done = subprocess.run(
            [sys.executable, "-c", script, how], env=env, capture_output=True, text=True, timeout=60
        )
        assert (done.returncode, done.stderr) == (-9 if how == "crash" else 0, "")
        assert done.stdout.split() == [str(version)]
        # the server stops with the last process using it, even after an earlier crash
        assert running.exists() == (how == "crash")


async def test_embedded_start_failure_is_store_unavailable(fresh_baton_home: Path) -> None:
    from events.embedded import start_embedded

    (fresh_baton_home / "pgdata").mkdir()
    (fresh_baton_home / "pgdata" / "not-a-cluster.txt").write_text("left by someone else")
    with pytest.raises(StoreUnavailable) as caught:
        await start_embedded(fresh_baton_home)
    message = str(caught.value)
    assert "could not start the embedded PostgreSQL" in message
    assert "not empty" in message
    assert "BATON_DATABASE_URL" in message


def test_settings_from_env() -> None:
    env = {"BATON_DATABASE_URL": "postgresql://u:pw@db:5432/baton", "BATON_REDIS_URL": ""}
    env |= {"BATON_HOME": "state", "BATON_SECRET_KEY": "k3y"}
    settings = Settings.from_env(env, cwd=Path("/srv/app"))
    assert settings.database_url == "postgresql://u:pw@db:5432/baton"
    assert settings.redis_url is None
    assert settings.home == Path("/srv/app/state")
    assert settings.pgdata == Path("/srv/app/state/pgdata")
    assert "pw" not in repr(settings) and "k3y" not in repr(settings)
    assert Settings.from_env({}, cwd=Path("/w")).home == Path("/w/.baton")
    with pytest.raises(AttributeError):
        settings.home = Path("/elsewhere")  # type: ignore[misc]


def test_the_store_wait_and_the_owner_timeout_are_seconds_the_owner_s_the_longer() -> None:
    defaults = Settings.from_env({})
    assert (defaults.store_wait, defaults.owner_timeout) == (60.0, 90.0)
    chosen = Settings.from_env({"BATON_STORE_WAIT": "5", "BATON_OWNER_TIMEOUT": "7.5"})
    assert (chosen.store_wait, chosen.owner_timeout) == (5.0, 7.5)
    for value in ("soon", "0", "-3", "inf"):
        with pytest.raises(SettingsError, match=r"BATON_STORE_WAIT=.*a number of seconds"):
            Settings.from_env({"BATON_STORE_WAIT": value})
    with pytest.raises(SettingsError, match=r"BATON_OWNER_TIMEOUT \(60 s\) must be longer"):
        Settings.from_env({"BATON_OWNER_TIMEOUT": "60"})


def test_a_bad_setting_is_one_line_and_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.cli import baton

    monkeypatch.setenv("BATON_STORE_WAIT", "a minute")
    code, _, err = baton("runs")
    assert code == 2
    assert (
        err == "error: BATON_STORE_WAIT='a minute': expected a number of seconds above 0, like 60\n"
    )


@pytest.mark.parametrize(
    ("dsn", "masked"),
    [
        ("postgresql://u:pw@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("postgresql://u:pa/ss#x@h/db", "postgresql://u:***@h/db"),
        (
            "postgresql://u:p@ss@h/db?application_name=a@b",
            "postgresql://u:***@h/db?application_name=a@b",
        ),
        ("redis://:pw@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("pg://u@h/d?password=pw&ssl=1", "pg://u@h/d?password=***&ssl=1"),
        ("host=h user=u password=pw dbname=d", "host=h user=u password=*** dbname=d"),
    ],
)
def test_mask_dsn_hides_the_password(dsn: str, masked: str) -> None:
    assert mask_dsn(dsn) == masked
