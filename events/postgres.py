"""The PostgreSQL event store (asyncpg): the EventStore contract on a real server.

Every append is one call of the ``baton_append`` function from schema.sql: one round trip,
one transaction, with the version checks, the idempotency check and the commit-order lock
on the server (see the comment there for why an advisory lock rather than xid8). This module
is the one boundary where driver errors become StoreError: nothing from asyncpg escapes.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from collections.abc import AsyncGenerator, Collection, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, NoReturn

import asyncpg
import msgspec

from events.errors import scrubbed
from events.migrations import apply_pending
from events.migrations import schema_sql as schema_sql  # re-exported: its home was here
from events.settings import mask_dsn, scrub_dsn
from events.store import (
    ANY_VERSION,
    EventStore,
    StoreError,
    StoreUnavailable,
    StreamAppend,
    WrongExpectedVersion,
    restorable,
    tail,
    without_nul,
)
from events.types import Event, RecordedEvent

# SQLSTATE classes that mean "the server cannot serve us now", not "the request is wrong":
# connection exceptions, insufficient resources, operator intervention (shutdown),
# invalid authorization, and a database that does not exist.
_UNAVAILABLE_CLASSES = ("08", "53", "57", "28")
_UNAVAILABLE_STATES = ("3D000",)
_CLOSE_TIMEOUT = 10.0
_LISTEN_TIMEOUT = 10.0

CHANNEL = "baton_events"
"""Notified by baton_append when an append commits; the payload is its highest position."""

_APPEND = (
    "SELECT baton_append($1::text[], $2::int[], $3::int[], $4::uuid[], $5::text[], $6, $7::int8[])"
)
# Reads are shaped for the client's CPU, the larger half of a 10,000-event read:
# - data as text: asyncpg decodes text in C, the jsonb codec below is a Python call a row;
# - read_stream leaves out the stream: the caller named it.
# recorded_at is read as a timestamptz: each event has its own (NewEvent.at), so there is no
# shared value to build once per append (reading integer microseconds and building the
# datetimes in Python measured the same, ~37 ms of client CPU for 10,000 events).
_READ_ALL = (
    "SELECT position, stream, version, event_id, recorded_at, data::text"
    " FROM events WHERE position > $1 ORDER BY position LIMIT $2"
)
_READ_STREAM = (
    "SELECT position, version, event_id, recorded_at, data::text"
    " FROM events WHERE stream = $1 AND version > $2 ORDER BY version"
)
_READ_STREAM_RANGE = (
    "SELECT position, version, event_id, recorded_at, data::text"
    " FROM events WHERE stream = $1 AND version > $2 AND position > $3"
    " AND ($4::int8 IS NULL OR position <= $4) ORDER BY version LIMIT $5"
)
_READ_ALL_WHERE = (
    "SELECT position, stream, version, event_id, recorded_at, data::text"
    " FROM events WHERE position > $1 AND ($3::int8 IS NULL OR position <= $3)"
    " AND ($4::text[] IS NULL OR type = ANY($4::text[])) ORDER BY position LIMIT $2"
)
_FIRST_EVENTS = (
    "SELECT position, stream, version, event_id, recorded_at, data::text"
    " FROM events WHERE stream = ANY($1::text[]) AND version = 1"
)
# baton_streams holds each stream's last version: one index probe a stream, no sort
_LAST_EVENTS = (
    "SELECT e.position, e.stream, e.version, e.event_id, e.recorded_at, e.data::text"
    " FROM baton_streams s JOIN events e ON e.stream = s.stream AND e.version = s.version"
    " WHERE s.stream = ANY($1::text[])"
)
_HEAD = "SELECT coalesce(max(position), 0) FROM events"
_COUNT_AFTER = "SELECT count(*) FROM events WHERE position > $1"
_STREAM_VERSION = "SELECT version FROM baton_streams WHERE stream = $1"
_STREAM_VERSION_AT = (
    "SELECT coalesce(max(version), 0) FROM events WHERE stream = $1 AND position <= $2"
)
_LIST_STREAMS = (
    "SELECT stream FROM baton_streams WHERE starts_with(stream, $1)"
    " ORDER BY first_position DESC LIMIT $2"
)


# Removal and restore take baton_append's commit-order lock (schema.sql, step 1): a reader
# by position never sees a half-removed or half-restored stream.
_APPEND_LOCK = "SELECT pg_advisory_xact_lock(7283540231093542001)"
_REMOVE = "DELETE FROM events WHERE stream = $1"
_FORGET_STREAM = "DELETE FROM baton_streams WHERE stream = $1"
_STREAM_EXISTS = "SELECT EXISTS (SELECT FROM baton_streams WHERE stream = $1)"
# OVERRIDING SYSTEM VALUE: the positions are the ones the identity drew when the events were
# first appended; ON CONFLICT DO NOTHING lets a taken id or position be counted, not raised
_RESTORE = (
    "INSERT INTO events (position, stream, version, event_id, type, recorded_at, data)"
    " OVERRIDING SYSTEM VALUE SELECT * FROM unnest($1::int8[], $2::text[], $3::int[],"
    " $4::uuid[], $5::text[], $6::timestamptz[], $7::jsonb[]) ON CONFLICT DO NOTHING"
)
_RESTORE_STREAM = (
    "INSERT INTO baton_streams (stream, version, first_position, created_at)"
    " VALUES ($1, $2, $3, $4)"
)
# a restore into another database than the one the events came from must not leave the
# identity below positions it holds: it would draw them again
_IDENTITY_PAST = (
    "SELECT setval(s, $1) FROM CAST(pg_get_serial_sequence('events', 'position') AS regclass)"
    " AS s WHERE $1 > coalesce(pg_sequence_last_value(s), 0)"
)

_decode_event = msgspec.json.Decoder(Event).decode
_encode_event = msgspec.json.Encoder().encode


async def apply_schema(conn: asyncpg.Connection) -> None:
    """Apply the steps of schema.sql the database lacks (events.migrations): idempotent, and
    safe when several processes start at once."""
    await apply_pending(conn)


def _quiet_driver_logs() -> None:
    """Keep asyncpg's log records from reaching a user who configured no logging.

    While the server restarts, the pool logs a traceback each time it fails to reopen its
    minimum of connections; with no handler anywhere, logging's last resort prints it to
    stderr in the middle of a run that then finishes fine. A NullHandler stops that, and an
    application that configures logging still receives the records (they propagate).
    """
    logger = logging.getLogger("asyncpg")
    if not any(isinstance(handler, logging.NullHandler) for handler in logger.handlers):
        logger.addHandler(logging.NullHandler())


async def _keep_session(conn: asyncpg.Connection) -> None:
    # asyncpg's default reset (UNLISTEN, RESET ALL, advisory unlock, CLOSE ALL) is one more
    # round trip on every release: ~0.15 ms on a 0.2 ms stream_version, and a sixth of the
    # service's CPU per context read (bench/API.md). Nothing Baton runs on a pooled
    # connection leaves session state behind: settings are transaction-local (set_config's
    # is_local), advisory locks transaction-scoped, and LISTEN has connections of its own.
    # asyncpg has rolled back any open transaction before calling this.
    return None


class _GcPause:
    """Holds the cyclic collector off while rows are fetched and become events.

    A 10,000-event read allocates ~50,000 tracked objects (asyncpg's records, then the
    events), which sets off dozens of collections, now and then a full one that walks every
    object of the process. Measured on such a read: client CPU p50 26 -> 22 ms and p90 44
    -> 33 ms without them. Nothing a read allocates is garbage, and the pause lasts one
    query. Reads may overlap (it spans the await): the first in turns the collector off,
    the last out turns it back on, if it was on before the first.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._resume = False

    def __enter__(self) -> None:
        with self._lock:
            if self._depth == 0:
                self._resume = gc.isenabled()
                gc.disable()
            self._depth += 1

    def __exit__(self, *_: object) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0 and self._resume:
                gc.enable()


