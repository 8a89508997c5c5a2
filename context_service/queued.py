"""The service's runs on the worker queue (BATON_QUEUE_URL): queued, followed, cancelled.

With a queue, a run the API starts is not run in this process: it goes on the stream that
``baton worker`` reads, as one job that carries the run sealed with the secret key
(orchestrator.service_runs). The service learns each run's end from the log, not from a
task of its own: a follower reads the RunCompleted and RunCancelled committed since its
last look (orchestrator.submit.ended_since), waits for the projector to pass them, and
records the run's state where the in-process launcher's ``on_done`` does.

Several instances behind one load balancer share the queue and the database, and any of
them may be asked about any run, or be killed: so every instance follows every queued run
whose end is not recorded (service_runs, looked at every few seconds), not only its own.
Recording an end twice writes the same state, from the same log.

An instance killed after recording a run and before queuing its job leaves a queued run
that no worker would ever take. A run the user asked for should run, and one whose job
never reached the queue never began: so the followers queue it again, from the job kept
in service_runs, once ``_GRACE`` seconds have passed since it was recorded with no key on
the queue saying its job was queued and nothing of it in the log. The XADD and that key
are one script (JobQueue.submit_once): the instance that recorded it, late, and every
follower at once still queue it only once.

Cancelling sets the run's cancellation key on the queue (a run is a batch of one), which
the worker running it reads twice a second and which a worker taking the job later reads
before it begins. A run no worker has begun is ended here at once: its RunStarted (in the
job service_runs keeps) and RunCancelled are appended at version 0,
so a worker beginning it at that very moment conflicts with the append instead of doubling
the run, and then cancels it itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgspec

from context_service.database import Database
from events import types as ev
from events.secrets import Cipher
from events.store import EventStore, NewEvent, StoreError, StreamAppend, WrongExpectedVersion
from orchestrator.planner import Plan
from orchestrator.queue import JobQueue, QueuedJob, QueueUnavailable, started_of
from orchestrator.runner import RunInputs
from orchestrator.service_runs import API_CANCELLED, ServiceRun
from orchestrator.submit import ended_since

_log = logging.getLogger("baton.service.queue")
_POLL = 0.25
"""Seconds between looks at which queued runs have ended."""
_REFRESH = 2.0
"""Seconds between looks at which runs are queued, by any instance."""
_GRACE = 60.0
"""Seconds after its recording a queued run's job must be on the queue, else it is queued
again: longer than an instance takes to queue it when Redis is slow to answer (its
timeouts), so that one that is still trying is not mistaken for a dead one."""
_started = msgspec.json.Decoder(ev.RunStarted)


@dataclass(frozen=True)
class _Queued:
    organization: uuid.UUID
    recorded: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the run's end is recorded."""


