"""Live runs over HTTP: Server-Sent Events and WebSockets, replay from a position, then live.

``GET /api/v1/runs/{id}/stream`` sends the run's events as SSE messages whose ``id`` is the
log position; ``Last-Event-ID`` (what a browser's EventSource sends when it reconnects) or
``?after=`` resumes after a position, and the stream ends after RunCompleted or
RunCancelled. A finished run with nothing after the position answers 204, which tells an
EventSource to stop reconnecting. ``/api/v1/runs/{id}/ws`` is the same as WebSocket text
messages ``{"position", "type", "event"}``, resumed with ``?after=``.

``GET /api/v1/projects/{id}/stream`` (and ``/ws``) carries the run-level events of the
project's runs (RunStarted, TestPassed, TestFailed, RunCompleted, RunCancelled, each with
its ``run_id``) from now on, or after a position, and two kinds of analytics message:

- ``flaky_test_detected``: derived at once when a test passes on a retry within its run (a
  message of its own after the TestPassed, with that event's position and ``rule``
  "passed_on_retry"); and for each FlakyTestDetected the Detector records when
  a test's history crosses the failure-rate or the flip-rate rule (``rule`` "failure_rate"
  or "flip_rate", events.projections.detect), after the run's RunCompleted.
- ``performance_degradation``: each PerformanceDegraded the Detector records.

Recorded findings are events of the log (stream ``analytics-<project id>``) with positions
of their own: they replay after a position and resume with Last-Event-ID like the rest.
The message is the event's fields without its ``type`` tag (the message's name says it).

Another organization's run or project is absent (404, or WebSocket close code 4404).

A stream lives no longer than its key: every ``KEY_CHECK`` seconds it asks whether the key
is still valid (through the key cache, so a key revoked on another service process is seen
within KEY_TTL). A revoked key ends an SSE stream with a ``revoked`` message (the
EventSource's reconnection then gets 401) and closes a WebSocket with code 4401.

A stream also ends when the service starts to shut down (``Services.draining``): an SSE
response simply ends, a WebSocket closes with 1001 (going away); either client resumes on
another instance, or after the restart, from its last position.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, WebSocket, get, websocket
from litestar.datastructures import State
from litestar.exceptions import WebSocketDisconnect
from litestar.params import FromPath, HeaderParameter, QueryParameter
from litestar.response import Stream

from context_service.api.common import PrincipalDep, ServicesDep
from context_service.auth import key_of, principal_of
from context_service.errors import BadRequest, NotFound
from context_service.feed import TERMINAL, Entry, Feed, Hub, ProjectFeed, RunFeed, follow
from context_service.keys import Principal
from context_service.services import Services
from events.store import StoreError
from events.types import TestPassed
from events.wire import frame

FLAKY = "flaky_test_detected"
DEGRADED = "performance_degradation"
_FINDING_MESSAGES = {"FlakyTestDetected": FLAKY, "PerformanceDegraded": DEGRADED}
"""The message a recorded finding becomes on a project's stream."""
KEY_CHECK = 1.0
"""Seconds between two checks that a stream's key is still valid."""
REVOKED_CODE = 4401
"""The WebSocket close code of a stream whose key was revoked."""
_REVOKED = b'event: revoked\ndata: {"detail": "the API key was revoked"}\n\n'
HEARTBEAT = 15.0
"""Seconds between SSE comments on a quiet stream: proxies keep it open, clients see it alive."""
_log = logging.getLogger("baton.service.realtime")
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_PREAMBLE = b"retry: 1000\n\n"
_PROJECT = (
    "SELECT EXISTS (SELECT FROM service_projects WHERE id = $1)"
    " OR EXISTS (SELECT FROM projects WHERE id = $1)"
)
LastEventId = Annotated[
    str | None,
    HeaderParameter(name="Last-Event-ID", description="resume after this log position"),
]
Position = Annotated[
    int | None, QueryParameter(ge=0, le=2**62, description="resume after this log position")
]


def hub_of(state: State, services: Services) -> Hub:
    """The app's hub, made on first use (one subscription to the log per process and app)."""
    hub: Hub | None = state.get("realtime_hub")
    if hub is None or hub.store is not services.store:
        hub = Hub(services.store)
        state["realtime_hub"] = hub
    return hub


@dataclass(frozen=True)
class _Source:
    """What a connection follows, checked to be the caller's, and how it is shown."""

    feed: Feed
    project: bool
    after: int
    ended: bool = False
    """A run that ended at or before ``after``: there is nothing to follow."""


async def _run_source(
    services: Services, hub: Hub, principal: Principal, run_id: uuid.UUID, after: int | None
) -> _Source:
    stream = await services.db.run_stream(principal.organization_id, run_id)
    last = (await services.store.last_events([stream])).get(stream)
    start = after or 0
    ended = last is not None and last.type in TERMINAL and last.position <= start
    return _Source(RunFeed(hub, stream), project=False, after=start, ended=ended)