_gc_paused = _GcPause()


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb in binary format is a version byte and the JSON text: hand msgspec's bytes to the
    # server and the server's bytes to msgspec with no json.loads/dumps or str in between.
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=lambda data: b"\x01" + data,
        decoder=lambda data: data[1:],
        format="binary",
    )


class PostgresEventStore:
    """EventStore on PostgreSQL. Build it with ``await PostgresEventStore.connect(dsn)``."""

    def __init__(self, pool: asyncpg.Pool, dsn: str) -> None:
        self._pool = pool
        self._dsn = dsn

    @classmethod
    async def connect(
        cls, dsn: str, *, min_size: int = 1, max_size: int = 10, connect_timeout: float = 10.0
    ) -> PostgresEventStore:
        """Open a connection pool to ``dsn`` and apply schema.sql.

        Raises StoreUnavailable, naming the DSN with its password masked, when the server
        cannot be reached within ``connect_timeout`` seconds or refuses the connection.
        """
        _quiet_driver_logs()
        store_errors = _ErrorTranslator(dsn)
        try:
            with store_errors():
                pool = await asyncpg.create_pool(
                    dsn,
                    min_size=min_size,
                    max_size=max_size,
                    timeout=connect_timeout,
                    init=_init_connection,
                    reset=_keep_session,
                )
        except ValueError as exc:
            reason = store_errors.scrub(str(exc))
            raise StoreUnavailable(
                f"invalid database URL {mask_dsn(dsn)}: {reason}"
            ) from store_errors.cause(exc)
        try:
            with store_errors():
                async with pool.acquire() as conn:
                    await apply_schema(conn)
        except BaseException:
            pool.terminate()
            raise
        return cls(pool, dsn)

    @property
    def pool(self) -> asyncpg.Pool:
        """The connection pool, for other parts of ``events`` that query the same database.

        A connection borrowed from it is reset as asyncpg does by default when it returns.
        """
        return self._pool

    @property
    def dsn(self) -> str:
        return self._dsn

    async def append(self, appends: Sequence[StreamAppend]) -> list[list[int]]:
        arguments, counts = _append_arguments(appends)
        if not counts:
            return []
        with _ErrorTranslator(self._dsn)():
            flat: list[int] = await self._pool.fetchval(_APPEND, *arguments)
        return _per_append(flat, counts)

    async def append_with(
        self, appends: Sequence[StreamAppend], ctes: str, *params: Any
    ) -> list[list[int]]:
        """``append`` in one statement with ``ctes``: data-modifying WITH queries (their
        parameters numbered from $8) that commit or roll back with the events, at no round
        trip more (events.owners claims and releases runs so)."""
        arguments, counts = _append_arguments(appends)
        if not counts:
            return []
        with _ErrorTranslator(self._dsn)():
            flat: list[int] = await self._pool.fetchval(
                f"WITH {ctes} {_APPEND}", *arguments, *params
            )
        return _per_append(flat, counts)

    async def append_in_transaction(
        self, conn: asyncpg.Connection, appends: Sequence[StreamAppend]
    ) -> list[list[int]]:
        """``append`` on ``conn`` (a connection of this store's pool, in a transaction of the
        caller's): the events commit or roll back with whatever else that transaction writes.

        The append takes the commit-order lock, which every append waits for, and it is held
        until the caller's transaction ends: append last, then commit, with nothing between
        that waits on a lock another append could hold (see Projector for the reasoning).
        """
        arguments, counts = _append_arguments(appends)
        if not counts:
            return []
        with _ErrorTranslator(self._dsn)():
            flat: list[int] = await conn.fetchval(_APPEND, *arguments)
        return _per_append(flat, counts)

    async def read_stream(
        self,
        stream: str,
        after_version: int = 0,
        *,
        after_position: int = 0,
        through_position: int | None = None,
        limit: int | None = None,
    ) -> list[RecordedEvent]:
        decode = _decode_event
        recorded = RecordedEvent
        with _gc_paused:
            with _ErrorTranslator(self._dsn)():
                if after_position == 0 and through_position is None and limit is None:
                    rows = await self._pool.fetch(_READ_STREAM, stream, after_version)
                else:
                    # LIMIT NULL is no limit
                    rows = await self._pool.fetch(
                        _READ_STREAM_RANGE,
                        stream,
                        after_version,
                        after_position,
                        through_position,
                        limit,
                    )
            # positional arguments, in RecordedEvent's field order: id, stream, version,
            # position, recorded_at, event
            return [
                recorded(event_id, stream, version, position, at, decode(data))
                for position, version, event_id, at, data in rows
            ]

    async def head(self) -> int:
        with _ErrorTranslator(self._dsn)():
            position: int = await self._pool.fetchval(_HEAD)
        return position

    async def count_after(self, after_position: int) -> int:
        """How many events the log holds after ``after_position`` (a projector's lag)."""
        with _ErrorTranslator(self._dsn)():
            count: int = await self._pool.fetchval(_COUNT_AFTER, after_position)
        return count

    async def first_events(self, streams: Sequence[str]) -> dict[str, RecordedEvent]:
        return await self._by_stream(_FIRST_EVENTS, streams)

    async def last_events(self, streams: Sequence[str]) -> dict[str, RecordedEvent]:
        return await self._by_stream(_LAST_EVENTS, streams)

    async def _by_stream(self, query: str, streams: Sequence[str]) -> dict[str, RecordedEvent]:
        if not streams:
            return {}
        with _ErrorTranslator(self._dsn)():
            rows = await self._pool.fetch(query, list(streams))
        return {
            stream: RecordedEvent(event_id, stream, version, position, at, _decode_event(data))
            for position, stream, version, event_id, at, data in rows
        }

    async def read_all(
        self,
        after_position: int = 0,
        limit: int = 1000,
        *,
        through_position: int | None = None,
        types: Collection[str] | None = None,
    ) -> list[RecordedEvent]:
        decode = _decode_event
        recorded = RecordedEvent
        with _gc_paused:
            with _ErrorTranslator(self._dsn)():
                if through_position is None and types is None:
                    rows = await self._pool.fetch(_READ_ALL, after_position, limit)
                else:
                    rows = await self._pool.fetch(
                        _READ_ALL_WHERE,
                        after_position,
                        limit,
                        through_position,
                        None if types is None else list(types),
                    )
            return [
                recorded(event_id, stream, version, position, at, decode(data))
                for position, stream, version, event_id, at, data in rows
            ]

    async def stream_version(self, stream: str, *, through_position: int | None = None) -> int:
        with _ErrorTranslator(self._dsn)():
            if through_position is None:
                version: int | None = await self._pool.fetchval(_STREAM_VERSION, stream)
            else:
                version = await self._pool.fetchval(_STREAM_VERSION_AT, stream, through_position)
        return version or 0

    async def remove_stream(self, stream: str) -> int:
        with _ErrorTranslator(self._dsn)():
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(_APPEND_LOCK)
                status: str = await conn.execute(_REMOVE, stream)
                await conn.execute(_FORGET_STREAM, stream)
        return int(status.rsplit(" ", 1)[-1])

    async def restore_stream(self, recorded: Sequence[RecordedEvent]) -> None:
        if not recorded:
            return
        stream = restorable(recorded)
        columns = (
            [event.position for event in recorded],
            [stream] * len(recorded),
            [event.version for event in recorded],
            [event.id for event in recorded],
            [event.type for event in recorded],
            [event.recorded_at for event in recorded],
            [without_nul(_encode_event(event.event)) for event in recorded],
        )
        with _ErrorTranslator(self._dsn)():
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(_APPEND_LOCK)
                if await conn.fetchval(_STREAM_EXISTS, stream):
                    raise StoreError(
                        f"stream {stream} holds events again: it cannot be restored over"
                    )
                status: str = await conn.execute(_RESTORE, *columns)
                if int(status.rsplit(" ", 1)[-1]) != len(recorded):
                    raise StoreError(
                        f"some events of stream {stream} have an id or a position that is"
                        " taken: nothing was restored"
                    )
                first = recorded[0]
                await conn.execute(
                    _RESTORE_STREAM, stream, len(recorded), first.position, first.recorded_at
                )
                await conn.fetchval(_IDENTITY_PAST, recorded[-1].position)

    async def list_streams(self, prefix: str, limit: int = 50) -> list[str]:
        with _ErrorTranslator(self._dsn)():
            rows = await self._pool.fetch(_LIST_STREAMS, prefix, limit)
        return [row[0] for row in rows]

    async def subscribe(
        self, after_position: int = 0, *, limit: int = 1000, idle: float = 1.0, pace: float = 0.0
    ) -> AsyncGenerator[list[RecordedEvent], None]:
        doorbell = _Doorbell(self._dsn)
        pages = tail(self, doorbell.arm, after_position, limit=limit, idle=idle, pace=pace)
        try:
            async for page in pages:
                yield page
        finally:
            await doorbell.aclose()

    async def aclose(self) -> None:
        if self._pool.is_closing():
            return
        try:
            with _ErrorTranslator(self._dsn)():
                # close() waits for connections in use; a stuck one must not hang the exit
                await asyncio.wait_for(self._pool.close(), _CLOSE_TIMEOUT)
        except StoreUnavailable:
            self._pool.terminate()