class QueuedRuns:
    """This process's runs on the queue until their end is in the log; ``aclose`` it."""

    def __init__(
        self,
        queue: JobQueue,
        store: EventStore,
        db: Database,
        cipher: Cipher,
        *,
        allowed_targets: str | None,
        concurrency: int,
        after_run: Callable[[int], Awaitable[object]],
    ) -> None:
        """``after_run``: awaited with the log position of runs' ends before their ``done``
        (the read tables show a run ended before its state says so)."""
        self.queue = queue
        self._store = store
        self._db = db
        self._cipher = cipher
        self._allowed_targets = allowed_targets
        self._concurrency = concurrency
        self._after_run = after_run
        self._open: dict[str, _Queued] = {}
        self._fresh: set[str] = set()
        """Runs queued since the last look at which have ended."""

    def job(self, content: str, planned: Plan, inputs: RunInputs, started: ev.RunStarted) -> str:
        """The run's job, encoded, its run sealed: for service_runs, then ``start``."""
        run = ServiceRun.of(content, planned, inputs, self._allowed_targets)
        sealed = run.sealed(self._cipher)
        made = msgspec.json.encode(started).decode()
        return QueuedJob.for_service(inputs.run_id, sealed, self._concurrency, made).encoded()

    async def start(self, run_id: str, organization: uuid.UUID, job: str) -> None:
        """Put the run (recorded in service_runs with ``job``) on the queue; raises
        QueueUnavailable."""
        await self.queue.submit_once(run_id, job)
        self._follow(run_id, organization)

    def _follow(self, run_id: str, organization: uuid.UUID) -> _Queued:
        queued = self._open.get(run_id)
        if queued is None:
            queued = self._open[run_id] = _Queued(organization)
            self._fresh.add(run_id)
        return queued

    async def follow_queued(self) -> None:
        """Follow every run queued by any instance (this one before a restart, another one,
        alive or not) whose end is not recorded; raises StoreError."""
        for organization, run_id in await self._db.queued_runs():
            self._follow(str(run_id), organization)

    async def queue_lost(self) -> list[str]:
        """Queue again the jobs of runs recorded more than ``_GRACE`` seconds ago that never
        reached the queue (their instance was killed in between, or Redis lost them) and
        never began; return their ids. Raises StoreError, QueueUnavailable."""
        jobs = {str(run_id): job for run_id, job in await self._db.queued_jobs(_GRACE)}
        lost = await self.queue.unqueued(sorted(jobs))
        if not lost:
            return []
        # a run with events began on a worker: its job was queued, and is that worker's
        began = await self._store.first_events([ev.run_stream(run_id) for run_id in lost])
        queued = []
        for run_id in lost:
            if ev.run_stream(run_id) not in began and await self.queue.submit_once(
                run_id, jobs[run_id]
            ):
                _log.warning(
                    "run %s: its job never reached the queue (the instance that recorded it"
                    " stopped first): queued it again",
                    run_id,
                )
                queued.append(run_id)
        return queued

    async def wait(self, run_id: str) -> None:
        """Until the end of a run this process follows is recorded."""
        queued = self._open.get(run_id)
        if queued is not None:
            await queued.recorded.wait()

    async def cancel(self, run_id: str, organization: uuid.UUID) -> None:
        """Cancel a queued run, whichever instance queued it and wherever it is; raises
        QueueUnavailable."""
        await self.queue.cancel(run_id)
        self._follow(run_id, organization)
        job = await self._db.run_job(organization, uuid.UUID(run_id))
        started = started_of(job) if job else ""
        if not started:
            return  # its end is recorded, or it was queued before schema step 15: the
            # worker that takes its job ends it
        cancelled = ev.RunCancelled(reason=API_CANCELLED)
        events = [NewEvent(_started.decode(started)), NewEvent(cancelled)]
        # a conflict: a worker has begun it, reads the key within a second and cancels it
        with contextlib.suppress(WrongExpectedVersion):
            await self._store.append([StreamAppend(ev.run_stream(run_id), events, 0)])

    async def follow(self, stop: asyncio.Event) -> None:
        """Record each run's end as the log shows it, until ``stop`` is set."""
        cursor: int | None = None
        loop = asyncio.get_running_loop()
        refresh = loop.time() + _REFRESH
        while not stop.is_set():
            try:
                if loop.time() >= refresh:
                    refresh = loop.time() + _REFRESH
                    await self.follow_queued()
                    await self.queue_lost()
            except (StoreError, QueueUnavailable) as exc:
                _log.warning("looking for queued runs: %s", exc)
            if self._open:
                try:
                    cursor = await self._look(cursor)
                except StoreError as exc:  # the store is away: look again, from where we were
                    _log.warning("following the queued runs: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), _POLL)

    async def _look(self, cursor: int | None) -> int:
        by_stream = {ev.run_stream(run_id): run_id for run_id in self._open}
        # a run queued since the last look may have ended before that look's cursor: what
        # the cursor passed over is read for it from its last event
        fresh, self._fresh = self._fresh, set()
        ended, cursor = await ended_since(self._store, list(self._open), cursor)
        last = await self._store.last_events([ev.run_stream(run_id) for run_id in fresh])
        ended |= {
            s for s, e in last.items() if isinstance(e.event, ev.RunCompleted | ev.RunCancelled)
        }
        if not ended:
            return cursor
        last = await self._store.last_events(sorted(ended))
        await self._after_run(max(recorded.position for recorded in last.values()))
        for stream, recorded in last.items():
            run_id = by_stream[stream]
            queued = self._open.pop(run_id, None)
            if queued is None:
                continue
            state = "cancelled" if isinstance(recorded.event, ev.RunCancelled) else "finished"
            try:
                await self._db.record_run_end(queued.organization, uuid.UUID(run_id), state, "")
            except Exception:
                _log.exception("run %s: recording its end failed", by_stream[stream])
            finally:
                queued.recorded.set()
        return cursor

    async def aclose(self) -> None:
        await self.queue.aclose()
