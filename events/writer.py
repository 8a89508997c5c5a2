"""Batched appends for the hot path: emit without waiting, flush when it must be durable.

One writer owns the streams it writes (a run's stream belongs to the process running it),
so it tracks each stream's version itself and every append carries the version it
expects. Events emitted while an append is in flight go out together in the next one,
so the batch size follows the load. A failed append is retried with the same event ids,
which the store makes harmless.

While the store is unreachable the writer holds what is pending and keeps trying, and
``writable`` blocks: the runs wait there before each request, so they pause instead of
sending requests whose events could not be stored. They resume when an append goes
through again. After ``max_wait`` seconds without one the writer gives up: every call
raises StoreUnavailable, saying so. Only stored events reach ``on_stored`` (the console's
progress), so nothing is shown as done that the log does not hold.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Protocol

from events.errors import StoreError, StoreUnavailable
from events.errors import WriterClosed as WriterClosed
from events.store import NewEvent, StreamAppend
from events.types import Event

_RETRY_DELAYS = (0.05, 0.1, 0.2, 0.5, 1.0)
"""Between attempts while the store is unreachable; the last one repeats."""
DEFAULT_MAX_WAIT = 60.0


class Appender(Protocol):
    """What the writer appends through: an EventStore, or an events.owners.Owner."""

    async def append(self, appends: Sequence[StreamAppend]) -> list[list[int]]: ...


Stored = Callable[[str, Event, int], None]
"""Called with (stream, event, its log position) for every event once it is stored, in the
order emitted."""


class BatchingWriter:
    def __init__(
        self,
        store: Appender,
        *,
        max_batch: int = 5000,
        max_wait: float = DEFAULT_MAX_WAIT,
        on_stored: Stored | None = None,
    ) -> None:
        self._store = store
        self._max_batch = max_batch
        self._max_wait = max_wait
        self._on_stored = on_stored
        self._pending: list[tuple[str, NewEvent]] = []
        self._versions: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._writable = asyncio.Event()
        self._writable.set()
        self._error: StoreError | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.position = 0
        """The highest log position this writer has stored (0 before its first append)."""

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

    def resume(self, stream: str, version: int) -> None:
        """Append to ``stream`` after the ``version`` events another writer stored (a run a
        dead worker began): this writer owns it from there on."""
        self._versions[stream] = version

    async def writable(self) -> None:
        """Return at once while the store takes appends; while it is unreachable, wait until
        it takes them again. Raises the store's error once the writer has given up."""
        if not self._writable.is_set():
            await self._writable.wait()
        if self._error is not None:
            raise self._error

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
                try:
                    await self._append(batch)
                except StoreError as exc:
                    self._fail(exc)
                except Exception as exc:  # an observer's bug: end the writer, not silently
                    self._fail(StoreError(f"the event writer failed: {exc!r}"))
                else:
                    del self._pending[: len(batch)]
            self._idle.set()

    def _fail(self, error: StoreError) -> None:
        # nothing pending was acknowledged: flush and emit raise from now on
        self._error = error
        self._pending.clear()
        self._writable.set()

    async def _append(self, batch: Sequence[tuple[str, NewEvent]]) -> None:
        by_stream: dict[str, list[NewEvent]] = {}
        for stream, event in batch:
            by_stream.setdefault(stream, []).append(event)
        appends = [
            StreamAppend(stream, events, self._versions.get(stream, 0))
            for stream, events in by_stream.items()
        ]
        positions = await self._append_until_stored(appends)
        for append in appends:
            self._versions[append.stream] = append.expected_version + len(append.events)
        self.position = max([self.position, *(p for group in positions for p in group)])
        if self._on_stored is not None:
            # the store answers each append's positions in the order of its events
            placed = {
                append.stream: iter(at) for append, at in zip(appends, positions, strict=True)
            }
            for stream, new in batch:
                self._on_stored(stream, new.event, next(placed[stream]))

    async def _append_until_stored(self, appends: list[StreamAppend]) -> list[list[int]]:
        loop = asyncio.get_running_loop()
        since: float | None = None
        attempt = 0
        while True:
            try:
                positions = await self._store.append(appends)
            except StoreUnavailable as exc:
                now = loop.time()
                if since is None:
                    since = now
                    self._writable.clear()  # the runs pause before their next request
                if now - since >= self._max_wait:
                    raise StoreUnavailable(
                        f"the event store was unreachable for {self._max_wait:g} s"
                        f" (BATON_STORE_WAIT), so the runs stopped: {exc}"
                    ) from exc
                delay = _RETRY_DELAYS[min(attempt, len(_RETRY_DELAYS) - 1)]
                attempt += 1
                await asyncio.sleep(min(delay, self._max_wait - (now - since)))
            else:
                self._writable.set()
                return positions


class GroupAppends:
    """One append at a time to ``store`` for many writers: what they ask for while one is in
    flight goes out together in the next (group commit).

    The service gives every run a writer of its own; fifty runs ending at once would be
    fifty small appends, each taking the store's commit-order lock and a WAL flush in turn
    while every pooled connection waits, /health's too. Each writer has at most one
    append in flight and owns its streams, so a group never holds a stream twice. A group
    the store refuses (a conflict of one writer) is retried one writer at a time, so only
    that writer sees the error; an unreachable store fails every writer of the group, and
    each retries on its own.
    """

    def __init__(self, store: Appender) -> None:
        self._store = store
        self._queue: list[tuple[Sequence[StreamAppend], asyncio.Future[list[list[int]]]]] = []
        self._task: asyncio.Task[None] | None = None

    async def append(self, appends: Sequence[StreamAppend]) -> list[list[int]]:
        done: asyncio.Future[list[list[int]]] = asyncio.get_running_loop().create_future()
        self._queue.append((appends, done))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain(), name="baton-group-appends")
        return await done

    async def _drain(self) -> None:
        while self._queue:
            group, self._queue = self._queue, []
            try:
                positions = await self._store.append([a for appends, _ in group for a in appends])
            except (StoreUnavailable, asyncio.CancelledError) as exc:
                for _, done in group:
                    _settle(done, error=exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
            except StoreError:
                for appends, done in group:
                    try:
                        _settle(done, await self._store.append(appends))
                    except StoreError as exc:
                        _settle(done, error=exc)
            else:
                start = 0
                for appends, done in group:
                    _settle(done, positions[start : start + len(appends)])
                    start += len(appends)


def _settle(
    done: asyncio.Future[list[list[int]]],
    result: list[list[int]] | None = None,
    *,
    error: BaseException | None = None,
) -> None:
    if done.done():  # its writer was cancelled meanwhile
        return
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(result or [])
