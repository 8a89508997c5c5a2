"""``baton worker``: takes jobs from the batch queue and runs them, every run's events in the
one event store (BATON_DATABASE_URL) that every worker and the submitter share.

A job is acknowledged only once its run's events are stored (the run's writer flushed,
RunCompleted or RunCancelled among them). A job another worker took and stopped touching
(killed) is claimed after ``claim_after`` seconds and resumed from the run's events: the
tests that ended there are not sent again, what they captured comes back from the log,
the test that was in flight is sent again (at-least-once sending). The run's stream takes
appends only at the version its writer expects, so two workers that both believe they
own a run cannot both add to it: exactly-once results. A job handed out more than
``max_deliveries`` times ends its run as failed, with the reason.

Stopping (``serve``'s ``stop`` set: SIGTERM or SIGINT) takes no new job, lets the jobs in
flight finish for up to ``drain_timeout`` seconds, then hands the rest back to the queue
unacknowledged, their runs open in the log for the next worker to resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.metadata
import logging
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import msgspec

from events import types as ev
from events.context import decrypted_variables, fold, hidden_values
from events.owners import Owner
from events.secrets import Cipher, SecretError
from events.settings import EXCERPT_LIMIT, Settings
from events.store import (
    EventStore,
    StoreError,
    StoreUnavailable,
    StreamAppend,
    WrongExpectedVersion,
)
from events.writer import Appender, BatchingWriter, GroupAppends
from orchestrator import execution, templating
from orchestrator.errors import UsageError
from orchestrator.planner import Plan
from orchestrator.queue import (
    BATCH_CANCELLED,
    Delivery,
    JobQueue,
    QueuedJob,
    QueueUnavailable,
    consumer_name,
)
from orchestrator.recorded import finished_tests
from orchestrator.runner import Resume, RunInputs, Runner, run_started
from orchestrator.service_runs import API_CANCELLED, ServiceRun
from orchestrator.services import Limiters, SystemClock
from orchestrator.shards import Unit, units
from orchestrator.targets import TargetPolicy

_CANCEL_CHECK = 0.5
"""Seconds between looks at whether a running job's batch was cancelled."""
_BATCHES_KEPT = 16
"""Batches whose units a worker keeps rebuilt."""

_VERSION = importlib.metadata.version("baton")
_log = logging.getLogger("baton.worker")
_run_started = msgspec.json.Decoder(ev.RunStarted)
T = TypeVar("T")


@dataclass(frozen=True)
class WorkerOptions:
    concurrency: int = 4
    """Jobs (runs) at once."""
    drain_timeout: float = 30.0
    claim_after: float = 30.0
    max_deliveries: int = 3


@dataclass(frozen=True)
class _Built:
    """What a job runs, rebuilt on this worker."""

    plan: Plan
    inputs: RunInputs
    key: str
    """What the job runs, for messages: the unit's key, or the service run's flow."""
    cancelled: str
    """The reason of its RunCancelled if it is cancelled before it begins."""
    targets: TargetPolicy | None = None
    """None: any target (a batch's, as ``baton run``); else the service's policy."""
    limits: templating.Limits = templating.CLI_LIMITS


class _Unreadable(Exception):
    """The job is not one this worker's Baton can read: a newer one queued it."""


class _HandedBack(StoreError):
    """The job went back to the queue unfinished: nothing more of its run is stored here."""


class _JobAppends:
    """One job's appends; once the job is handed back they stop reaching the store, so the
    RunCancelled its cancelled run emits is not stored and the next worker resumes it."""

    def __init__(self, store: Appender) -> None:
        self._store = store
        self.handed_back = False

    async def append(self, appends: Sequence[StreamAppend]) -> list[list[int]]:
        if self.handed_back:
            raise _HandedBack("the job was handed back to the queue")
        return await self._store.append(appends)


