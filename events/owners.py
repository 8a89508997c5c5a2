"""Who runs a run: every process that writes runs is an owner, and it has a heartbeat.

An owner is a row of ``baton_owners`` (schema.sql step 10) that its process beats every
``timeout / 9`` seconds. The owner's appends (``Owner.append``, what its event writers
call) claim a run in the statement that stores its RunStarted and release it in the one
that stores its RunCompleted or RunCancelled: a claim exists exactly while the run is open
in the log, and no moment exists where a run is open and unclaimed.

A sweep ends the open runs of every owner that has not beaten for ``timeout`` seconds,
or whose row is gone: RunCancelled with the reason "interrupted". Every owner sweeps when
it starts and after every beat, so several service instances and ``baton run`` processes
share one database safely: only the runs of the gone are ended, whoever notices first.
The timeout must outlast the longest pause for an unreachable store (BATON_STORE_WAIT):
a process paused through an outage beats again as soon as the store is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Sequence

from events.postgres import PostgresEventStore, driver_errors
from events.store import NewEvent, StoreError, StreamAppend
from events.types import RunCancelled, RunCompleted, RunStarted

INTERRUPTED = "interrupted"
"""The reason of the RunCancelled that ends a run whose owner is gone."""
_RUN_PREFIX = "run-"

_BEAT = (
    "INSERT INTO baton_owners (id, host, pid) VALUES ($1, $2, $3)"
    " ON CONFLICT (id) DO UPDATE SET beat_at = now()"
)
_LEAVE = "DELETE FROM baton_owners WHERE id = $1"
# with the append, in its statement (PostgresEventStore.append_with): $8 the runs that
# start, $9 those that end, $10 the owner
_CLAIM_AND_RELEASE = (
    "claimed AS (INSERT INTO baton_run_owners (stream, owner) SELECT unnest($8::text[]), $10"
    " ON CONFLICT (stream) DO NOTHING),"
    " released AS (DELETE FROM baton_run_owners WHERE stream = ANY($9::text[]))"
)
_ADOPT = "UPDATE baton_run_owners SET owner = $2, claimed_at = now() WHERE stream = $1"
_RELEASE = "DELETE FROM baton_run_owners WHERE stream = ANY($1::text[])"
# runs of owners gone quiet (or gone), and this owner's abandoned ones, locked for this
# sweep; another sweeper skips them
_ORPHANS = """
SELECT r.stream FROM baton_run_owners r LEFT JOIN baton_owners o ON o.id = r.owner
WHERE (r.owner <> $1 AND (o.id IS NULL OR o.beat_at < now() - make_interval(secs => $2)))
   OR (r.owner = $1 AND r.stream = ANY($4::text[]))