class _Doorbell:
    """A subscription's LISTEN on CHANNEL, on a connection of its own (a pooled one goes
    back to the pool after every use), opened again when it is lost. Losing it rings too:
    the subscription then reads, and an append it missed meanwhile is read then."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._rung = asyncio.Event()
        self._conn: asyncpg.Connection | None = None

    async def arm(self) -> asyncio.Event:
        if self._conn is None or self._conn.is_closed():
            self._conn = None
            with _ErrorTranslator(self._dsn)():
                conn: asyncpg.Connection = await asyncpg.connect(self._dsn, timeout=_LISTEN_TIMEOUT)
                try:
                    await conn.add_listener(CHANNEL, self._ring)
                except BaseException:
                    conn.terminate()
                    raise
            conn.add_termination_listener(self._ring)
            self._conn = conn
        self._rung.clear()
        return self._rung

    def _ring(self, *_: object) -> None:
        self._rung.set()

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None or conn.is_closed():
            return
        try:
            await conn.close(timeout=_CLOSE_TIMEOUT)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            conn.terminate()


def _append_arguments(appends: Sequence[StreamAppend]) -> tuple[list[Any], list[int]]:
    """The arrays of one baton_append call (see schema.sql), and the events per append."""
    streams: list[str] = []
    expected: list[int] = []
    counts: list[int] = []
    ids: list[Any] = []
    types: list[str] = []
    data: list[bytes] = []
    times: list[int] = []
    for item in appends:
        if item.expected_version < ANY_VERSION:
            raise ValueError(f"expected_version {item.expected_version} is not a version")
        streams.append(item.stream)
        expected.append(item.expected_version)
        counts.append(len(item.events))
        # comprehensions and the encoder's own method: ~40% less CPU than a call of
        # event_type, encode and without_nul per event
        events = [new.event for new in item.events]
        ids += [new.id for new in item.events]
        times += [new.at for new in item.events]
        types += [type(event).__name__ for event in events]
        data += [_encode_event(event) for event in events]
    if b"\\u0000" in b"".join(data):  # one scan; each document is whole, none spans two
        data = [without_nul(item) for item in data]
    return [streams, expected, counts, ids, types, data, times], counts


def _per_append(flat: list[int], counts: list[int]) -> list[list[int]]:
    """baton_append's flat positions, split back into one list per append."""
    result: list[list[int]] = []
    start = 0
    for count in counts:
        result.append(flat[start : start + count])
        start += count
    return result


