"""Batched appends for the hot path: emit without waiting, flush when it must be durable.

One writer owns the streams it writes (a run's stream belongs to the process running it),
so it tracks each stream's version itself and every append carries the version it
expects. Events emitted while an append is in flight go out together in the next one,
so the batch size follows the load. A failed append is retried with the same event ids,
which the store makes harmless.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from events.store import EventStore, NewEvent, StoreError, StoreUnavailable, StreamAppend
from events.types import Event

_RETRY_DELAYS = (0.05, 0.2, 0.5, 1.0, 2.0)


class WriterClosed(StoreError):
    pass


class BatchingWriter:
    def __init__(self, store: EventStore, *, max_batch: int = 5000) -> None:
        self._store = store
        self._max_batch = max_batch
        self._pending: list[tuple[str, NewEvent]] = []
        self._versions: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._error: StoreError | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def emit(self, stream: str, event: Event, at: int | None = None) -> None:
        """Queue an event for its stream, stamped with when it happened: ``at`` (microseconds
        since the Unix epoch) or now. Raises the store's error if an append failed."""
        if self._error is not None:
            raise self._error
        if self._closed:
            raise WriterClosed("the event writer is closed")
        self._pending.append((stream, NewEvent(event) if at is None else NewEvent(event, at=at)))
        self._idle.clear()
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="baton-event-writer")

    async def flush(self) -> None:
        """Wait until everything emitted so far is stored; raise the store's error if not."""
        if self._pending or not self._idle.is_set():
            await self._idle.wait()
        if self._error is not None:
            raise self._error

    async def aclose(self) -> None:
        try:
            await self.flush()
        finally:
            self._closed = True
            if self._task is not None:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending and self._error is None:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                try:
                    await self._append(batch)
                except StoreError as exc:
                    self._error = exc
                    self._pending.clear()
            self._idle.set()

    async def _append(self, batch: Sequence[tuple[str, NewEvent]]) -> None:
        by_stream: dict[str, list[NewEvent]] = {}
        for stream, event in batch:
            by_stream.setdefault(stream, []).append(event)
        appends = [
            StreamAppend(stream, events, self._versions.get(stream, 0))
            for stream, events in by_stream.items()
        ]
        for delay in (*_RETRY_DELAYS, None):
            try:
                await self._store.append(appends)
                break
            except StoreUnavailable:
                if delay is None:
                    raise
                await asyncio.sleep(delay)
        for append in appends:
            self._versions[append.stream] = append.expected_version + len(append.events)
