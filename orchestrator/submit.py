"""``baton run PATH... --queue URL``: a batch as jobs on the queue, followed from the log.

The batch is recorded as one shard of one (ShardStarted on ``batch-<ID>``, listing every
unit's run), so ``baton report --batch ID`` merges it as it merges a CI matrix's; the
submitter prints that same report when every run has ended. Cancelled (Ctrl-C, SIGTERM),
it marks the batch cancelled on the queue, which every worker reads before and while it
runs a job of it; it ends the runs no worker has begun itself (RunStarted, RunCancelled,
at version 0, so a worker that begins one at that moment conflicts instead of doubling
it) and waits a bound for the runs in flight to record their end.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from msgspec.structs import replace

from events import types as ev
from events.secrets import Cipher
from events.settings import STORE_WAIT
from events.store import (
    EventStore,
    NewEvent,
    StoreUnavailable,
    StreamAppend,
    WrongExpectedVersion,
)
from orchestrator.batch_report import BatchReport, batch_report
from orchestrator.errors import UsageError
from orchestrator.execution import Options, append_shared
from orchestrator.queue import BATCH_CANCELLED, JobQueue, QueuedJob, QueueUnavailable
from orchestrator.runner import run_started
from orchestrator.shards import ShardRun, Unit

_POLL = 0.25
"""Seconds between looks at which runs have ended."""
_PAGE = 200
"""Runs looked at per query."""
CANCEL_WAIT = 15.0
"""Seconds a cancelled batch's runs in flight get to record their end."""

Ended = Callable[[str, list[ev.RecordedEvent]], None]
"""Called with each run's id and events as it ends."""


async def submit(
    store: EventStore,
    queue: JobQueue,
    options: Options,
    batch: ShardRun,
    on_ended: Ended | None = None,
    *,
    store_wait: float = STORE_WAIT,
    cipher: Cipher,
) -> BatchReport:
    """Queue every unit of ``batch`` (one shard of one), wait for every run to end, and
    return the batch's report. Cancelled, it cancels the batch first (see the module)."""
    start = time.perf_counter()
    stream = ev.batch_stream(batch.batch_id)
    sealed = QueuedJob.of(options, batch.batch_id, "", "").sealed(cipher)
    await append_shared(store, stream, replace(batch.started(), queued=sealed))
    jobs = {
        unit.inputs.run_id: QueuedJob.of(options, batch.batch_id, unit.inputs.run_id, unit.key)
        for unit in batch.units
    }
    queued = _Queued(queue, jobs, await queue.server(), await queue.submit(list(jobs.values())))
    open_runs = list(jobs)
    try:
        await _follow(store, open_runs, on_ended, store_wait=store_wait, queued=queued)
    except asyncio.CancelledError:
        await _cancel(store, queue, batch, open_runs, on_ended)
        raise
    report = await batch_report(store, batch.batch_id)
    duration = (time.perf_counter() - start) * 1000
    await append_shared(store, stream, batch.completed(report.results, duration))
    return report


async def requeue(
    store: EventStore, queue: JobQueue, cipher: Cipher, batch_id: str
) -> tuple[int, int]:
    """Queue again, from the log alone, the jobs of every run of a queued batch that has
    not ended (same run ids: a worker resumes each from its events); how many were queued
    and how many had ended. For when Redis lost the jobs and no submitter is left to
    queue them again itself."""
    started = [
        recorded.event
        for recorded in await store.read_stream(ev.batch_stream(batch_id))
        if isinstance(recorded.event, ev.ShardStarted)
    ]
    if not started:
        raise UsageError(f"no batch {batch_id} in the event store")
    batch = started[-1]
    if not batch.queued:
        raise UsageError(
            f"batch {batch_id} was not submitted to a queue (baton run --queue): run its"
            " shards again with baton run --shard K/N --batch ID"
        )
    template = QueuedJob.unsealed(batch.queued, cipher)
    last = await store.last_events([ev.run_stream(run_id) for run_id in batch.runs])
    unended = [
        (run_id, unit)
        for run_id, unit in zip(batch.runs, batch.units, strict=True)
        if not isinstance(
            getattr(last.get(ev.run_stream(run_id)), "event", None),
            ev.RunCompleted | ev.RunCancelled,
        )
    ]
    await queue.ensure_group()
    await queue.submit([replace(template, run_id=run_id, unit=unit) for run_id, unit in unended])
    return len(unended), len(batch.runs) - len(unended)