class Worker:
    def __init__(
        self,
        queue: JobQueue,
        store: EventStore,
        owner: Owner,
        cipher: Cipher,
        transport: httpx.AsyncBaseTransport,
        options: WorkerOptions,
        *,
        consumer: str,
        store_wait: float,
        excerpt_limit: int = EXCERPT_LIMIT,
    ) -> None:
        self.excerpt_limit = excerpt_limit
        """BATON_EXCERPT_LIMIT: what each job's events keep of a body."""
        self.queue = queue
        self.store = store
        self.owner = owner
        self.cipher = cipher
        self.transport = transport
        self.limiters = Limiters(SystemClock())
        """One rate limiter per service for every job this worker runs."""
        self.options = options
        self.consumer = consumer
        self.store_wait = store_wait
        self._appends = GroupAppends(owner)
        self._jobs: dict[asyncio.Task[None], tuple[Delivery, _JobAppends]] = {}
        self._units: dict[str, dict[str, Unit]] = {}
        self._guarded: dict[TargetPolicy, httpx.AsyncBaseTransport] = {}

    async def serve(self, stop: asyncio.Event) -> bool:
        """Work until ``stop`` is set, then drain. True if jobs were handed back unfinished
        (their runs' claims must outlive this process: ``Owner.stop``, not ``aclose``)."""
        loop = asyncio.get_running_loop()
        touching = asyncio.create_task(self._touching())
        next_claim = 0.0
        try:
            while not stop.is_set():
                free = self.options.concurrency - len(self._jobs)
                if free <= 0:
                    await _first(self._jobs, stop, within=1.0)
                    continue
                try:
                    found: list[Delivery] = []
                    if loop.time() >= next_claim:
                        found = await self.queue.claim_stale(
                            self.consumer, self.options.claim_after, free
                        )
                        next_claim = loop.time() + min(self.options.claim_after / 2, 5.0)
                    if not found:
                        found = await self.queue.take(self.consumer, free, block=0.5)
                except QueueUnavailable as exc:
                    _log.warning("%s; trying again", exc)
                    await _first({}, stop, within=1.0)
                    continue
                for delivery in found:
                    appends = _JobAppends(self._appends)
                    task = asyncio.create_task(self._work(delivery, appends))
                    self._jobs[task] = (delivery, appends)
                    task.add_done_callback(self._jobs.pop)
            return await self._drain()
        finally:
            touching.cancel()
            await asyncio.gather(touching, return_exceptions=True)

    async def _drain(self) -> bool:
        if not self._jobs:
            return False
        _log.info("stopping: %d job(s) in flight", len(self._jobs))
        _, unfinished = await asyncio.wait(list(self._jobs), timeout=self.options.drain_timeout)
        for task in unfinished:
            _, appends = self._jobs[task]
            appends.handed_back = True  # before the cancel: its RunCancelled stays unstored
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
        if unfinished:
            _log.warning("handed %d unfinished job(s) back to the queue", len(unfinished))
        return bool(unfinished)

    async def _touching(self) -> None:
        while True:
            await asyncio.sleep(self.options.claim_after / 3)
            ids = [delivery.id for delivery, appends in self._jobs.values()]
            try:
                await self.queue.touch(self.consumer, ids)
            except QueueUnavailable as exc:
                _log.warning("%s", exc)

    async def _work(self, delivery: Delivery, appends: _JobAppends) -> None:
        run_id = delivery.run_id
        try:
            done = await self._settled(delivery, appends)
        except WrongExpectedVersion:
            # another worker claimed the job and writes the run now: its job to finish
            _log.warning("run %s of job %s is written by another worker", run_id, delivery.id)
            return
        except (StoreError, QueueUnavailable) as exc:
            # not acknowledged: the job is claimed again once this worker stops touching it
            _log.error("job %s (run %s) left for another try: %s", delivery.id, run_id, exc)
            return
        except Exception:
            _log.exception("job %s (run %s) left for another try", delivery.id, run_id)
            return
        if done:
            try:
                await self.queue.ack(delivery.id)
            except QueueUnavailable as exc:  # claimed again later, found ended, acknowledged
                _log.warning("job %s done but not acknowledged: %s", delivery.id, exc)

    async def _settled(self, delivery: Delivery, appends: _JobAppends) -> bool:
        """Run the job, or leave it if this worker cannot read it; True to acknowledge it."""
        if delivery.job is None:
            return await self._unreadable(delivery, appends, "it is not a job this worker reads")
        try:
            return await self._run(delivery.job, delivery.deliveries, appends)
        except _Unreadable as exc:
            return await self._unreadable(delivery, appends, str(exc))

    async def _unreadable(self, delivery: Delivery, appends: _JobAppends, why: str) -> bool:
        """A job this worker cannot read (a newer Baton queued it, in a rolling deploy) is left
        unacknowledged and untouched, so that another worker claims it after --claim-after;
        once it was handed out more than --max-deliveries times, its run ends saying why."""
        limit = self.options.max_deliveries
        if delivery.deliveries <= limit:
            _log.warning(
                "job %s (run %s) left for another worker: %s (this worker runs Baton %s)",
                delivery.id,
                delivery.run_id or "unknown",
                why,
                _VERSION,
            )
            return False
        reason = (
            f"the job was handed to a worker {delivery.deliveries} times and no worker could "
            f"read it (--max-deliveries {limit}): {why}; it was queued by a newer Baton than "
            f"the workers' ({_VERSION}): upgrade the workers"
        )
        _log.error("job %s (run %s): %s", delivery.id, delivery.run_id or "unknown", reason)
        if not delivery.run_id:
            return True  # names no run: nothing to end
        stream = ev.run_stream(delivery.run_id)
        recorded = await self._retrying(lambda: self.store.read_stream(stream))
        if recorded and not _open(recorded):
            return True
        writer = BatchingWriter(appends, max_wait=self.store_wait)
        try:
            _unbuildable(writer, delivery.run_id, "", len(recorded), reason, delivery.started)
        finally:
            await writer.aclose()
        return True

    async def _run(self, job: QueuedJob, deliveries: int, appends: _JobAppends) -> bool:
        """Run (or resume, or end) the job's run; True once its events are stored."""
        stream = ev.run_stream(job.run_id)
        recorded = await self._retrying(lambda: self.store.read_stream(stream))
        if recorded and not _open(recorded):
            return True  # ended before (its worker died before acknowledging)
        if recorded:
            # the run's claim is this owner's now, so no sweep ends it under us; the sweep
            # may have ended it just before: read it again after
            await self._retrying(lambda: self.owner.adopt(stream))
            recorded = await self._retrying(lambda: self.store.read_stream(stream))
            if not _open(recorded):
                return True
        writer = BatchingWriter(appends, max_wait=self.store_wait)
        try:
            try:
                built = self._built(job)
            except UsageError as exc:
                _unbuildable(writer, job.run_id, job.unit, len(recorded), str(exc), job.started)
                return True
            if await self._cancelled(job.batch_id):
                writer.resume(stream, len(recorded))
                if not recorded:
                    writer.emit(stream, run_started(built.plan, built.inputs))
                writer.emit(stream, ev.RunCancelled(reason=built.cancelled))
                return True
            inputs = self._resumed(built, recorded, deliveries)
            runner = Runner(
                writer=writer,
                cipher=self.cipher,
                transport=self._transport(built.targets),
                concurrency=job.concurrency,
                limits=built.limits,
                limiters=self.limiters,
                excerpt_limit=self.excerpt_limit,
            )
            if built.targets is not None and inputs.resume is None:
                # as the service's own runs do (context_service.launcher)
                inputs = await execution.health_checked(runner, built.plan, inputs)
            await self._watching(job.batch_id, runner.run(built.plan, inputs))
            return True
        finally:
            await writer.aclose()

    def _built(self, job: QueuedJob) -> _Built:
        """The job's plan and inputs: its batch unit, or the service's run it carries."""
        if not job.service:
            unit = self._unit(job)
            inputs = dataclasses.replace(unit.in_batch(job.batch_id), run_id=job.run_id)
            return _Built(unit.plan, inputs, unit.key, BATCH_CANCELLED)
        try:
            run = ServiceRun.unsealed(job.service, self.cipher)
        except SecretError:
            raise UsageError(
                "the service's job cannot be read with this worker's secret key: start the "
                "worker with the service's BATON_SECRET_KEY (or its BATON_HOME)"
            ) from None
        except msgspec.DecodeError as exc:  # decrypted, so the key is right: a newer format
            raise _Unreadable(f"the service's run in it does not decode: {exc}") from None
        try:
            targets = TargetPolicy.parse(run.allowed_targets)
            planned, inputs = run.rebuilt()
        except (ValueError, UsageError) as exc:
            # the service checked all of it: only a newer Baton's flow or policy fails here
            raise _Unreadable(f"the service's run in it: {exc}") from None
        return _Built(
            planned, inputs, run.filename, API_CANCELLED, targets, templating.SERVICE_LIMITS
        )

    def _transport(self, targets: TargetPolicy | None) -> httpx.AsyncBaseTransport:
        """The CLI's (any target) for a batch's job; for the service's, one guarded by its
        policy, shared by the jobs with the same policy."""
        if targets is None:
            return self.transport
        transport = self._guarded.get(targets)
        if transport is None:
            transport = execution.make_transport(self.options.concurrency * 10, targets)
            self._guarded[targets] = transport
        return transport

    async def aclose(self) -> None:
        for transport in self._guarded.values():
            await transport.aclose()

    def _resumed(
        self, built: _Built, recorded: list[ev.RecordedEvent], deliveries: int
    ) -> RunInputs:
        inputs = built.inputs
        failure = ""
        if deliveries > self.options.max_deliveries:
            failure = (
                f"the job was handed to a worker {deliveries} times and no worker finished it "
                f"(--max-deliveries {self.options.max_deliveries}): each one stopped while "
                "running it"
            )
        if not recorded:
            return (
                dataclasses.replace(inputs, resume=Resume(0, {}, {}, failure))
                if failure
                else inputs
            )
        started = recorded[0].event
        if isinstance(started, ev.RunStarted) and started.suite_digest != built.plan.loaded.digest:
            failure = failure or (
                f"{built.key} on this worker is not the flow the run began with: the worker's "
                "checkout differs from the submitter's"
            )
        context = fold(recorded)
        resume = Resume(
            version=context.version,
            finished=finished_tests(recorded),
            captures=decrypted_variables(context, self.cipher),
            failure=failure,
        )
        hidden = (*inputs.hidden, *hidden_values(context, self.cipher))
        return dataclasses.replace(inputs, hidden=hidden, resume=resume)

    async def _watching(self, batch_id: str, run: Awaitable[object]) -> None:
        """Await the run; cancel it if its batch is cancelled meanwhile."""
        task = asyncio.ensure_future(run)
        try:
            while not task.done():
                await asyncio.wait([task], timeout=_CANCEL_CHECK)
                if not task.done() and await self._cancelled(batch_id):
                    task.cancel()
            with_cancel = task.cancelled()
            if not with_cancel:
                task.result()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _cancelled(self, batch_id: str) -> bool:
        try:
            return await self.queue.cancelled(batch_id)
        except QueueUnavailable:
            return False

    def _unit(self, job: QueuedJob) -> Unit:
        """The job's unit, from this worker's checkout (every unit of a batch is rebuilt
        once, for the batch's first job)."""
        batch = self._units.get(job.batch_id)
        if batch is None:
            batch = {unit.key: unit for unit in units(execution.prepare(job.options()))}
            if len(self._units) >= _BATCHES_KEPT:
                del self._units[next(iter(self._units))]
            self._units[job.batch_id] = batch
        unit = batch.get(job.unit)
        if unit is None:
            raise UsageError(
                f"{job.unit}: no such unit in this worker's checkout (start the worker in "
                "the root of the same checkout as the submitter)"
            )
        return unit

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``, tried again while the store is unreachable, for up to store_wait."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.store_wait
        while True:
            try:
                return await call()
            except StoreUnavailable:
                if loop.time() >= deadline:
                    raise
                await asyncio.sleep(0.5)


