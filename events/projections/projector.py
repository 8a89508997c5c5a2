"""The projector: the log, page by page, into the read tables, each page exactly once.

A page is applied in one transaction together with the checkpoint (the last position
applied): a crash or an error rolls back both, and the next attempt starts from the same
position. The checkpoint row is locked for the page, so projectors in several processes
(every ``baton run`` catches up at its end) take turns instead of applying a page twice.
Positions come from ``read_all``, which never passes over an event that a slower
transaction commits later (see baton_append in schema.sql), so nothing is skipped either.

Live, the projector LISTENs on the channel baton_append notifies at commit and catches up
when it rings; a timeout catches up anyway, in case a notice was lost with a connection.

The findings of events.projections.detect (flaky tests, slowdowns) are not the
projector's: a Detector follows it with a checkpoint of its own, so judging history never
holds up the read tables (``baton run`` waits for those).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

import asyncpg

from events.postgres import PostgresEventStore, driver_errors
from events.projections.page import READ_TABLES, apply_page
from events.store import StoreUnavailable
from events.types import RecordedEvent

CHANNEL = "baton_events"
"""Notified by baton_append when an append commits; the payload is its highest position."""
DEFAULT_NAME = "read-model"

PageHandler = Callable[[asyncpg.Connection, Sequence[RecordedEvent]], Awaitable[None]]
"""Applies a page inside the projector's transaction (after the read tables)."""

_LOCK = "INSERT INTO baton_projection_checkpoints (name) VALUES ($1) ON CONFLICT (name) DO NOTHING;"
_CHECKPOINT = "SELECT position FROM baton_projection_checkpoints WHERE name = $1 FOR UPDATE"
ADVANCE = (
    "UPDATE baton_projection_checkpoints SET position = $2, updated_at = now() WHERE name = $1"
)
_PROGRESS = (
    "WITH checkpoint AS (SELECT coalesce(max(position), 0) AS position"
    " FROM baton_projection_checkpoints WHERE name = $1)"
    " SELECT position, (SELECT count(*) FROM events e WHERE e.position > checkpoint.position)"
    " FROM checkpoint"
)
_log = logging.getLogger("baton.projections")