def driver_errors(dsn: str) -> AbstractContextManager[None]:
    """Within the block, asyncpg errors become StoreError/StoreUnavailable, as in the store
    (for the other modules of ``events`` that talk to PostgreSQL)."""
    return _ErrorTranslator(dsn)()


class _VersionConflict(msgspec.Struct):
    stream: str
    expected: int
    actual: int


class _ErrorTranslator:
    """Turns driver errors into the store's errors; the DSN's password never shows."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn

    @contextmanager
    def __call__(self) -> Iterator[None]:
        try:
            yield
        except asyncpg.PostgresError as exc:
            self._postgres_error(exc)
        except (OSError, TimeoutError) as exc:
            self._unavailable(exc)
        except (asyncpg.InterfaceError, asyncpg.InternalClientError) as exc:
            # a closed connection or pool, or an invalid DSN: no server to talk to
            self._unavailable(exc)

    def _postgres_error(self, exc: asyncpg.PostgresError) -> NoReturn:
        state: str = exc.sqlstate or ""
        if state == "BT001":
            conflict = msgspec.json.decode(exc.detail or "{}", type=_VersionConflict)
            raise WrongExpectedVersion(
                conflict.stream, conflict.expected, conflict.actual
            ) from self.cause(exc)
        if state == "BT002":
            raise StoreError(str(exc.args[0] if exc.args else exc)) from self.cause(exc)
        if state[:2] in _UNAVAILABLE_CLASSES or state in _UNAVAILABLE_STATES:
            self._unavailable(exc)
        raise StoreError(f"PostgreSQL error {state}: {self.scrub(str(exc))}") from self.cause(exc)

    def _unavailable(self, exc: BaseException) -> NoReturn:
        reason = self.scrub(str(exc)) or type(exc).__name__
        raise StoreUnavailable(
            f"PostgreSQL at {mask_dsn(self._dsn)} is unavailable: {reason}"
        ) from self.cause(exc)

    def scrub(self, text: str) -> str:
        return scrub_dsn(text, self._dsn)

    def cause(self, exc: BaseException) -> BaseException:
        """The driver's error to chain, the DSN's password masked in what it says."""
        return scrubbed(exc, self.scrub)


def _conforms(store: PostgresEventStore) -> EventStore:
    # never called: makes mypy check PostgresEventStore against the EventStore protocol
    return store
