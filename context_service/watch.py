"""Following a run's live stream from the service (``baton watch RUN_ID``): an SSE client.

``watch_stream`` reads ``GET /api/v1/runs/{id}/stream`` with httpx and hands each event to
a callback. A dropped connection (the network, a restarted or replaced service instance, a
proxy's idle timeout) is reconnected with ``Last-Event-ID`` set to the last position
received, so the service resumes right after it: nothing is lost and nothing is repeated.
It ends after RunCompleted or RunCancelled, or when the service answers 204 (the run ended
before the position asked for).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import msgspec

from orchestrator.errors import InfrastructureError

TERMINAL = frozenset({"RunCompleted", "RunCancelled"})
_QUIET = 45.0
"""Seconds without a byte (the service sends a comment every 15) before a connection is
taken for dead and replaced."""


class WatchError(InfrastructureError):
    """The stream cannot be followed: refused (no such run, a bad key) or unreachable."""


class SseMessage(msgspec.Struct, frozen=True):
    """One Server-Sent Events message."""

    event: str
    data: str
    id: str | None = None
    retry: int | None = None


async def sse_messages(lines: AsyncIterator[str]) -> AsyncIterator[SseMessage]:
    """The messages of an event stream, given its lines (as ``Response.aiter_lines()``),
    by the rules of the HTML standard: comments skipped, ``data`` lines joined, a message
    with no data not dispatched, ``id`` kept until changed."""
    event, last_id = "", None
    data: list[str] = []
    retry: int | None = None
    async for line in lines:
        if not line:
            if data:
                yield SseMessage(event or "message", "\n".join(data), last_id, retry)
            event, data, retry = "", [], None
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
        elif name == "id" and "\0" not in value:
            last_id = value
        elif name == "retry" and value.isdigit():
            retry = int(value)


async def watch_stream(
    base_url: str,
    api_key: str,
    run_id: str,
    on_event: Callable[[int, str, dict[str, Any]], None],
    *,
    last_event_id: int | None = None,
    max_attempts: int = 8,
    transport: httpx.AsyncBaseTransport | None = None,
) -> int | None:
    """Call ``on_event(position, type, event)`` for each event of the run after
    ``last_event_id`` (from its start if None), live, until the run ends; return the last
    position received (``last_event_id`` if there was nothing after it).

    Reconnects after a dropped connection or a 5xx with ``Last-Event-ID``, waiting longer
    each time; raises WatchError when the service refuses (401, 403, 404: its problem
    detail in the message) or after ``max_attempts`` connections in a row without an event.
    """
    position = last_event_id
    failures = 0
    delay = 0.5
    url = f"/api/v1/runs/{run_id}/stream"
    timeout = httpx.Timeout(10.0, read=_QUIET)
    headers = {"Authorization": f"Bearer {api_key}", "Accept": "text/event-stream"}
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, timeout=timeout, transport=transport
    ) as client:
        while True:
            progressed = False
            resume = {"Last-Event-ID": str(position)} if position is not None else {}
            try:
                async with client.stream("GET", url, headers=resume) as response:
                    if response.status_code == 204:
                        return position
                    if response.status_code >= 400:
                        await response.aread()
                        problem = _problem(response)
                        if response.status_code < 500:
                            raise WatchError(f"{base_url}{url}: {problem}")
                        raise _Retry(problem)
                    async for message in sse_messages(response.aiter_lines()):
                        if message.retry is not None:
                            delay = message.retry / 1000
                        if message.id is None or not message.id.isdigit():
                            continue
                        position = int(message.id)
                        progressed = True
                        on_event(position, message.event, msgspec.json.decode(message.data))
                        if message.event in TERMINAL:
                            return position
                    reason = "the service closed the stream before the run ended"
            except (httpx.TransportError, _Retry) as exc:
                reason = str(exc) or type(exc).__name__
            failures = 0 if progressed else failures + 1
            if failures >= max_attempts:
                raise WatchError(f"{base_url}{url}: {reason} ({failures} attempts in a row)")
            if failures:  # a connection that delivered something is replaced at once
                await asyncio.sleep(min(delay * 2 ** (failures - 1), 10.0))


class _Retry(Exception):
    """A 5xx answer: the service (or a proxy before it) may answer again shortly."""


def _problem(response: httpx.Response) -> str:
    """What an error answer says: the problem detail if it is one, else its status."""
    try:
        body = msgspec.json.decode(response.content)
    except msgspec.DecodeError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("detail"), str):
        return f"{response.status_code} {body['detail']}"
    return f"{response.status_code} {response.reason_phrase}"
