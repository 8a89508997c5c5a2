"""Live streams: SSE and WebSocket subscribers that join mid-run, drop and reconnect, or watch
through another instance than the one running the run get every event after their position
once, in order (compared with the run's log); projects' streams; 404 across organizations."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from context_service.keys import create_key
from context_service.watch import SseMessage, sse_messages, watch_stream
from events import types as ev
from events.postgres import PostgresEventStore
from events.store import NewEvent, StreamAppend
from examples.shop.server import serve as serve_shop
from tests.conftest import LiveService

pytestmark = pytest.mark.timeout(60)

SLOW_CHAIN = """
name: slow chain
base_url: "{{ env.SHOP_URL }}"
tests:
  login:
    request:
      method: POST
      url: /auth/login
      json: {username: alice, password: "{{ secrets.SHOP_PASSWORD }}"}
    expect: {status: 200}
    capture: {auth.token: {json: "$.access_token"}}
""" + "".join(
    f"""
  step{i}:
    depends_on: [{"login" if i == 1 else f"step{i - 1}"}]
    request: {{url: "/slow?ms=120"}}
"""
    for i in range(1, 9)
)


class Org:
    def __init__(self, key: str, org_id: uuid.UUID, *services: LiveService) -> None:
        self.key = key
        self.id = org_id
        self.http = [service.client(key) for service in services]

    async def ok(self, method: str, url: str, status: int = 200, **kwargs: Any) -> Any:
        response = await self.http[0].request(method, url, **kwargs)
        assert response.status_code == status, response.text
        return response.json()

    async def aclose(self) -> None:
        for http in self.http:
            await http.aclose()


@pytest.fixture(scope="module")
def second_service(live_service: LiveService) -> Iterator[LiveService]:
    service = LiveService(live_service.settings)  # another instance on the same database
    service.start()
    yield service
    service.stop()


@pytest.fixture(scope="module")
async def store(live_service: LiveService) -> AsyncIterator[PostgresEventStore]:
    yield (opened := await PostgresEventStore.connect(str(live_service.settings.database_url)))
    await opened.aclose()


async def _org(slug: str, store: PostgresEventStore, *services: LiveService) -> Org:
    scopes = ["read", "run", "admin"]
    key = await create_key(services[0].settings, organization=slug, scopes=scopes, name="t")
    org_id = await store.pool.fetchval("SELECT id FROM organizations WHERE slug = $1", slug)
    return Org(key, org_id, *services)


@pytest.fixture(scope="module")
async def acme(
    store: PostgresEventStore, live_service: LiveService, second_service: LiveService
) -> AsyncIterator[Org]:
    yield (org := await _org("acme", store, live_service, second_service))
    await org.aclose()


@pytest.fixture(scope="module")
async def globex(
    store: PostgresEventStore, live_service: LiveService, second_service: LiveService
) -> AsyncIterator[Org]:
    yield (org := await _org("globex", store, live_service, second_service))
    await org.aclose()


@pytest.fixture(scope="module")
async def shop_url() -> AsyncIterator[str]:
    runner, url = await serve_shop("127.0.0.1", 0)
    yield url
    await runner.cleanup()


async def _log(store: PostgresEventStore, run_id: str) -> list[ev.RecordedEvent]:
    return await store.read_stream(ev.run_stream(run_id))


async def _sse(
    http: httpx.AsyncClient, url: str, *, last_id: int | None = None, count: int | None = None
) -> list[SseMessage]:
    """The messages of a stream until the service ends it, or the first ``count``."""
    headers = {"Last-Event-ID": str(last_id)} if last_id is not None else {}
    got: list[SseMessage] = []
    async with http.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        async for message in sse_messages(response.aiter_lines()):
            got.append(message)
            if len(got) == count:
                break
    return got


def _positions(messages: list[SseMessage]) -> list[int]:
    return [int(m.id or 0) for m in messages]


def _check_exactly(received: list[int], log: list[ev.RecordedEvent], after: int) -> None:
    """No gap, no duplicate, in order: what came is the log after ``after``."""
    assert received == [r.position for r in log if r.position > after]


async def _start_run(org: Org, shop_url: str) -> str:
    project = await org.ok("POST", "/api/v1/projects", 201, json={"name": f"p-{uuid.uuid4()}"})
    variables: list[dict[str, Any]] = [{"name": "SHOP_URL", "value": shop_url}]
    variables.append({"name": "SHOP_PASSWORD", "value": "secret-alice", "secret": True})
    ids = {"project_id": project["id"]}
    env = {**ids, "name": "local", "variables": variables}
    env = await org.ok("POST", "/api/v1/environments", 201, json=env)
    suite = await org.ok("POST", "/api/v1/suites", 201, json={**ids, "content": SLOW_CHAIN})
    run = {"suite_id": suite["id"], "environment_id": env["id"]}
    return str((await org.ok("POST", "/api/v1/runs", 202, json=run))["id"])


async def _until(check: Callable[[], Any]) -> Any:
    deadline = asyncio.get_running_loop().time() + 15
    while not (found := await check()):
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)
    return found


async def test_a_subscriber_joining_mid_run_gets_exactly_the_remaining_events(
    acme: Org, shop_url: str, store: PostgresEventStore
) -> None:
    run_id = await _start_run(acme, shop_url)

    async def some_passed() -> list[ev.RecordedEvent] | None:
        log = await _log(store, run_id)
        return log if sum(r.type == "TestPassed" for r in log) >= 2 else None

    seen = await _until(some_passed)
    assert seen[-1].type not in ("RunCompleted", "RunCancelled")
    received = await _sse(acme.http[0], f"/api/v1/runs/{run_id}/stream", last_id=seen[-1].position)
    log = await _log(store, run_id)
    _check_exactly(_positions(received), log, seen[-1].position)
    assert [m.event for m in received] == [r.type for r in log[len(seen) :]]
    assert received[-1].event == "RunCompleted"
    assert json.loads(received[-1].data)["status"] == "passed"
    # the whole stream from the start: secrets masked as in every answer of the service
    whole = await _sse(acme.http[0], f"/api/v1/runs/{run_id}/stream")
    _check_exactly(_positions(whole), log, 0)
    tokens = [json.loads(m.data) for m in whole if m.event == "AuthTokenUpdated"]
    assert tokens and all(t["value"] == "***" for t in tokens)
    assert "secret-alice" not in "".join(m.data for m in whole)
    # reconnecting after the last event of a finished run: 204, an EventSource stops there
    async with acme.http[0].stream(
        "GET", f"/api/v1/runs/{run_id}/stream", headers={"Last-Event-ID": str(log[-1].position)}
    ) as response:
        assert response.status_code == 204


async def test_a_run_started_through_one_instance_is_watched_through_the_other(
    acme: Org, shop_url: str, store: PostgresEventStore
) -> None:
    run_id = await _start_run(acme, shop_url)  # through the first instance
    watched: list[tuple[int, str]] = []
    watching = watch_stream(
        str(acme.http[1].base_url), acme.key, run_id, lambda p, kind, _: watched.append((p, kind))
    )
    last = await asyncio.wait_for(watching, 30)
    log = await _log(store, run_id)
    assert watched == [(r.position, r.type) for r in log]
    assert last == log[-1].position and watched[-1][1] == "RunCompleted"
    # live through the other instance at once: the doorbell, not the 1 s polling fallback
    run_id = await _fake_run(store, acme, "latency", tests=10)
    async with acme.http[1].stream("GET", f"/api/v1/runs/{run_id}/stream") as response:
        messages = sse_messages(response.aiter_lines())
        assert (await anext(messages)).event == "RunStarted"
        delays = []
        for event in _tests(10)[:10]:
            start = asyncio.get_running_loop().time()
            await store.append([StreamAppend(ev.run_stream(run_id), [NewEvent(event)])])
            assert (await asyncio.wait_for(anext(messages), 5)).event == ev.event_type(event)
            delays.append(asyncio.get_running_loop().time() - start)
    assert max(delays) < 0.3, delays


async def _fake_run(store: PostgresEventStore, org: Org, project: str, tests: int = 3) -> str:
    run_id = str(uuid.uuid4())
    plan = [ev.PlannedTest(f"t{i}") for i in range(tests)]
    started = ev.RunStarted(run_id, "fake", "-", plan, organization=str(org.id), project=project)
    await store.append([StreamAppend(ev.run_stream(run_id), [NewEvent(started)])])

    async def known() -> bool:  # to both instances: the projector has filed it
        answers = [await http.get(f"/api/v1/runs/{run_id}") for http in org.http]
        return all(a.status_code == 200 for a in answers)

    await _until(known)
    return run_id


async def _paced(
    store: PostgresEventStore, run_id: str, events: list[ev.Event], pause: float = 0.01
) -> None:
    for event in events:
        await asyncio.sleep(pause)
        await store.append([StreamAppend(ev.run_stream(run_id), [NewEvent(event)])])


def _tests(count: int) -> list[ev.Event]:
    events: list[ev.Event] = []
    for i in range(count):
        events += [ev.TestStarted(f"t{i}"), ev.TestPassed(f"t{i}", 1, 5.0)]
    return [*events, ev.RunCompleted("passed", count, 0, 0, 100.0)]


async def test_a_subscriber_dropped_and_reconnected_with_last_event_id_loses_nothing(
    acme: Org, store: PostgresEventStore
) -> None:
    run_id = await _fake_run(store, acme, "drops", tests=30)
    appending = asyncio.create_task(_paced(store, run_id, _tests(30)))
    received: list[SseMessage] = []
    url = f"/api/v1/runs/{run_id}/stream"
    for turn in range(100):  # each connection drops after 7 events, alternating instances
        last = int(received[-1].id or 0) if received else None
        got = await _sse(acme.http[turn % 2], url, last_id=last, count=7)
        received += got
        if received[-1].event == "RunCompleted":
            break
        await asyncio.sleep(0.03)  # events go on meanwhile
    await appending
    _check_exactly(_positions(received), await _log(store, run_id), 0)


async def test_watch_stream_reconnects_after_the_connection_is_cut(
    acme: Org, store: PostgresEventStore, live_service: LiveService
) -> None:
    run_id = await _fake_run(store, acme, "cuts", tests=20)
    cuts = CuttingProxy(live_service.url)
    watched: list[int] = []

    def seen(position: int, _kind: str, _event: dict[str, Any]) -> None:
        watched.append(position)
        if len(watched) % 9 == 0:
            cuts.cut()

    async with cuts.serving() as url:
        appending = asyncio.create_task(_paced(store, run_id, _tests(20), 0.03))
        await asyncio.wait_for(watch_stream(url, acme.key, run_id, seen), 30)
        await appending
    assert cuts.connections >= 4
    _check_exactly(watched, await _log(store, run_id), 0)


async def test_a_project_stream_carries_its_runs_run_level_events_and_flaky_tests(
    acme: Org, globex: Org, store: PostgresEventStore
) -> None:
    project = await acme.ok("POST", "/api/v1/projects", 201, json={"name": "live"})
    await globex.ok("POST", "/api/v1/projects", 201, json={"name": "live"})
    url = f"/api/v1/projects/{project['id']}/stream"
    async with acme.http[1].stream("GET", url) as response:
        assert response.status_code == 200  # from now on: what is appended next
        ours = await _fake_run(store, acme, "live", tests=2)
        others = [
            await _fake_run(store, acme, "other project"),
            await _fake_run(store, globex, "live"),  # the same name, another organization
        ]
        for event in RUN_EVENTS:
            for run_id in (ours, *others):  # interleaved: a leak would show in between
                await _paced(store, run_id, [event])
        messages = sse_messages(response.aiter_lines())
        got = [await anext(messages) for _ in range(3)]
    rest = await _sse(acme.http[0], url, last_id=int(got[-1].id or 0), count=2)
    kinds = ["RunStarted", "TestPassed", "flaky_test_detected", "TestFailed", "RunCompleted"]
    assert [m.event for m in got + rest] == kinds
    assert {json.loads(m.data)["run_id"] for m in got + rest} == {ours}
    flaky = json.loads(got[2].data)
    assert (flaky["test"], flaky["attempts"], flaky["rule"]) == ("t0", 2, "passed_on_retry")
    log = [r.position for r in await _log(store, ours) if r.type != "TestStarted"]
    assert _positions(got + rest) == [log[0], log[1], log[1], *log[2:]]  # flaky: TestPassed's


RUN_EVENTS: list[ev.Event] = [
    ev.TestStarted("t0"),
    ev.TestPassed("t0", 2, 5.0),  # passed on its second attempt: flaky
    ev.TestStarted("t1"),
    ev.TestFailed("t1", 1, 5.0, "assertion", "expected 200, got 500"),
    ev.RunCompleted("failed", 1, 1, 0, 10.0),
]


async def test_a_websocket_joining_mid_run_gets_exactly_the_remaining_events(
    acme: Org, store: PostgresEventStore, second_service: LiveService
) -> None:
    run_id = await _fake_run(store, acme, "sockets", tests=15)
    appending = asyncio.create_task(_paced(store, run_id, _tests(15)))
    await asyncio.sleep(0.1)
    after = (await _log(store, run_id))[-1].position
    auth = {"Authorization": f"Bearer {acme.key}"}
    url = second_service.url.replace("http", "ws", 1) + f"/api/v1/runs/{run_id}/ws?after={after}"
    messages: list[dict[str, Any]] = []
    async with ws_connect(url, additional_headers=auth) as socket:
        messages += [json.loads(raw) async for raw in socket]
    assert socket.close_code == 1000  # closed by the service after RunCompleted
    await appending
    log = await _log(store, run_id)
    assert after < log[-1].position - 10  # it joined mid-run
    _check_exactly([m["position"] for m in messages], log, after)
    assert all(m["event"]["type"] == m["type"] for m in messages)
    assert messages[-1]["type"] == "RunCompleted"


async def test_another_organization_gets_404_on_the_streams(
    acme: Org, globex: Org, store: PostgresEventStore, live_service: LiveService
) -> None:
    run_id = await _fake_run(store, acme, "private")
    project = await acme.ok("POST", "/api/v1/projects", 201, json={"name": "private"})
    for path in (f"/api/v1/runs/{run_id}/stream", f"/api/v1/projects/{project['id']}/stream"):
        response = await globex.http[0].get(path)
        assert response.status_code == 404, path
        assert response.headers["content-type"] == "application/problem+json"
        async with httpx.AsyncClient(base_url=live_service.url) as anonymous:
            assert (await anonymous.get(path)).status_code == 401
    assert (await acme.http[0].get(f"/api/v1/runs/{uuid.uuid4()}/stream")).status_code == 404
    auth = {"Authorization": f"Bearer {globex.key}"}
    base = live_service.url.replace("http", "ws", 1)
    for path in (f"/api/v1/runs/{run_id}/ws", f"/api/v1/projects/{project['id']}/ws"):
        async with ws_connect(base + path, additional_headers=auth) as socket:
            with pytest.raises(ConnectionClosed):
                await socket.recv()
        assert socket.close_code == 4404, path


class CuttingProxy:
    """A TCP proxy in front of the service whose connections the test cuts at will."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.removeprefix("http://").partition(":")
        self._upstream = (host, int(port))
        self._open: set[asyncio.StreamWriter] = set()
        self.connections = 0

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        """The proxy's URL while it serves."""
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        try:
            yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        finally:
            self.cut()
            server.close()
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        self._open |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, target: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    target.write(data)
                    await target.drain()
            target.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._open -= {writer, up_writer}

    def cut(self) -> None:
        """Abort every open connection, both ways, as a network failure would."""
        for writer in list(self._open):
            writer.transport.abort()