def _open(recorded: Sequence[ev.RecordedEvent]) -> bool:
    return not isinstance(recorded[-1].event, ev.RunCompleted | ev.RunCancelled)


def _unbuildable(
    writer: BatchingWriter, run_id: str, unit: str, version: int, reason: str, started: str
) -> None:
    """End a run this worker cannot rebuild (its checkout differs, a newer Baton's job, the
    service's run sealed with another key), saying why. ``started``: the RunStarted the
    service made (QueuedJob.started), so that the run is its organization's, not a
    placeholder of the default one's."""
    stream = ev.run_stream(run_id)
    writer.resume(stream, version)
    if not version:
        writer.emit(stream, _first_event(run_id, unit, started))
    writer.emit(stream, ev.RunCancelled(reason=reason))


def _first_event(run_id: str, unit: str, started: str) -> ev.RunStarted:
    with contextlib.suppress(msgspec.DecodeError):
        made = _run_started.decode(started)
        if made.run_id == run_id:
            return made
    what = unit or "a run of the service"
    return ev.RunStarted(run_id=run_id, suite=what, suite_digest="", plan=[], source=what)


async def _first(
    tasks: Collection[asyncio.Future[Any]], stop: asyncio.Event, *, within: float
) -> None:
    """Until one of ``tasks`` ends, ``stop`` is set, or ``within`` seconds pass."""
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([*tasks, stopped], timeout=within, return_when="FIRST_COMPLETED")
    finally:
        stopped.cancel()


