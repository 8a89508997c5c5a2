"""Supabase Realtime: the watch adapter against a local Phoenix-protocol server (Supabase's
own server cannot run here; see tests/phoenix_server.py), and schema.sql's step that adds
the run and result tables to the supabase_realtime publication."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from context_service.supabase import SupabaseWatchError, format_change, watch_supabase
from events.migrations import migrate, schema_sql
from tests.phoenix_server import PhoenixServer

KEY = "test-service-role-key-5f3a"
RUN = "0190a5b2-7c1d-7e3f-8a9b-0c1d2e3f4a5b"
OTHER_RUN = "0190a5b2-7c1d-7e3f-8a9b-ffffffffffff"


def run_row(run_id: str = RUN, status: str = "running", **columns: Any) -> dict[str, Any]:
    row = {
        "id": run_id,
        "organization_id": "433e9607-96fe-50a2-bd23-f3af13ad64a0",
        "stream": f"run-{run_id}",
        "status": status,
        "total_tests": 3,
        "passed_tests": 0,
        "failed_tests": 0,
        "skipped_tests": 0,
        "duration_ms": None,
        "cancel_reason": None,
        "started_at": "2025-05-01T10:00:00+00:00",
        "ended_at": None,
    }
    return {**row, **columns}


def result_row(
    name: str, run_id: str = RUN, status: str = "pending", **columns: Any
) -> dict[str, Any]:
    row = {
        "id": str(uuid.uuid5(uuid.UUID(run_id), name)),
        "run_id": run_id,
        "test_name": name,
        "status": status,
        "attempts": 0,
        "requests": 0,
        "duration_ms": None,
        "response_status": None,
        "category": None,
        "message": "",
        "started_at": None,
        "ended_at": None,
    }
    return {**row, **columns}


def result_id(name: str, run_id: str = RUN) -> str:
    return str(uuid.uuid5(uuid.UUID(run_id), name))


def seen(changes: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [
        (c["test_name"] if c["kind"] == "result" else c["kind"], c.get("status") or c["event"])
        for c in changes
    ]


@pytest.fixture
async def server() -> AsyncIterator[PhoenixServer]:
    async with PhoenixServer(KEY) as running:
        for name in ("login", "catalog", "checkout"):
            running.tables["test_results"][result_id(name)] = result_row(name)
        running.tables["test_runs"][RUN] = run_row()
        yield running


class Watch:
    """watch_supabase in a task, its changes in a list."""

    def __init__(self, server: PhoenixServer, run_id: str = RUN, **options: Any) -> None:
        self.changes: list[dict[str, Any]] = []
        self.stop = asyncio.Event()
        self._arrived = asyncio.Event()
        self._run_id = run_id
        self._server = server
        options.setdefault("timeout_s", 2.0)
        self.task = asyncio.create_task(
            watch_supabase(
                server.url, options.pop("key", KEY), run_id, self._collect,
                stop=self.stop, **options,
            )
        )  # fmt: skip

    def _collect(self, change: dict[str, Any]) -> None:
        self.changes.append(change)
        self._arrived.set()

    async def ready(self, reads: int = 2) -> None:
        """Until the watch has subscribed, read the run (``reads`` REST requests in all) and
        handed on what it read."""
        server = self._server
        waiter = asyncio.create_task(server.wait_until(lambda: len(server.rest_requests) >= reads))
        await asyncio.wait({waiter, self.task}, return_when=asyncio.FIRST_COMPLETED)
        if self.task.done():
            waiter.cancel()
            self.task.result()  # its error, if it failed
        await waiter
        await self.settled()

    async def settled(self) -> None:
        """Until all the server sent so far has reached the callback: a broadcast sent now
        arrives after it on the same socket, and the watch hands it on after its reads."""
        marker = f"settled-{uuid.uuid4()}"
        await self._server.broadcast(f"run:{self._run_id}", marker, {})
        async with asyncio.timeout(5):
            while not any(change.get("event") == marker for change in self.changes):
                self._arrived.clear()
                await self._arrived.wait()
        self.changes[:] = [change for change in self.changes if change.get("event") != marker]

    async def ended(self) -> None:
        await asyncio.wait_for(self.task, 5)


async def test_joins_the_runs_topic_with_filters_on_both_tables_and_reads_the_run(
    server: PhoenixServer,
) -> None:
    watch = Watch(server)
    await watch.ready()
    [join] = server.joins()
    assert join["topic"] == f"realtime:run:{RUN}"
    config = join["payload"]["config"]
    assert config["postgres_changes"] == [
        {"event": "*", "schema": "public", "table": "test_runs", "filter": f"id=eq.{RUN}"},
        {"event": "*", "schema": "public", "table": "test_results", "filter": f"run_id=eq.{RUN}"},
    ]
    assert join["payload"]["access_token"] == KEY
    reads = server.rest_requests
    assert [(table, query.get("id") or query.get("run_id")) for table, query in reads] == [
        ("test_runs", f"eq.{RUN}"),
        ("test_results", f"eq.{RUN}"),
    ]
    # what the run looked like when the watch began: the run, then its tests
    assert seen(watch.changes) == [
        ("run", "running"),
        ("catalog", "pending"),
        ("checkout", "pending"),
        ("login", "pending"),
    ]
    assert all(change["source"] == "snapshot" for change in watch.changes)
    watch.stop.set()
    await watch.ended()


async def test_changes_arrive_in_order_and_the_runs_final_update_ends_the_watch(
    server: PhoenixServer,
) -> None:
    watch = Watch(server)
    await watch.ready()
    del watch.changes[:]
    await server.update("test_results", result_id("login"), status="running", attempts=1)
    await server.update(
        "test_results", result_id("login"), status="passed", duration_ms=120.5,
        ended_at="2025-05-01T10:00:01+00:00",
    )  # fmt: skip
    # another run's rows: the filters the watch asked for keep them away
    await server.insert("test_runs", run_row(OTHER_RUN))
    await server.insert("test_results", result_row("login", OTHER_RUN, status="failed"))
    await server.update(
        "test_results", result_id("catalog"), status="failed", duration_ms=30.0,
        category="assertion", message="status: expected 200, got 500",
        ended_at="2025-05-01T10:00:02+00:00",
    )  # fmt: skip
    # the projector's last transaction: the run's row first, then the last result
    await server.update(
        "test_runs", RUN, status="failed", passed_tests=1, failed_tests=1, skipped_tests=1,
        duration_ms=2150.0, ended_at="2025-05-01T10:00:03+00:00",
    )  # fmt: skip
    await server.update(
        "test_results", result_id("checkout"), status="skipped", category="dependency_skipped",
        message="needs catalog, which failed", ended_at="2025-05-01T10:00:02+00:00",
    )  # fmt: skip
    await watch.ended()
    assert seen(watch.changes) == [
        ("login", "running"),
        ("login", "passed"),
        ("catalog", "failed"),
        ("checkout", "skipped"),
        ("run", "failed"),
    ]
    assert [c["source"] for c in watch.changes[:3]] == ["UPDATE"] * 3
    assert watch.changes[1]["duration_ms"] == 120.5
    assert watch.changes[2]["message"] == "status: expected 200, got 500"
    assert watch.changes[-1]["final"] and watch.changes[-1]["failed_tests"] == 1
    assert all(change["run_id"] == RUN for change in watch.changes)


async def test_a_run_that_ended_already_is_reported_at_once(server: PhoenixServer) -> None:
    server.tables["test_runs"][RUN] = run_row(status="passed", passed_tests=3, duration_ms=900)
    for name, ended in (("checkout", "10:00:03"), ("login", "10:00:01"), ("catalog", "10:00:02")):
        server.tables["test_results"][result_id(name)] = result_row(
            name, status="passed", duration_ms=100.0, ended_at=f"2025-05-01T{ended}+00:00"
        )
    watch = Watch(server)
    await watch.ended()
    assert seen(watch.changes) == [
        ("login", "passed"),
        ("catalog", "passed"),
        ("checkout", "passed"),
        ("run", "passed"),
    ]


async def test_a_run_not_projected_yet_is_followed_from_its_insert(
    server: PhoenixServer,
) -> None:
    server.tables["test_runs"].clear()
    server.tables["test_results"].clear()
    watch = Watch(server)
    await watch.ready()
    assert watch.changes == []
    await server.insert("test_runs", run_row(total_tests=1))
    await server.insert("test_results", result_row("login"))
    await server.update("test_runs", RUN, status="passed", passed_tests=1, duration_ms=50.0)
    await server.update(
        "test_results", result_id("login"), status="passed", ended_at="2025-05-01T10:00:01Z"
    )
    await watch.ended()
    assert seen(watch.changes) == [
        ("run", "running"),
        ("login", "pending"),
        ("login", "passed"),
        ("run", "passed"),
    ]
    assert watch.changes[0]["source"] == "INSERT"


async def test_a_run_that_never_appears_is_an_error(server: PhoenixServer) -> None:
    watch = Watch(server, str(uuid.uuid4()), timeout_s=0.3)
    with pytest.raises(SupabaseWatchError, match="not found") as caught:
        await watch.ended()
    assert server.url in str(caught.value)


async def test_repeated_and_older_changes_are_not_shown_twice(server: PhoenixServer) -> None:
    server.tables["test_results"][result_id("login")] = result_row(
        "login", status="passed", ended_at="2025-05-01T10:00:01Z"
    )
    watch = Watch(server)
    await watch.ready()
    del watch.changes[:]
    # as a replay of what the read already showed would: the same row, then an older one
    await server.update("test_results", result_id("login"))
    await server.update("test_results", result_id("login"), status="running", ended_at=None)
    await server.update("test_results", result_id("catalog"), status="running")
    await server.update("test_results", result_id("catalog"), status="running")
    await watch.settled()
    assert seen(watch.changes) == [("catalog", "running")]
    watch.stop.set()
    await watch.ended()


# The realtime client reads ConnectionClosed.code and .reason, which websockets 15
# deprecates. Ignored (the default outside tests), the client reports the lost connection;
# as errors (this suite's setting), its listening task dies, and the watch must notice that
# too.
@pytest.mark.parametrize(
    "warning",
    [
        pytest.param(
            "ignored",
            marks=pytest.mark.filterwarnings(
                r"ignore:ConnectionClosed\.(code|reason) is deprecated:DeprecationWarning"
            ),
        ),
        "an error",
    ],
)
async def test_a_change_made_while_the_connection_was_down_is_still_seen(
    server: PhoenixServer, warning: str
) -> None:
    watch = Watch(server, backoff=0.05)
    await watch.ready()
    del watch.changes[:]
    server.joins_open.clear()  # the watch cannot subscribe again until the change is made
    await server.drop_connections()
    await server.update(
        "test_results", result_id("login"), status="passed", ended_at="2025-05-01T10:00:01Z"
    )
    server.joins_open.set()
    await watch.ready(reads=4)
    assert len(server.joins()) == 2
    assert seen(watch.changes) == [("login", "passed")]
    assert watch.changes[0]["source"] == "snapshot"
    await server.update("test_runs", RUN, status="cancelled", cancel_reason="stopped by alice")
    await watch.ended()
    assert seen(watch.changes)[-1] == ("run", "cancelled")


async def test_broadcasts_on_the_runs_channel_reach_the_caller(server: PhoenixServer) -> None:
    watch = Watch(server)
    await watch.ready()
    await server.broadcast(f"run:{RUN}", "flaky_test_detected", {"test": "login"})
    await server.broadcast("run:someone-else", "flaky_test_detected", {"test": "other"})
    await server.update("test_runs", RUN, status="error")
    await watch.ended()
    [broadcast] = [c for c in watch.changes if c["kind"] == "broadcast"]
    assert (broadcast["event"], broadcast["payload"]) == ("flaky_test_detected", {"test": "login"})


async def test_a_wrong_key_is_a_clear_error_that_does_not_show_the_key(
    server: PhoenixServer,
) -> None:
    watch = Watch(server, key="wrong-secret-key-0042")
    with pytest.raises(SupabaseWatchError) as caught:
        await watch.ended()
    message = str(caught.value)
    assert server.url in message
    assert "refused the API key (HTTP 401)" in message
    assert "wrong-secret-key-0042" not in message


async def test_a_refused_join_is_a_clear_error(server: PhoenixServer) -> None:
    server.refuse_joins = "Unauthorized: You do not have permissions to read from this topic"
    watch = Watch(server)
    with pytest.raises(SupabaseWatchError, match="You do not have permissions") as caught:
        await watch.ended()
    assert server.url in str(caught.value)
    assert KEY not in str(caught.value)


async def test_a_table_realtime_cannot_follow_is_a_clear_error(server: PhoenixServer) -> None:
    server.postgres_error = (
        "Unable to subscribe to changes with given parameters. "
        "Please check Realtime is enabled for the given connect parameters"
    )
    with pytest.raises(SupabaseWatchError, match="check Realtime is enabled"):
        await Watch(server).ended()


async def test_a_join_without_answer_times_out(server: PhoenixServer) -> None:
    server.joins_open.clear()
    with pytest.raises(SupabaseWatchError, match="did not answer the join in time"):
        await Watch(server, timeout_s=0.3).ended()


async def test_no_server_at_the_url_is_a_clear_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(SupabaseWatchError, match="cannot connect") as caught:
        await watch_supabase(url, KEY, RUN, lambda change: None, timeout_s=2.0)
    assert url in str(caught.value)


async def test_a_server_that_goes_away_ends_the_watch_with_a_clear_error(
    server: PhoenixServer,
) -> None:
    watch = Watch(server, reconnects=2, backoff=0.05)
    await watch.ready()
    await server.stop()
    with pytest.raises(SupabaseWatchError, match="lost the connection") as caught:
        await watch.ended()
    assert server.url in str(caught.value)
    assert KEY not in str(caught.value)


async def test_stop_ends_the_watch_even_while_it_waits_to_reconnect(
    server: PhoenixServer,
) -> None:
    watch = Watch(server, reconnects=5, backoff=30.0)
    await watch.ready()
    await server.stop()
    await asyncio.sleep(0.2)  # the first reconnect failed: the next one is 30 s away
    assert not watch.task.done()
    watch.stop.set()
    await asyncio.wait_for(watch.task, 1)


async def test_a_run_id_that_is_not_a_uuid_is_refused_before_connecting() -> None:
    with pytest.raises(ValueError):
        await watch_supabase("http://127.0.0.1:1", KEY, "x,status=eq.passed", print)


def test_format_change_gives_one_line_per_change() -> None:
    results = [
        result_row("login", status="passed", duration_ms=120.4),
        result_row("catalog", status="failed", duration_ms=1530.0, category="assertion",
                   message="status: expected 200, got 500\nbody: ...", attempts=2),
        result_row("checkout", status="running", attempts=1),
    ]  # fmt: skip
    lines = [
        format_change({**row, "kind": "result", "source": "UPDATE", "at": None}) for row in results
    ]
    assert lines == [
        "test login passed in 120 ms",
        "test catalog failed in 1.53 s (attempt 2) [assertion]: status: expected 200, got 500",
        "test checkout running",
    ]
    run = run_row(status="failed", passed_tests=1, failed_tests=1, skipped_tests=1)
    line = format_change({**run, "kind": "run", "run_id": RUN, "final": True, "duration_ms": 2150})
    assert line == f"run {RUN} failed: 1 passed, 1 failed, 1 skipped of 3 in 2.15 s"
    broadcast = {"kind": "broadcast", "event": "flaky_test_detected", "payload": {"test": "a"}}
    assert format_change(broadcast) == 'broadcast flaky_test_detected: {"test": "a"}'


# ---- schema.sql: the supabase_realtime publication -----------------------------------------


async def published(conn: asyncpg.Connection) -> list[str]:
    rows = await conn.fetch(
        "SELECT tablename FROM pg_publication_tables WHERE pubname = 'supabase_realtime'"
        " ORDER BY tablename"
    )
    return [row[0] for row in rows]


async def test_without_the_publication_the_step_does_nothing(fresh_database_dsn: str) -> None:
    await migrate(fresh_database_dsn)
    conn = await asyncpg.connect(fresh_database_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM pg_publication") == 0
        assert await conn.fetchval("SELECT max(step) FROM baton_schema_version") >= 5
    finally:
        await conn.close()


async def test_on_supabase_the_run_and_result_tables_are_published(
    fresh_database_dsn: str,
) -> None:
    conn = await asyncpg.connect(fresh_database_dsn)
    try:
        await conn.execute("SET client_min_messages = error")  # wal_level is not logical here
        await conn.execute("CREATE PUBLICATION supabase_realtime")
        await migrate(fresh_database_dsn)
        assert await published(conn) == ["test_results", "test_runs"]
        # the whole file again, as psql -f would: nothing changes, nothing fails
        await conn.execute(schema_sql())
        assert await published(conn) == ["test_results", "test_runs"]
    finally:
        await conn.close()


async def test_a_publication_made_after_the_migration_is_filled_by_calling_the_function(
    fresh_database_dsn: str,
) -> None:
    await migrate(fresh_database_dsn)
    conn = await asyncpg.connect(fresh_database_dsn)
    try:
        await conn.execute("SET client_min_messages = error")
        await conn.execute("CREATE PUBLICATION supabase_realtime FOR TABLE test_runs")
        added = await conn.fetchval("SELECT baton_publish_to_supabase_realtime()")
        assert added == ["test_results"]
        assert await published(conn) == ["test_results", "test_runs"]
        assert await conn.fetchval("SELECT baton_publish_to_supabase_realtime()") == []
    finally:
        await conn.close()


async def test_a_publication_for_all_tables_is_left_as_it_is(fresh_database_dsn: str) -> None:
    conn = await asyncpg.connect(fresh_database_dsn)
    try:
        await conn.execute("SET client_min_messages = error")
        await conn.execute("CREATE PUBLICATION supabase_realtime FOR ALL TABLES")
        await migrate(fresh_database_dsn)
        assert {"test_runs", "test_results"} <= set(await published(conn))
    finally:
        await conn.close()