async def _project_source(
    services: Services, hub: Hub, principal: Principal, project_id: uuid.UUID, after: int | None
) -> _Source:
    async with services.db.tenant(principal.organization_id) as conn:
        if not await conn.fetchval(_PROJECT, project_id):
            raise NotFound(f"no project {project_id}")
    start = await hub.log_head() if after is None else after
    return _Source(ProjectFeed(hub, project_id), project=True, after=start)


def _derived(entry: Entry) -> list[tuple[str, dict[str, Any]]]:
    """The messages of a project's stream for ``entry``: itself, and what it tells."""
    data = {"run_id": entry.run_id, **msgspec.to_builtins(entry.event)}
    finding = _FINDING_MESSAGES.get(entry.type)
    if finding is not None:
        del data["type"]
        return [(finding, data)]
    messages: list[tuple[str, dict[str, Any]]] = [(entry.type, data)]
    event = entry.event
    if isinstance(event, TestPassed) and event.attempts > 1:
        flaky = {"run_id": entry.run_id, "test": event.test, "attempts": event.attempts}
        messages.append((FLAKY, {**flaky, "rule": "passed_on_retry"}))
    return messages


def _sse_of(entry: Entry, project: bool) -> bytes:
    if not project:
        return entry.sse()
    return b"".join(
        b"id: %d\nevent: %s\ndata: %s\n\n"
        % (entry.position, kind.encode(), msgspec.json.encode(data))
        for kind, data in _derived(entry)
    )


def _ws_of(entry: Entry, project: bool) -> list[bytes]:
    if not project:
        return [frame(entry.position, entry.type, entry.data)]
    return [
        msgspec.json.encode({"position": entry.position, "type": kind, "event": data})
        for kind, data in _derived(entry)
    ]


async def _batches(hub: Hub, source: _Source) -> AsyncGenerator[list[Entry], None]:
    """The source's batches (empty: a heartbeat is due), up to a run's last event."""
    if source.ended:
        return
    batches = follow(hub, source.feed, source.after, heartbeat=HEARTBEAT)
    async with contextlib.aclosing(batches):
        async for batch in batches:
            if source.project:
                yield batch
                continue
            for at, entry in enumerate(batch):
                if entry.type in TERMINAL:
                    yield batch[: at + 1]
                    return
            yield batch


async def revoked(services: Services, key: str | None) -> None:
    """Return once ``key`` is no longer valid (a key of the dashboard's cookie included)."""
    if key is None:  # pragma: no cover - the middleware let no request without a key in
        return
    while True:
        await asyncio.sleep(KEY_CHECK)
        try:
            if await services.db.principal(key) is None:
                return
        except Exception:  # the database is down: the stream ends (or not) on its own
            _log.debug("a stream's key could not be checked", exc_info=True)


_REVOKED_KEY, _DRAINING = "revoked", "draining"


