"""The service's runs on the worker queue (BATON_QUEUE_URL): queued, followed, cancelled.

With a queue, a run the API starts is not run in this process: it goes on the stream that
``baton worker`` reads, as one job that carries the run sealed with the secret key
(orchestrator.service_runs). The service learns each run's end from the log, not from a
task of its own: a follower reads the RunCompleted and RunCancelled committed since its
last look (orchestrator.submit.ended_since), waits for the projector to pass them, and
records the run's state where the in-process launcher's ``on_done`` does.

Cancelling sets the run's cancellation key on the queue (a run is a batch of one), which
the worker running it reads twice a second and which a worker taking the job later reads
before it begins. A run no worker has begun is ended here at once: its RunStarted and
RunCancelled are appended at version 0, so a worker beginning it at that very moment
conflicts with the append instead of doubling the run, and then cancels it itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from events import types as ev
from events.secrets import Cipher
from events.store import EventStore, NewEvent, StoreError, StreamAppend, WrongExpectedVersion
from orchestrator.planner import Plan
from orchestrator.queue import JobQueue, QueuedJob
from orchestrator.runner import RunInputs, run_started
from orchestrator.service_runs import API_CANCELLED, ServiceRun
from orchestrator.submit import ended_since

_log = logging.getLogger("baton.service.queue")
_POLL = 0.25
"""Seconds between looks at which queued runs have ended."""

Done = Callable[[str, str], Awaitable[object]]
"""Called with (state, error) when the run has ended: 'finished' or 'cancelled'."""


@dataclass(frozen=True)
class _Queued:
    started: ev.RunStarted | None
    """What the run begins with: recorded here if it is cancelled before a worker begins
    it; None for a run queued before this process started (``follow_again``)."""
    done: Done
    recorded: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once ``done`` has recorded the run's end."""


class QueuedRuns:
    """This process's runs on the queue until their end is in the log; ``aclose`` it."""

    def __init__(
        self,
        queue: JobQueue,
        store: EventStore,
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
        self._cipher = cipher
        self._allowed_targets = allowed_targets
        self._concurrency = concurrency
        self._after_run = after_run
        self._open: dict[str, _Queued] = {}
        self._fresh: set[str] = set()
        """Runs queued since the last look at which have ended."""

    async def start(self, content: str, planned: Plan, inputs: RunInputs, done: Done) -> None:
        """Put the run on the queue; raises QueueUnavailable."""
        run = ServiceRun.of(content, planned, inputs, self._allowed_targets)
        job = QueuedJob.for_service(inputs.run_id, run.sealed(self._cipher), self._concurrency)
        self._open[inputs.run_id] = _Queued(run_started(planned, inputs), done)
        self._fresh.add(inputs.run_id)
        try:
            await self.queue.submit([job])
        except BaseException:
            del self._open[inputs.run_id]
            self._fresh.discard(inputs.run_id)
            raise

    def follow_again(self, run_id: str, done: Done) -> None:
        """Follow a run queued before this process started (a restart), to record its end."""
        if run_id not in self._open:
            self._open[run_id] = _Queued(None, done)
            self._fresh.add(run_id)

    async def wait(self, run_id: str) -> bool:
        """Until the end of a run of this process is recorded; False if it is not one."""
        queued = self._open.get(run_id)
        if queued is None:
            return False
        await queued.recorded.wait()
        return True

    async def cancel(self, run_id: str) -> None:
        """Cancel a queued run, wherever it is; raises QueueUnavailable."""
        await self.queue.cancel(run_id)
        queued = self._open.get(run_id)
        if queued is None or queued.started is None:
            return  # queued by another instance, or before a restart: its worker ends it
        events = [NewEvent(queued.started), NewEvent(ev.RunCancelled(reason=API_CANCELLED))]
        # a conflict: a worker has begun it, reads the key within a second and cancels it
        with contextlib.suppress(WrongExpectedVersion):
            await self._store.append([StreamAppend(ev.run_stream(run_id), events, 0)])

    async def follow(self, stop: asyncio.Event) -> None:
        """Record each run's end as the log shows it, until ``stop`` is set."""
        cursor: int | None = None
        while not stop.is_set():
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
            queued = self._open.pop(by_stream[stream], None)
            if queued is None:
                continue
            state = "cancelled" if isinstance(recorded.event, ev.RunCancelled) else "finished"
            try:
                await queued.done(state, "")
            except Exception:
                _log.exception("run %s: recording its end failed", by_stream[stream])
            finally:
                queued.recorded.set()
        return cursor

    async def aclose(self) -> None:
        await self.queue.aclose()
