"""The projector: the log, page by page, into the read tables, each page exactly once.

A page is applied in one transaction together with the checkpoint (the last position
applied): a crash or an error rolls back both, and the next attempt starts from the same
position. The checkpoint row is locked for the page, so projectors in several processes
(every ``baton run`` catches up at its end) take turns instead of applying a page twice.
Pages come from the store (``read_all``, and live ``subscribe``), which never pass over an
event that a slower transaction commits later, so nothing is skipped either.

A page is read before its transaction takes the checkpoint's lock, never while holding it:
a transaction that holds the lock and waits for a second pooled connection deadlocks as
soon as every pooled connection waits on the lock (ten runs ending at once did, issue 9).
Under the lock the page is checked against the checkpoint: what another projector applied
meanwhile is left out, and a checkpoint that moved back (a rebuild) is read from again.

The findings of events.projections.detect (flaky tests, slowdowns) are not the
projector's: a Detector follows it with a checkpoint of its own, so judging history never
holds up the read tables (``baton run`` waits for those).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

import asyncpg

from events.postgres import PostgresEventStore, driver_errors
from events.projections.page import READ_TABLES, apply_page
from events.store import StoreUnavailable, next_page
from events.types import RecordedEvent

DEFAULT_NAME = "read-model"

PageHandler = Callable[[asyncpg.Connection, Sequence[RecordedEvent]], Awaitable[None]]
"""Applies a page inside the projector's transaction (after the read tables)."""

_LOCK = "INSERT INTO baton_projection_checkpoints (name) VALUES ($1) ON CONFLICT (name) DO NOTHING;"
_CHECKPOINT = "SELECT position FROM baton_projection_checkpoints WHERE name = $1 FOR UPDATE"
ADVANCE = (
    "UPDATE baton_projection_checkpoints SET position = $2, updated_at = now() WHERE name = $1"
)
_POSITION = "SELECT position FROM baton_projection_checkpoints WHERE name = $1"

PACE = 0.25
"""Seconds the projector lets events gather after a short page: a page costs a transaction
and a recomputation of each touched table row whatever its size, and events that trickle
in one run at a time made pages of a few events (bench/WORKERS.md: PostgreSQL's CPU grew
with a batch's wall time). The read tables lag the log by up to this much more."""
_log = logging.getLogger("baton.projections")


class Projector:
    """Keeps the read tables of ``store``'s database up to date with its log.

    A page's transaction holds the checkpoint's lock and does all its work on its one
    connection; the page was read before (see the module's docstring). ``handlers`` apply
    each page too, in the same transaction, after the read tables: a projection of another
    module, or a test's probe.

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
            value: int | None = await self._store.pool.fetchval(_POSITION, self._name)
        return value or 0

    async def behind(self) -> int:
        """How many events the log holds past the checkpoint (what ``catch_up`` would apply,
        give or take appends in flight)."""
        return (await self.progress())[1]

    async def progress(self) -> tuple[int, int]:
        """(``position``, ``behind``): what /health shows."""
        position = await self.position()
        return position, await self._store.count_after(position)

    async def catch_up(self) -> int:
        """Apply every event after the checkpoint, a page per transaction; return how many.

        Raises StoreUnavailable/StoreError from the database; an error inside a page
        leaves that page's tables and checkpoint as they were, and propagates.
        """
        applied, _ = await self._catch_up()
        return applied

    async def _catch_up(self) -> tuple[int, int]:
        """``catch_up``, and the checkpoint it reached."""
        applied = 0
        after = await self.position()
        while page := await self._store.read_all(after, self._page_size):
            count, after = await self._apply(after, page)
            applied += count
        self._saw(after)
        return applied, after

    async def _apply(self, after: int, page: Sequence[RecordedEvent]) -> tuple[int, int]:
        """Apply ``page``, the log's events after position ``after``, in one transaction with
        the checkpoint, leaving out what the checkpoint has passed. Returns how many it
        applied and the checkpoint then; one below ``after`` (moved back by a rebuild) means
        nothing was applied, and the log is to be read again from there."""
        with driver_errors(self._store.dsn):
            async with self._store.pool.acquire() as conn, conn.transaction():
                checkpoint = await lock_checkpoint(conn, self._name)
                # past ``after``, the page's events are every event up to its last: those
                # beyond the checkpoint are what follows it
                fresh = [e for e in page if e.position > checkpoint] if checkpoint >= after else []
                if fresh:
                    await apply_page(conn, fresh)
                    for handler in self._handlers:
                        await handler(conn, fresh)
                    checkpoint = fresh[-1].position
                    await conn.execute(ADVANCE, self._name, checkpoint)
        # committed: this page, or another projector's checkpoint (the lock waited for it)
        self._saw(checkpoint)
        return len(fresh), checkpoint

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
        pace: float = PACE,
        stop: asyncio.Event | None = None,
        then: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        """Catch up, then follow the log (``subscribe``), applying each page as it comes,
        until ``stop`` is set (or the task is cancelled). ``then`` runs after each page and
        each heartbeat: what follows the read tables (a Detector).

        Every heartbeat (``fallback`` seconds without an append) catches up too, from the
        checkpoint: after a page that failed, or a rebuild elsewhere, nothing waits for the
        next append. Survives the database going away: the subscription waits it out, and
        a page that fails for it is logged and caught up with later.
        """
        stop = stop or asyncio.Event()
        after = await self._first_catch_up(fallback, stop, then)
        if after is None:
            return
        subscription = self._store.subscribe(after, limit=self._page_size, idle=fallback, pace=pace)
        async with contextlib.aclosing(subscription) as pages:
            while (page := await next_page(pages, stop)) is not None:
                try:
                    if not page or (await self._apply(after, page))[1] < page[-1].position:
                        await self.catch_up()
                    if then is not None:
                        await then()
                except StoreUnavailable as exc:
                    _log.warning("projector %s: %s; retrying", self._name, exc)
                if page:
                    after = page[-1].position

    async def _first_catch_up(
        self, retry: float, stop: asyncio.Event, then: Callable[[], Awaitable[object]] | None
    ) -> int | None:
        """Catch up (and ``then``), every ``retry`` s until the database answers; the
        checkpoint reached, or None if ``stop`` was set first."""
        while not stop.is_set():
            try:
                _, checkpoint = await self._catch_up()
                if then is not None:
                    await then()
                return checkpoint
            except StoreUnavailable as exc:
                _log.warning("projector %s: %s; retrying", self._name, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), retry)
        return None


async def lock_checkpoint(conn: asyncpg.Connection, name: str) -> int:
    await conn.execute(_LOCK, name)
    position: int = await conn.fetchval(_CHECKPOINT, name)
    return position