class Projector:
    """Keeps the read tables of ``store``'s database up to date with its log.

    A page's transaction holds the checkpoint's lock and does all its work on its one
    connection: the page is read through it too (``read_all_in_transaction``). Waiting for a
    second pooled connection while holding the lock would deadlock as soon as every pooled
    connection waits on the lock. ``handlers`` apply each page too, in the same
    transaction, after the read tables: a projection of another module, or a test's probe.

    One projector per process is enough: what else wants the read tables up to date (a run
    that ends in the service) waits for it to pass a position (``wait_until``) instead of
    projecting on its own.
    """

    def __init__(
        self,
        store: PostgresEventStore,
        *,
        name: str = DEFAULT_NAME,
        page_size: int = 1000,
        handlers: Sequence[PageHandler] = (),
    ) -> None:
        self._store = store
        self._name = name
        self._page_size = page_size
        self._handlers = tuple(handlers)
        self._seen = 0
        """The highest checkpoint this projector has seen committed (its own or another's)."""
        self._moved = asyncio.Event()

    @property
    def name(self) -> str:
        return self._name

    @property
    def store(self) -> PostgresEventStore:
        return self._store

    async def position(self) -> int:
        """The checkpoint: the last log position applied (0 before the first)."""
        with driver_errors(self._store.dsn):
            value: int | None = await self._store.pool.fetchval(
                "SELECT position FROM baton_projection_checkpoints WHERE name = $1", self._name
            )
        return value or 0

    async def behind(self) -> int:
        """How many events the log holds past the checkpoint (what ``catch_up`` would apply,
        give or take appends in flight)."""
        with driver_errors(self._store.dsn):
            count: int = await self._store.pool.fetchval(
                "SELECT count(*) FROM events WHERE position >"
                " coalesce((SELECT position FROM baton_projection_checkpoints WHERE name = $1), 0)",
                self._name,
            )
        return count

    async def progress(self) -> tuple[int, int]:
        """(``position``, ``behind``) in one query: what /health shows, at one pooled
        connection's cost."""
        with driver_errors(self._store.dsn):
            row = await self._store.pool.fetchrow(_PROGRESS, self._name)
        return int(row[0]), int(row[1])

    async def catch_up(self) -> int:
        """Apply every event after the checkpoint, a page per transaction; return how many.

        Raises StoreUnavailable/StoreError from the database; an error inside a page
        leaves that page's tables and checkpoint as they were, and propagates.
        """
        applied = 0
        while True:
            count = await self._step()
            if count == 0:
                return applied
            applied += count

    async def wait_until(self, position: int, *, within: float) -> bool:
        """Wait until this projector has seen the checkpoint reach ``position`` (the read
        tables hold everything up to it); False if that took longer than ``within`` s.

        Only a projector that runs (``serve``, or a ``catch_up`` of someone else's) moves;
        this waits on it, woken each time the checkpoint it sees advances.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while self._seen < position:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            moved = self._moved
            try:
                await asyncio.wait_for(moved.wait(), remaining)
            except TimeoutError:
                return self._seen >= position
        return True

    def _saw(self, position: int) -> None:
        if position > self._seen:
            self._seen = position
            moved, self._moved = self._moved, asyncio.Event()
            moved.set()

    async def _step(self) -> int:
        with driver_errors(self._store.dsn):
            async with self._store.pool.acquire() as conn, conn.transaction():
                position = await lock_checkpoint(conn, self._name)
                page = await self._store.read_all_in_transaction(conn, position, self._page_size)
                if page:
                    await apply_page(conn, page)
                    for handler in self._handlers:
                        await handler(conn, page)
                    await conn.execute(ADVANCE, self._name, page[-1].position)
        # committed: another projector's checkpoint (the lock waited for it), or this page's
        self._saw(page[-1].position if page else position)
        return len(page)

    async def rebuild(self) -> int:
        """Empty every read table and the checkpoint in one transaction, then catch up.

        Returns the number of events applied. Other projectors wait on the checkpoint row
        meanwhile, so none applies a page to tables that are being emptied.
        """
        with driver_errors(self._store.dsn):
            async with self._store.pool.acquire() as conn, conn.transaction():
                await lock_checkpoint(conn, self._name)
                await conn.execute(f"TRUNCATE {', '.join(READ_TABLES)}")
                await conn.execute(ADVANCE, self._name, 0)
        self._seen = 0
        return await self.catch_up()

    async def serve(
        self,
        *,
        fallback: float = 1.0,
        stop: asyncio.Event | None = None,
        then: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        """Catch up, then again whenever an append commits, until ``stop`` is set (or the
        task is cancelled). ``then`` runs after each catch-up: what follows the read tables
        (a Detector). Survives the database going away: it retries every few seconds and
        catches up once the database is back."""
        stop = stop or asyncio.Event()
        wake = asyncio.Event()
        listener: asyncpg.Connection | None = None

        def ring(*_: object) -> None:
            wake.set()

        try:
            while not stop.is_set():
                try:
                    if listener is None or listener.is_closed():
                        listener = await self._listen(ring)
                    wake.clear()  # before catching up: a notice during it means go again
                    await self.catch_up()
                    if then is not None:
                        await then()
                except StoreUnavailable as exc:
                    _log.warning("projector %s: %s; retrying", self._name, exc)
                    listener = None
                    wake.clear()
                await _first(wake, stop, within=fallback)
        finally:
            if listener is not None and not listener.is_closed():
                await listener.close()

    async def _listen(self, ring: Callable[..., None]) -> asyncpg.Connection:
        # a connection of its own: a pooled one goes back to the pool after every use
        with driver_errors(self._store.dsn):
            conn: asyncpg.Connection = await asyncpg.connect(self._store.dsn)
            await conn.add_listener(CHANNEL, ring)
        return conn


async def lock_checkpoint(conn: asyncpg.Connection, name: str) -> int:
    await conn.execute(_LOCK, name)
    position: int = await conn.fetchval(_CHECKPOINT, name)
    return position


async def _first(wake: asyncio.Event, stop: asyncio.Event, *, within: float) -> None:
    """Return when either event is set, or after ``within`` seconds."""
    waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stop.wait())]
    try:
        await asyncio.wait(waiters, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
