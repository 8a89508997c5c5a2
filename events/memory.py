"""The in-memory event store: the EventStore contract in one process, for tests and tools
that need a log but not PostgreSQL.

It keeps what the PostgreSQL backend would give back: each event is stored as its JSON
(U+0000 as U+FFFD, see ``without_nul``) decoded again, with its own ``recorded_at``, so a
caller sees the same RecordedEvent from either backend. Secrets are sealed above the store
(events hold ciphertext already), so it keeps what it is given. Appends are checked as
baton_append in schema.sql checks them, and applied all at once or not at all; positions
are commit order because there is one writer, the event loop.
"""

from __future__ import annotations

import asyncio
import bisect
import uuid
from collections.abc import AsyncGenerator, Collection, Sequence
from datetime import UTC, datetime, timedelta

import msgspec

from events.store import (
    ANY_VERSION,
    EventStore,
    StoreError,
    StreamAppend,
    WrongExpectedVersion,
    restorable,
    tail,
    without_nul,
)
from events.types import Event, RecordedEvent

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Event).decode


class MemoryEventStore:
    """EventStore in this process's memory; it lives as long as the object."""

    def __init__(self) -> None:
        self._log: list[RecordedEvent] = []
        """Every event, by position (which is commit order)."""
        self._positions: list[int] = []
        """``_log``'s positions, for bisecting."""
        self._streams: dict[str, list[RecordedEvent]] = {}
        """Each stream's events by version: version v at index v - 1."""
        self._by_id: dict[uuid.UUID, RecordedEvent] = {}
        self._head = 0
        """The last position drawn: as PostgreSQL's identity, never drawn again, even when
        the events that held it are removed."""
        self._appended = asyncio.Event()
        """Set (and replaced) by each append that stores something: subscribers wait on it."""

    async def append(self, appends: Sequence[StreamAppend]) -> list[list[int]]:
        for item in appends:
            if item.expected_version < ANY_VERSION:
                raise ValueError(f"expected_version {item.expected_version} is not a version")
        staged: list[RecordedEvent] = []
        staged_ids: dict[uuid.UUID, RecordedEvent] = {}
        versions: dict[str, int] = {}
        result: list[list[int]] = []
        for item in appends:
            stream = item.stream
            current = versions.get(stream, len(self._streams.get(stream, ())))
            ids = [new.id for new in item.events]

            def stored(event_id: uuid.UUID, stream: str = stream) -> RecordedEvent | None:
                found = staged_ids.get(event_id) or self._by_id.get(event_id)
                return found if found is not None and found.stream == stream else None

            if item.expected_version not in (ANY_VERSION, current):
                # a conflict may be a re-send of an append that was written already
                resent = [stored(event_id) for event_id in ids]
                if any(found is None for found in resent):
                    raise WrongExpectedVersion(stream, item.expected_version, current)
                result.append([found.position for found in resent if found is not None])
                continue
            fresh = {event_id for event_id in ids if event_id not in staged_ids}
            fresh.difference_update(self._by_id)
            if len(fresh) == len(ids):
                position = staged[-1].position if staged else self._head
                for version, new in enumerate(item.events, current + 1):
                    position += 1
                    recorded = RecordedEvent(
                        new.id,
                        stream,
                        version,
                        position,
                        _EPOCH + timedelta(microseconds=new.at),
                        _decode(without_nul(_encode(new.event))),
                    )
                    staged.append(recorded)
                    staged_ids[new.id] = recorded
                versions[stream] = current + len(ids)
                result.append([position - len(ids) + n + 1 for n in range(len(ids))])
                continue
            resent = [stored(event_id) for event_id in ids] if not fresh else []
            if not resent or any(found is None for found in resent):
                raise StoreError(
                    f"an append to stream {stream} repeats an event id, or mixes new ids with"
                    " ids that are stored already (here or in another stream)"
                )
            result.append([found.position for found in resent if found is not None])
        self._commit(staged)
        return result

    def _commit(self, staged: list[RecordedEvent]) -> None:
        if not staged:
            return
        self._log.extend(staged)
        self._positions.extend(recorded.position for recorded in staged)
        for recorded in staged:
            self._streams.setdefault(recorded.stream, []).append(recorded)
            self._by_id[recorded.id] = recorded
        self._head = staged[-1].position
        appended, self._appended = self._appended, asyncio.Event()
        appended.set()

    async def head(self) -> int:
        return self._positions[-1] if self._positions else 0

    async def remove_stream(self, stream: str) -> int:
        removed = self._streams.pop(stream, [])
        if not removed:
            return 0
        gone = {recorded.id for recorded in removed}
        for event_id in gone:
            del self._by_id[event_id]
        self._log = [recorded for recorded in self._log if recorded.id not in gone]
        self._positions = [recorded.position for recorded in self._log]
        return len(removed)

    async def restore_stream(self, recorded: Sequence[RecordedEvent]) -> None:
        if not recorded:
            return
        stream = restorable(recorded)
        if stream in self._streams:
            raise StoreError(f"stream {stream} holds events again: it cannot be restored over")
        taken = set(self._positions)
        for event in recorded:
            if event.id in self._by_id or event.position in taken or event.position < 1:
                raise StoreError(
                    f"event {event.id} at position {event.position} of stream {stream}:"
                    " its id or position is taken"
                )
        self._streams[stream] = list(recorded)
        for event in recorded:
            self._by_id[event.id] = event
        self._log = sorted([*self._log, *recorded], key=_position)
        self._positions = [event.position for event in self._log]
        self._head = max(self._head, recorded[-1].position)

    async def stream_version(self, stream: str, *, through_position: int | None = None) -> int:
        events = self._streams.get(stream, [])
        if through_position is None:
            return len(events)
        return bisect.bisect_right(events, through_position, key=_position)

    async def read_stream(
        self,
        stream: str,
        after_version: int = 0,
        *,
        after_position: int = 0,
        through_position: int | None = None,
        limit: int | None = None,
    ) -> list[RecordedEvent]:
        found = [
            recorded
            for recorded in self._streams.get(stream, [])[max(after_version, 0) :]
            if recorded.position > after_position
            and (through_position is None or recorded.position <= through_position)
        ]
        return found if limit is None else found[: max(limit, 0)]

    async def first_events(self, streams: Sequence[str]) -> dict[str, RecordedEvent]:
        return {stream: self._streams[stream][0] for stream in streams if stream in self._streams}

    async def last_events(self, streams: Sequence[str]) -> dict[str, RecordedEvent]:
        return {stream: self._streams[stream][-1] for stream in streams if stream in self._streams}

    async def read_all(
        self,
        after_position: int = 0,
        limit: int = 1000,
        *,
        through_position: int | None = None,
        types: Collection[str] | None = None,
    ) -> list[RecordedEvent]:
        start = bisect.bisect_right(self._positions, after_position)
        end = (
            len(self._positions)
            if through_position is None
            else bisect.bisect_right(self._positions, through_position)
        )
        if types is None:
            return self._log[start:end][: max(limit, 0)]
        wanted = frozenset(types)
        found: list[RecordedEvent] = []
        for recorded in self._log[start:end]:
            if len(found) >= limit:
                break
            if recorded.type in wanted:
                found.append(recorded)
        return found

    async def list_streams(self, prefix: str, limit: int = 50) -> list[str]:
        # newest first: by the position of a stream's first event
        named = [events[0] for name, events in self._streams.items() if name.startswith(prefix)]
        named.sort(key=lambda first: first.position, reverse=True)
        return [first.stream for first in named[: max(limit, 0)]]

    def subscribe(
        self, after_position: int = 0, *, limit: int = 1000, idle: float = 1.0, pace: float = 0.0
    ) -> AsyncGenerator[list[RecordedEvent], None]:
        return tail(self, self._bell, after_position, limit=limit, idle=idle, pace=pace)

    async def _bell(self) -> asyncio.Event:
        return self._appended

    async def aclose(self) -> None:
        return None


def _position(recorded: RecordedEvent) -> int:
    return recorded.position


def _conforms(store: MemoryEventStore) -> EventStore:
    # never called: makes mypy check MemoryEventStore against the EventStore protocol
    return store
