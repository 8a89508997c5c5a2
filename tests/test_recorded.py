"""What is recorded is what was sent, and when: the URL with its ``params`` query in events,
console failures and reports; each event's time is when it happened, not when its batch was
written. Real PostgreSQL, the demo shop, the real CLI."""

from __future__ import annotations

import asyncio
import json
import textwrap
from datetime import timedelta
from itertools import pairwise
from pathlib import Path

import asyncpg
import pytest

from events import types as ev
from events.postgres import PostgresEventStore
from events.store import NewEvent, StreamAppend
from events.writer import BatchingWriter
from tests.cli import baton

APPEND_LOCK = 7283540231093542001
"""The advisory lock every baton_append takes (schema.sql)."""


async def run(tmp_path: Path, flow: str) -> tuple[int, str, dict[str, object]]:
    path = tmp_path / "flow.yaml"
    path.write_text(textwrap.dedent(flow))
    # baton() runs an event loop of its own: keep it off the test's
    code, out, err = await asyncio.to_thread(
        baton, "run", str(path), "--json", str(tmp_path / "r.json")
    )
    return code, out + err, json.loads((tmp_path / "r.json").read_text())["runs"][0]


async def test_the_params_query_is_sent_with_the_inline_one_and_recorded_everywhere(
    env: dict[str, str], tmp_path: Path, pg_server_dsn: str
) -> None:
    code, out, report = await run(
        tmp_path,
        """
        name: params
        base_url: "{{ env.SHOP_URL }}"
        tests:
          search:
            request:
              url: /echo?q=shoes&page=1
              params: {page: 2, tag: [new, sale]}
            expect:
              json: {"$.query": {equals: {q: shoes, page: "2", tag: [new, sale]}}}
              status: 299
        """,
    )
    assert code == 1, out
    sent = f"{env['SHOP_URL']}/echo?q=shoes&page=2&tag=new&tag=sale"
    [test] = report["tests"]  # type: ignore[attr-defined]
    # the server saw the inline query and params together (httpx alone drops q=shoes)
    assert {a["subject"]: a["passed"] for a in test["assertions"]} == {
        "status": False,
        "json $.query": True,
    }
    assert test["exchange"]["url"] == sent
    assert f"request:  GET {sent}" in out
    store = await PostgresEventStore.connect(pg_server_dsn)
    try:
        events = await store.read_stream(ev.run_stream(str(report["run_id"])))
    finally:
        await store.aclose()
    assert [e.event.url for e in events if isinstance(e.event, ev.RequestSent)] == [sent]


async def test_each_event_has_the_time_it_happened(
    env: dict[str, str], tmp_path: Path, pg_server_dsn: str
) -> None:
    code, out, report = await run(
        tmp_path,
        """
        name: times
        base_url: "{{ env.SHOP_URL }}"
        tests:
          slow:
            request: {url: "/slow?ms=250"}
            expect: {status: 200}
        """,
    )
    assert code == 0, out
    store = await PostgresEventStore.connect(pg_server_dsn)
    try:
        events = await store.read_stream(ev.run_stream(str(report["run_id"])))
    finally:
        await store.aclose()
    at = {e.type: e.recorded_at for e in events}
    response = next(e.event for e in events if isinstance(e.event, ev.ResponseReceived))
    waited = at["ResponseReceived"] - at["RequestSent"]
    # the response's time is when it arrived: the request's plus the measured round trip
    assert waited >= timedelta(milliseconds=250)
    total = timedelta(milliseconds=response.timings.total_ms)
    assert abs(waited - total) < timedelta(milliseconds=20), (waited, total)
    order = ["RunStarted", "TestStarted", "RequestSent", "ResponseReceived", "TestPassed"]
    assert [at[name] for name in order] == sorted(at[name] for name in order)


async def test_events_written_in_one_batch_keep_the_times_they_were_emitted(
    pg_server_dsn: str,
) -> None:
    """The cause: recorded_at was now() of the append's transaction. Hold the appends back
    so that three events wait and go out in one batch, emitted 80 ms apart."""
    store = await PostgresEventStore.connect(pg_server_dsn)
    blocker = await asyncpg.connect(pg_server_dsn)
    writer = BatchingWriter(store)
    stream = ev.run_stream(str(ev.new_id()))
    try:
        async with blocker.transaction():
            await blocker.execute("SELECT pg_advisory_xact_lock($1)", APPEND_LOCK)
            writer.emit(stream, ev.TestStarted(test="first"))  # its append waits for the lock
            await asyncio.sleep(0.05)
            for name in ("a", "b", "c"):
                writer.emit(stream, ev.TestStarted(test=name))
                await asyncio.sleep(0.08)
        await writer.flush()
        events = await store.read_stream(stream)
        batches = await blocker.fetch(
            "SELECT xmin::text FROM events WHERE stream = $1 ORDER BY version", stream
        )
        # an explicit time, as the runner gives a response's arrival
        explicit = 1_700_000_000_123_456
        await store.append([StreamAppend(f"{stream}-x", [NewEvent(events[0].event, at=explicit)])])
        [stamped] = await store.read_stream(f"{stream}-x")
    finally:
        await writer.aclose()
        await blocker.close()
        await store.aclose()
    assert [e.event for e in events] == [
        ev.TestStarted(test=name) for name in ("first", "a", "b", "c")
    ]
    assert len({row[0] for row in batches[1:]}) == 1, "a, b and c went out in one append"
    gaps = [later.recorded_at - earlier.recorded_at for earlier, later in pairwise(events[1:])]
    assert all(timedelta(milliseconds=75) <= gap < timedelta(milliseconds=200) for gap in gaps)
    assert stamped.recorded_at.timestamp() * 1_000_000 == pytest.approx(explicit, abs=1)


def test_a_url_that_cannot_be_sent_fails_the_test_without_a_traceback(
    env: dict[str, str], tmp_path: Path
) -> None:
    flow = tmp_path / "bad-url.yaml"
    flow.write_text(
        "name: bad url\nvariables: {port: abc}\n"
        'tests:\n  t:\n    request: {url: "http://127.0.0.1:{{ port }}/x"}\n'
    )
    code, out, err = baton("run", str(flow), "--json", str(tmp_path / "r.json"))
    assert code == 1, out + err
    assert "Traceback" not in out + err
    [test] = json.loads((tmp_path / "r.json").read_text())["runs"][0]["tests"]
    assert test["category"] == "connection"
    assert test["message"].startswith("cannot send to http://127.0.0.1:abc/x: the URL is not valid")
