"""The event store interface (its errors are in ``events.errors``, and re-exported here).

Appends carry the stream version they expect (optimistic concurrency) and an id per event
(idempotency). Readers by position never pass over an event that a slower transaction
commits later: a backend guarantees that ``read_all`` returns positions in commit order.
``subscribe`` follows the log live on top of that (``tail``: the loop every backend shares).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Collection, Sequence
from typing import Protocol

import msgspec

from events.errors import StoreError as StoreError
from events.errors import StoreUnavailable as StoreUnavailable
from events.errors import WrongExpectedVersion as WrongExpectedVersion
from events.types import Event, RecordedEvent, new_id

ANY_VERSION = -1
"""``expected_version`` that accepts whatever the stream holds."""


# A \u0000 escape that is not itself an escaped backslash followed by "u0000".
_NUL_ESCAPE = re.compile(rb"(?<!\\)((?:\\\\)*)\\u0000")


def without_nul(data: bytes) -> bytes:
    """An event's JSON with U+0000 in its strings as U+FFFD: what every backend stores.

    PostgreSQL's jsonb rejects U+0000 (22P05), and an API may well return a NUL byte in a
    body excerpt or a captured value, which must not fail the run. U+FFFD is what a decoder
    shows for an unrepresentable character.
    """
    if b"\\u0000" not in data:
        return data
    return _NUL_ESCAPE.sub(rb"\1\\ufffd", data)


def now_us() -> int:
    """The wall-clock time in microseconds since the Unix epoch: what ``NewEvent.at`` holds."""
    return time.time_ns() // 1000


class NewEvent(msgspec.Struct, frozen=True):
    """An event about to be appended, with the id that makes re-sending it harmless."""

    event: Event
    id: uuid.UUID = msgspec.field(default_factory=new_id)
    at: int = msgspec.field(default_factory=now_us)
    """When it happened, in microseconds since the Unix epoch: the event's ``recorded_at``.
    By default when the NewEvent is made, which for the writer is when the event is emitted,
    not when its batch reaches the store."""


class StreamAppend(msgspec.Struct, frozen=True):
    """Events for one stream, written only if the stream is at ``expected_version``."""

    stream: str
    events: Sequence[NewEvent]
    expected_version: int = ANY_VERSION


class EventStore(Protocol):
    """The log: what every package outside ``events`` reads and writes it through.

    A backend guarantees commit order for readers by position (nothing is passed over that a
    slower transaction commits later) and turns its driver's errors into StoreError.
    """

    async def append(self, appends: Sequence[StreamAppend]) -> list[list[int]]:
        """Append to one or more streams atomically: all of it or none of it.

        Returns the global positions per append, in order. Re-sending events whose ids are
        already stored returns their original positions and writes nothing. Raises
        WrongExpectedVersion if a stream is not at the version its append expects.
        """
        ...

    async def head(self) -> int:
        """The log's last committed position, 0 if it holds nothing."""
        ...

    async def stream_version(self, stream: str, *, through_position: int | None = None) -> int:
        """The head of a stream: its last version, 0 if it holds nothing. With
        ``through_position``, its last version at or before that log position (how many of
        its events a reader at that position has seen)."""
        ...

    async def read_stream(
        self,
        stream: str,
        after_version: int = 0,
        *,
        after_position: int = 0,
        through_position: int | None = None,
        limit: int | None = None,
    ) -> list[RecordedEvent]:
        """The stream's events with version > after_version and after_position < position
        <= through_position (no upper bound if None), by version; the first ``limit`` of
        them if given (a page)."""
        ...

    async def first_events(self, streams: Sequence[str]) -> dict[str, RecordedEvent]:
        """The first event (version 1) of each stream that has one."""
        ...

    async def last_events(self, streams: Sequence[str]) -> dict[str, RecordedEvent]:
        """The last event of each stream that has one."""
        ...

    async def read_all(
        self,
        after_position: int = 0,
        limit: int = 1000,
        *,
        through_position: int | None = None,
        types: Collection[str] | None = None,
    ) -> list[RecordedEvent]:
        """Events with after_position < position <= through_position in commit order, never
        skipping one; only those of ``types`` (event type names) if given. ``limit`` counts
        the events returned."""
        ...

    async def list_streams(self, prefix: str, limit: int = 50) -> list[str]:
        """Stream names starting with prefix, newest first."""
        ...

    async def remove_stream(self, stream: str) -> int:
        """Delete every event of ``stream`` (archival: read them first); return how many.

        Positions are never reused: the log then has a hole where the stream's events were,
        which readers by position simply pass (they read "after a position", never "the next
        one"). The stream is then as if it never existed (version 0), until restored.
        """
        ...

    async def restore_stream(self, recorded: Sequence[RecordedEvent]) -> None:
        """Put removed events of one stream back with their ids, versions, positions and
        times, atomically. Raises StoreError if the stream holds events again, if an id or a
        position is taken, or if the versions are not 1..n.

        A restored event's position is below what readers by position have passed, so
        ``read_all``/``subscribe`` from a later checkpoint never see it again: restoring
        brings back history for reading by stream, not new events to deliver.
        """
        ...

    def subscribe(
        self,
        after_position: int = 0,
        *,
        limit: int = 1000,
        idle: float = 1.0,
        pace: float = 0.0,
    ) -> AsyncGenerator[list[RecordedEvent], None]:
        """The log after ``after_position``, live: pages of ``read_all`` (at most ``limit``
        events each), the next as soon as an append commits, and ``[]`` (a heartbeat) when
        ``idle`` seconds pass without one. With ``pace``, a page shorter than ``limit`` is
        followed by a pause of that many seconds before the next read, so that events
        appended one after another come together: fewer, larger pages, none more than
        ``pace`` late.

        Nothing is skipped or repeated: each page starts after the last one. It never ends
        and never raises StoreUnavailable: while the store is unreachable it keeps retrying
        (with backoff, up to ``idle`` between tries) and yielding heartbeats, and it resumes
        after the last event it yielded once the store is back. Other StoreErrors propagate.
        Close it (``contextlib.aclosing``) to let go of what it holds (PostgreSQL: its
        LISTEN connection).
        """
        ...

    async def aclose(self) -> None: ...