async def _must_end(services: Services, key: str | None) -> str:
    """Why a live stream must end now: its key was revoked, or the service shuts down."""
    reasons = {
        asyncio.ensure_future(revoked(services, key)): _REVOKED_KEY,
        asyncio.ensure_future(services.draining.wait()): _DRAINING,
    }
    try:
        done, _ = await asyncio.wait(reasons, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in reasons:
            waiter.cancel()
        await asyncio.gather(*reasons, return_exceptions=True)
    return reasons[done.pop()]


class _Revoked(Exception):
    """The stream must end (``watch``'s result says why)."""


async def _while_valid(
    batches: AsyncGenerator[list[Entry], None], watch: asyncio.Task[str]
) -> AsyncGenerator[list[Entry], None]:
    """``batches`` until they end, or until ``watch`` ends (raising _Revoked)."""
    while True:
        step = asyncio.ensure_future(anext(batches))
        await asyncio.wait({step, watch}, return_when=asyncio.FIRST_COMPLETED)
        if not step.done():
            step.cancel()
            await asyncio.gather(step, return_exceptions=True)
            raise _Revoked
        try:
            batch = step.result()
        except StopAsyncIteration:
            return
        yield batch


async def _sse(
    hub: Hub, source: _Source, services: Services, key: str | None
) -> AsyncGenerator[bytes, None]:
    yield _PREAMBLE
    watch = asyncio.create_task(_must_end(services, key))
    with services.live_stream():
        try:
            async with (
                contextlib.aclosing(_batches(hub, source)) as followed,
                contextlib.aclosing(_while_valid(followed, watch)) as batches,
            ):
                async for batch in batches:
                    if not batch:
                        yield b": ping\n\n"
                    else:
                        yield b"".join(_sse_of(entry, source.project) for entry in batch)
        except StoreError as exc:
            # the client reconnects with Last-Event-ID (after ``retry``) and loses nothing
            _log.warning("a live stream ends: the event store failed: %s", exc)
        except _Revoked:
            if watch.result() == _REVOKED_KEY:
                yield _REVOKED
        finally:
            watch.cancel()


def _resume_point(header: str | None, after: int | None) -> int | None:
    header = (header or "").strip()
    if not header:
        return after
    if not header.isdigit() or int(header) > 2**62:
        raise BadRequest(f"Last-Event-ID must be a log position, not {header[:40]!r}")
    return max(int(header), after or 0)


def _stream(
    hub: Hub, source: _Source, services: Services, request: Request[Any, Any, Any]
) -> Response[Any]:
    if source.ended:
        return Response(None, status_code=204, headers=_SSE_HEADERS)
    return Stream(
        _sse(hub, source, services, key_of(request)),
        media_type="text/event-stream",
        headers=_SSE_HEADERS,
        status_code=200,
    )


async def _pump(
    socket: WebSocket[Any, Any, Any], hub: Hub, source: _Source, services: Services
) -> None:
    """Send the source over an accepted socket until it ends or the client goes away."""
    with services.live_stream():
        await _pump_live(socket, hub, source, services)


async def _pump_live(
    socket: WebSocket[Any, Any, Any], hub: Hub, source: _Source, services: Services
) -> None:

    async def send() -> None:
        try:
            async with contextlib.aclosing(_batches(hub, source)) as batches:
                async for batch in batches:
                    for entry in batch:
                        for message in _ws_of(entry, source.project):
                            await socket.send_data(message.decode(), mode="text")
        except StoreError as exc:
            _log.warning("a live socket ends: the event store failed: %s", exc)
            await socket.close(1011, "the event store is unavailable: reconnect with ?after=")
            return
        await socket.close(1000, "the run has ended")

    async def until_gone() -> None:
        while (await socket.receive())["type"] != "websocket.disconnect":
            pass

    watch = asyncio.create_task(_must_end(services, key_of(socket)))
    tasks = [asyncio.create_task(send()), asyncio.create_task(until_gone()), watch]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if watch in done:
        with contextlib.suppress(Exception):
            if watch.result() == _REVOKED_KEY:
                await socket.close(REVOKED_CODE, "the API key was revoked")
            else:
                await socket.close(1001, "the service is shutting down: reconnect with ?after=")
        return
    for task in done:
        failure = None if task.cancelled() else task.exception()
        if failure is not None and not isinstance(failure, WebSocketDisconnect):
            raise failure


async def _serve_socket(
    socket: WebSocket[Any, Any, Any], make: Callable[[Services, Hub, Principal], Any]
) -> None:
    services: Services = socket.app.state.services
    hub = hub_of(socket.app.state, services)
    await socket.accept()
    try:
        source: _Source = await make(services, hub, principal_of(socket))
    except NotFound as exc:
        await socket.close(4404, exc.detail)
        return
    await _pump(socket, hub, source, services)


class RealtimeController(Controller):
    path = "/api/v1"
    tags = ("realtime",)

    @get("/runs/{run_id:uuid}/stream", media_type="text/event-stream")
    async def run_stream(
        self,
        request: Request[Any, Any, Any],
        services: ServicesDep,
        principal: PrincipalDep,
        run_id: FromPath[uuid.UUID],
        after: Position = None,
        last_event_id: LastEventId = None,
    ) -> Response[Any]:
        """The run's events as Server-Sent Events (``id``: the log position), from the start
        or after ``Last-Event-ID``/``after``, live until RunCompleted or RunCancelled."""
        hub = hub_of(request.app.state, services)
        start = _resume_point(last_event_id, after)
        source = await _run_source(services, hub, principal, run_id, start)
        return _stream(hub, source, services, request)

    @get("/projects/{project_id:uuid}/stream", media_type="text/event-stream")
    async def project_stream(
        self,
        request: Request[Any, Any, Any],
        services: ServicesDep,
        principal: PrincipalDep,
        project_id: FromPath[uuid.UUID],
        after: Position = None,
        last_event_id: LastEventId = None,
    ) -> Response[Any]:
        """The run-level events of the project's runs as Server-Sent Events, from now on or
        after ``Last-Event-ID``/``after``, with ``flaky_test_detected`` and
        ``performance_degradation``."""
        hub = hub_of(request.app.state, services)
        start = _resume_point(last_event_id, after)
        source = await _project_source(services, hub, principal, project_id, start)
        return _stream(hub, source, services, request)

    @websocket("/runs/{run_id:uuid}/ws")
    async def run_socket(
        self, socket: WebSocket[Any, Any, Any], run_id: FromPath[uuid.UUID], after: Position = None
    ) -> None:
        """The run's events as JSON messages ``{"position", "type", "event"}``, from the
        start or after ``after``; closed (1000) after RunCompleted or RunCancelled."""

        async def make(services: Services, hub: Hub, principal: Principal) -> _Source:
            return await _run_source(services, hub, principal, run_id, after)

        await _serve_socket(socket, make)

    @websocket("/projects/{project_id:uuid}/ws")
    async def project_socket(
        self,
        socket: WebSocket[Any, Any, Any],
        project_id: FromPath[uuid.UUID],
        after: Position = None,
    ) -> None:
        """The project stream's messages as JSON ``{"position", "type", "event"}``."""

        async def make(services: Services, hub: Hub, principal: Principal) -> _Source:
            return await _project_source(services, hub, principal, project_id, after)

        await _serve_socket(socket, make)