class _Queued:
    """The jobs of a batch on the queue, queued again if a restart of Redis lost them.

    A Redis without persistence comes back empty. The log still says which runs of the
    batch have not ended, so their jobs go on the queue again, with the same run ids: a
    worker resumes each from its events, as it resumes a killed worker's job. A job that
    a worker still runs then has two workers; the run's stream takes the appends of only
    one of them (its expected versions), the other stops without acknowledging it.
    """

    _EVERY = 2.0
    """Seconds between looks at whether Redis restarted."""

    def __init__(self, queue: JobQueue, jobs: dict[str, QueuedJob], server: str, ids: list[str]):
        self.queue = queue
        self.jobs = jobs
        self.server = server
        self.first = ids[0] if ids else ""
        self.checked = time.monotonic()

    async def keep(self, open_runs: list[str]) -> None:
        if not self.first or time.monotonic() - self.checked < self._EVERY:
            return
        self.checked = time.monotonic()
        try:
            server = await self.queue.server()
            if server == self.server:
                return
            if not await self.queue.holds(self.first):
                ids = await self.queue.submit([self.jobs[run_id] for run_id in open_runs])
                self.first = ids[0] if ids else ""
        except QueueUnavailable:
            return  # still down (or restarting): look again later
        self.server = server


async def _follow(
    store: EventStore,
    open_runs: list[str],
    on_ended: Ended | None,
    *,
    store_wait: float = STORE_WAIT,
    until: float | None = None,
    queued: _Queued | None = None,
) -> None:
    """Until every run of ``open_runs`` has ended (or ``until``, a monotonic time); the
    ended ones are taken out of it."""
    down_since: float | None = None
    cursor: int | None = None
    while open_runs:
        try:
            ended, cursor = await ended_since(store, open_runs, cursor)
        except StoreUnavailable:
            # the workers pause through an outage of the store (BATON_STORE_WAIT): so does this
            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since > store_wait:
                raise
            await asyncio.sleep(_POLL)
            continue
        down_since = None
        for run_id in [run_id for run_id in open_runs if ev.run_stream(run_id) in ended]:
            open_runs.remove(run_id)
            if on_ended is not None:
                on_ended(run_id, await store.read_stream(ev.run_stream(run_id)))
        if open_runs:
            if until is not None and time.monotonic() >= until:
                return
            if queued is not None:
                await queued.keep(open_runs)
            await asyncio.sleep(_POLL)


_ENDINGS = ("RunCompleted", "RunCancelled")


async def ended_since(
    store: EventStore, open_runs: list[str], cursor: int | None
) -> tuple[set[str], int]:
    """The streams of ``open_runs`` whose end was committed after log position ``cursor``
    (with None: every one that has ended), and the position looked through.

    Only the first look reads each open run's last event; later looks read the ends
    committed since, so a look costs what happened since the last one, not the size of
    the batch (measured in bench/WORKERS.md: the look at 2,000 open runs every 0.25 s cost
    PostgreSQL more CPU than the workers' appends)."""
    head = await store.head()  # before the reads: an end committed meanwhile is seen next time
    streams = {ev.run_stream(run_id) for run_id in open_runs}
    ended: set[str] = set()
    if cursor is None:
        ordered = sorted(streams)
        for page in range(0, len(ordered), _PAGE):
            last = await store.last_events(ordered[page : page + _PAGE])
            ended |= {
                s for s, e in last.items() if isinstance(e.event, ev.RunCompleted | ev.RunCancelled)
            }
        return ended, head
    while cursor < head:
        found = await store.read_all(cursor, _PAGE, through_position=head, types=_ENDINGS)
        ended |= {recorded.stream for recorded in found if recorded.stream in streams}
        if len(found) < _PAGE:
            break
        cursor = found[-1].position
    return ended, head


async def _cancel(
    store: EventStore,
    queue: JobQueue,
    batch: ShardRun,
    open_runs: list[str],
    on_ended: Ended | None,
) -> None:
    await queue.cancel(batch.batch_id)
    by_run: dict[str, Unit] = {unit.inputs.run_id: unit for unit in batch.units}
    streams = [ev.run_stream(run_id) for run_id in open_runs]
    begun = await store.last_events(streams)
    for run_id, run_stream in zip(open_runs, streams, strict=True):
        if run_stream in begun:
            continue  # a worker runs it: it sees the batch cancelled within a second
        unit = by_run[run_id]
        events = [
            NewEvent(run_started(unit.plan, unit.in_batch(batch.batch_id))),
            NewEvent(ev.RunCancelled(reason=BATCH_CANCELLED)),
        ]
        # a conflict: a worker began it just now, and cancels it
        with contextlib.suppress(WrongExpectedVersion):
            await store.append([StreamAppend(run_stream, events, 0)])
    await _follow(store, open_runs, on_ended, until=time.monotonic() + CANCEL_WAIT)