def restorable(recorded: Sequence[RecordedEvent]) -> str:
    """The one stream of events to restore, whose versions are 1..n in order; StoreError
    (what every backend raises) when they are not that."""
    streams = {event.stream for event in recorded}
    if len(streams) != 1:
        raise StoreError(f"a restore takes the events of one stream, got {len(streams)} streams")
    stream = streams.pop()
    if [event.version for event in recorded] != list(range(1, len(recorded) + 1)):
        raise StoreError(
            f"a restore of stream {stream} needs its whole stream: versions 1..{len(recorded)}"
        )
    return stream


async def next_page(
    pages: AsyncIterator[list[RecordedEvent]], stop: asyncio.Event
) -> list[RecordedEvent] | None:
    """The next page of a subscription, or None if ``stop`` is set first: the wait for the
    page is cancelled then, which ends the subscription."""
    page = asyncio.ensure_future(anext(pages))
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([page, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        page.cancel()  # nothing if it is done
        stopped.cancel()
        await asyncio.gather(page, stopped, return_exceptions=True)
    return None if page.cancelled() else page.result()


_FIRST_RETRY = 0.05
"""Seconds before the first retry of an unreachable store; doubled each time, up to idle."""

Bell = Callable[[], Awaitable[asyncio.Event]]
"""Arms a backend's doorbell: returns an event set by the next append that commits after
the call. Raises StoreUnavailable when it cannot listen."""


async def tail(
    store: EventStore, arm: Bell, after_position: int, *, limit: int, idle: float, pace: float
) -> AsyncGenerator[list[RecordedEvent], None]:
    """``EventStore.subscribe`` on ``store`` woken by ``arm``'s doorbell: see there.

    The bell is armed before each read, so an append that commits after the read began
    rings it and is read next; a read at every heartbeat catches what a lost ring would miss.
    """
    loop = asyncio.get_running_loop()
    position = after_position
    quiet_since = loop.time()
    retry = _FIRST_RETRY
    while True:
        page: list[RecordedEvent] | None
        try:
            bell = await arm()
            page = await store.read_all(position, limit)
        except StoreUnavailable:
            page = None
        if page:
            position = page[-1].position
            retry = _FIRST_RETRY
            yield page
            quiet_since = loop.time()
            if pace and len(page) < limit:
                await asyncio.sleep(pace)
            continue
        remaining = quiet_since + idle - loop.time()
        if remaining <= 0:
            yield []
            quiet_since = loop.time()
        elif page is None:
            await asyncio.sleep(min(retry, remaining))
            retry = min(retry * 2, idle)
        else:
            retry = _FIRST_RETRY
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(bell.wait(), remaining)