async def work(
    queue_url: str, settings: Settings, options: WorkerOptions, stop: asyncio.Event
) -> None:
    """Be a worker of the queue at ``queue_url`` until ``stop`` is set, then drain."""
    from events import open_store
    from events.projections import Projector
    from events.secrets import load_key

    if options.claim_after >= settings.owner_timeout:
        raise UsageError(
            f"--claim-after {options.claim_after:g} must be shorter than BATON_OWNER_TIMEOUT "
            f"({settings.owner_timeout:g} s): a killed worker's runs would be ended as "
            "interrupted before another worker could resume them"
        )
    cipher = Cipher(load_key(settings.secret_key, settings.home))
    queue = JobQueue(queue_url)
    await queue.ensure_group()  # a wrong --queue fails here, at once
    store = await open_store(settings)
    owner = Owner(store, timeout=settings.owner_timeout)
    handed_back = False
    transport = execution.make_transport(options.concurrency * 10)
    projector = Projector(store)
    projected = asyncio.Event()
    following: asyncio.Task[None] | None = None
    try:
        await owner.start()
        following = asyncio.create_task(projector.serve(stop=projected))
        consumer = consumer_name()
        worker = Worker(
            queue,
            store,
            owner,
            cipher,
            transport,
            options,
            consumer=consumer,
            store_wait=settings.store_wait,
            excerpt_limit=settings.excerpt_limit,
        )
        _log.info("worker %s takes jobs from %s, group %s", consumer, queue.stream, queue.group)
        try:
            handed_back = await worker.serve(stop)
        finally:
            await worker.aclose()
    finally:
        projected.set()
        if following is not None:
            await asyncio.gather(following, return_exceptions=True)
        await transport.aclose()
        # a job handed back keeps its run claimed by this owner until the timeout: time
        # for the worker that claims the job to adopt the run before any sweep ends it
        await (owner.stop() if handed_back else owner.aclose())
        await store.aclose()
        await queue.aclose()
