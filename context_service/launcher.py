"""Runs the service starts: in this process, in the background, through the CLI's runner.

Each run is an asyncio task with its own event writer. What the runner does not know of
the flow, the service hands it in the run's ``RunInputs``: the organization and project
(in RunStarted), the captures a rerun reuses and the secrets to mask besides the flow's.
A run cancelled through the API has its task cancelled with the reason, which the
runner's RunCancelled gives; one cancelled because the service stops is "interrupted";
its writer takes nothing after the run's end (a test task the runner left behind). The
writers append through the process's Owner (events.owners), which claims each
run while it is open. When a run ends, its task waits for the process's projector to pass
the run's last event (``after_run``) before it reports the run done.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from events import types as ev
from events.owners import Owner
from events.secrets import Cipher
from events.settings import EXCERPT_LIMIT
from events.store import StoreError
from events.writer import DEFAULT_MAX_WAIT, Appender, BatchingWriter
from orchestrator import templating
from orchestrator.execution import health_checked
from orchestrator.planner import Plan
from orchestrator.runner import RunInputs, Runner
from orchestrator.service_runs import API_CANCELLED as CANCELLED_REASON
from orchestrator.services import Limiters, SystemClock

_log = logging.getLogger("baton.service.runs")


@dataclass(frozen=True)
class RunSpec:
    """Everything a run needs, resolved and checked before the task starts."""

    plan: Plan
    inputs: RunInputs
    on_done: Callable[[str, str], Any] | None = field(default=None, compare=False)
    """Called with (state, error) when the task ends: 'finished', 'cancelled' or 'error'."""

    @property
    def run_id(self) -> str:
        return self.inputs.run_id


class _RunWriter(BatchingWriter):
    """The writer of one run: nothing after its RunCompleted or RunCancelled."""

    def __init__(self, store: Appender, *, max_wait: float) -> None:
        super().__init__(store, max_wait=max_wait)
        self._ended = False

    def emit(self, stream: str, event: ev.Event, at: int | None = None) -> None:
        if self._ended:
            return  # a test task the runner left behind after a cancel: the run is over
        if isinstance(event, ev.RunCancelled | ev.RunCompleted):
            self._ended = True
        super().emit(stream, event, at)


class RunLauncher:
    """The runs in flight in this process; ``start`` one, ``cancel`` one, ``aclose`` all."""

    def __init__(
        self,
        store: Appender,
        cipher: Cipher,
        *,
        transport: httpx.AsyncBaseTransport,
        concurrency: int = 10,
        max_wait: float = DEFAULT_MAX_WAIT,
        after_run: Callable[[int], Awaitable[object]] | None = None,
        owner: Owner | None = None,
        excerpt_limit: int = EXCERPT_LIMIT,
    ) -> None:
        """``store``: what the runs' writers append through. ``max_wait``: seconds a run
        stays paused while the store is unreachable. ``after_run``: awaited with the log
        position of a run's last event when the run ends, before its ``on_done``.
        ``owner``: the owner of the runs, told of a run whose events could not be stored
        (it ends the run as interrupted once the store is back)."""
        self._owner = owner
        self._store = store
        # one rate limiter per service for the whole process, whichever run sends
        self._limiters = Limiters(SystemClock())
        self._cipher = cipher
        self._transport = transport
        self._concurrency = concurrency
        self._max_wait = max_wait
        self._after_run = after_run
        self._excerpt_limit = excerpt_limit
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, spec: RunSpec) -> None:
        writer = _RunWriter(self._store, max_wait=self._max_wait)
        task = asyncio.create_task(self._run(spec, writer), name=f"baton-run-{spec.run_id}")
        self._tasks[spec.run_id] = task

    def cancel(self, run_id: str) -> bool:
        """Cancel a run of this process; False if it is not running here."""
        task = self._tasks.get(run_id)
        if task is None or task.done():
            return False
        task.cancel(CANCELLED_REASON)  # the runner's RunCancelled gives it
        return True

    async def wait(self, run_id: str) -> None:
        task = self._tasks.get(run_id)
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self, spec: RunSpec, writer: _RunWriter) -> None:
        state, error = "finished", ""
        runner = Runner(
            writer=writer,
            cipher=self._cipher,
            transport=self._transport,
            concurrency=self._concurrency,
            limits=templating.SERVICE_LIMITS,  # a tenant's templates: bounded, off the loop
            limiters=self._limiters,
            excerpt_limit=self._excerpt_limit,
        )
        try:
            await runner.run(spec.plan, await health_checked(runner, spec.plan, spec.inputs))
        except asyncio.CancelledError:
            state = "cancelled"
        except Exception as exc:  # the task's end is its report: nothing may escape it
            _log.exception("run %s failed", spec.run_id)
            state, error = "error", f"the run failed: {type(exc).__name__}"
        try:
            await writer.aclose()
        except StoreError as exc:
            _log.error("run %s: its events could not all be stored: %s", spec.run_id, exc)
            state, error = "error", "the event store failed during the run"
            if self._owner is not None:
                self._owner.abandon(ev.run_stream(spec.run_id))
        await self._finish(spec, state, error, writer.position)

    async def _finish(self, spec: RunSpec, state: str, error: str, position: int) -> None:
        try:
            if self._after_run is not None and position:
                await self._after_run(position)
            if spec.on_done is not None:
                await spec.on_done(state, error)
        except Exception:
            _log.exception("run %s: recording its end failed", spec.run_id)
        finally:
            self._tasks.pop(spec.run_id, None)

    async def aclose(self) -> None:
        """Cancel every run in flight, wait for each to record its end, close the client."""
        for task in self._tasks.values():
            # the service stops (SIGTERM, SIGINT): the runs record RunCancelled "interrupted",
            # not "cancelled through the API", which nobody asked for
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        await self._transport.aclose()