ORDER BY r.stream LIMIT $3 FOR UPDATE OF r SKIP LOCKED
"""
_FORGET_QUIET = (
    "DELETE FROM baton_owners o WHERE o.beat_at < now() - make_interval(secs => $1)"
    " AND NOT EXISTS (SELECT FROM baton_run_owners r WHERE r.owner = o.id)"
)
_ENDS = frozenset({RunCompleted.__name__, RunCancelled.__name__})
_SWEEP_PAGE = 500

_log = logging.getLogger("baton.owners")


class Owner:
    """This process as the owner of the runs it writes; ``start`` it, ``aclose`` it."""

    def __init__(self, store: PostgresEventStore, *, timeout: float) -> None:
        self.id = uuid.uuid4()
        self._store = store
        self._timeout = timeout
        self._interval = timeout / 9
        self._task: asyncio.Task[None] | None = None
        self._abandoned: set[str] = set()

    @property
    def store(self) -> PostgresEventStore:
        return self._store

    async def start(self) -> list[str]:
        """Beat once, end the runs of owners that are gone, then keep beating (and sweeping)
        in the background. Returns the streams of the runs it ended. Raises StoreError."""
        await self.beat()
        ended = await self.sweep()
        self._task = asyncio.create_task(self._beating(), name="baton-owner-heartbeat")
        return ended

    async def beat(self) -> None:
        with driver_errors(self._store.dsn):
            await self._store.pool.execute(_BEAT, self.id, socket.gethostname(), os.getpid())

    def abandon(self, stream: str) -> None:
        """A run of this owner that cannot go on (its events could not be stored): the next
        sweep that reaches the store ends it as interrupted, as if its owner were gone."""
        self._abandoned.add(stream)

    async def sweep(self) -> list[str]:
        """End every open run whose owner has not beaten for the timeout: RunCancelled
        "interrupted". Returns their streams."""
        ended: list[str] = []
        while True:
            page = await self._sweep_page()
            ended.extend(page)
            if len(page) < _SWEEP_PAGE:
                break
        if ended:
            _log.warning("ended %d run(s) whose owner stopped beating", len(ended))
        return ended

    async def _sweep_page(self) -> list[str]:
        with driver_errors(self._store.dsn):
            async with self._store.pool.acquire() as conn, conn.transaction():
                abandoned = sorted(self._abandoned)
                rows = await conn.fetch(_ORPHANS, self.id, self._timeout, _SWEEP_PAGE, abandoned)
                streams = [row[0] for row in rows]
                if not streams:
                    await conn.execute(_FORGET_QUIET, self._timeout)
                    return []
                # read on another pooled connection while this one holds the claims' locks:
                # what waits on those is an append that ends one of these runs, and none
                # comes from this pool (their owners went quiet, or this owner gave them up)
                last = await self._store.last_events(streams)
                await conn.execute(_RELEASE, streams)
                # a claim without events cannot happen (it commits with RunStarted), and an
                # owner may die between storing a run's end and its next beat: end only the
                # open ones, each at the version it has, so a late write of the old owner
                # fails instead of adding to an ended run
                interrupted = RunCancelled(reason=INTERRUPTED)
                appends = [
                    StreamAppend(stream, [NewEvent(interrupted)], last[stream].version)
                    for stream in streams
                    if stream in last and last[stream].type not in _ENDS
                ]
                # last in the transaction: the append holds the commit-order lock to the end
                await self._store.append_in_transaction(conn, appends)
        self._abandoned.difference_update(abandoned)  # ended, or not open any more
        return [append.stream for append in appends]

    async def append(self, appends: Sequence[StreamAppend]) -> list[list[int]]:
        """``EventStore.append``, claiming the runs that start in it and releasing the runs
        that end in it, in the same transaction."""
        started: set[str] = set()
        ended: set[str] = set()
        for append in appends:
            if not append.stream.startswith(_RUN_PREFIX):
                continue
            for new in append.events:
                if isinstance(new.event, RunStarted):
                    started.add(append.stream)
                elif isinstance(new.event, RunCompleted | RunCancelled):
                    ended.add(append.stream)
        claim, release = started - ended, ended - started
        if not claim and not release:
            return await self._store.append(appends)
        # one statement, one round trip: the claims commit with the events or not at all
        return await self._store.append_with(
            appends, _CLAIM_AND_RELEASE, sorted(claim), sorted(release), self.id
        )

    async def _beating(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.beat()
                await self.sweep()
            except StoreError as exc:
                # unreachable: the writers pause meanwhile; beat again at the next tick
                _log.info("owner heartbeat: %s", exc)

    async def adopt(self, stream: str) -> bool:
        """Take over the claim on an open run whose owner stopped (a ``baton worker`` killed
        mid-job, whose job another worker now has): the sweep no longer ends it. False if
        no owner holds it: it has ended, or it never started."""
        with driver_errors(self._store.dsn):
            result = await self._store.pool.execute(_ADOPT, stream, self.id)
        return bool(result != "UPDATE 0")

    async def stop(self) -> None:
        """Stop beating without leaving: the runs still claimed stay this owner's until the
        timeout passes, time for a worker to adopt them (a job handed back unfinished)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def aclose(self) -> None:
        """Stop beating and leave: runs still claimed (none, after a clean end) count as
        interrupted at the next sweep of another process."""
        await self.stop()
        with contextlib.suppress(StoreError, TimeoutError), driver_errors(self._store.dsn):
            await asyncio.wait_for(self._store.pool.execute(_LEAVE, self.id), 5)
