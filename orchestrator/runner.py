"""Runs a plan: sends the requests, checks, captures, and records every step as an event.

The runner never prints. It hands each event to the event writer (the log), which hands
it on to an observer (live progress) once it is stored, and returns plain result data for
the reporters. While the store is unreachable, the writer holds every request back
(``BatchingWriter.writable``): a run pauses rather than sends what it could not record.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, TypeVar

import httpx

from events import types as ev
from events.context import assign_dotted
from events.secrets import Cipher, Redactor
from events.settings import EXCERPT_LIMIT
from events.writer import BatchingWriter
from orchestrator import templating
from orchestrator.auth import TokenCache
from orchestrator.compiled import redaction_policy
from orchestrator.planner import Plan
from orchestrator.results import RunResult, TestResult
from orchestrator.run_client import RunClient
from orchestrator.services import Clock, Health, Limiters, ResolvedService, SystemClock, resolve
from orchestrator.services import service_of as _service_of
from orchestrator.testcase import TestExecution

Observer = Callable[[str, ev.Event], None]


@dataclass(frozen=True)
class Resume:
    """A run that another process began and did not end (a ``baton worker`` killed mid-job):
    its stream holds ``version`` events, RunStarted first. The tests in ``finished`` ended
    there and are not sent again; what they captured comes back in ``captures`` (the
    template namespace, secrets in clear). ``failure``: end the run as failed, every test
    not yet finished skipped with this reason, instead of running them."""

    version: int
    finished: Mapping[str, TestResult]
    captures: Mapping[str, Any]
    failure: str = ""


T = TypeVar("T")


@dataclass(frozen=True)
class RunInputs:
    """What one run reads besides captures: variables (lowest precedence first, already
    merged), the process environment and the secrets; and what its events say of it that
    the flow does not (the service's organization and project, a rerun's reused captures)."""

    variables: Mapping[str, Any]
    env: Mapping[str, str]
    secrets: Mapping[str, str]
    environment: str = ""
    row: int = -1
    batch_id: str = ""
    tags: tuple[str, ...] = ()
    """The --tag selection the run was started with."""
    hidden: tuple[str, ...] = ()
    """Secret values besides the ``secrets.*`` the flow reads: an environment's other
    secrets, the secret captures a rerun reuses. Masked, and a capture equal to one is a
    secret capture."""
    organization: str = ""
    """The organization's id, for a run the service starts."""
    project: str | None = None
    """The project the run belongs to; None: the flow's ``project``."""
    reused: tuple[ev.VariableCaptured | ev.AuthTokenUpdated, ...] = ()
    """Captures of an earlier run (a rerun's), recorded right after RunStarted, under the
    tests that captured them: the run's context holds them as the earlier one did."""
    reused_at: Mapping[tuple[str, str], int] = field(default_factory=dict)
    """By (test, capture name): when a reused capture was made (microseconds since the
    Unix epoch), the time its event is recorded with here too, so that a ``ttl`` counts
    from the capture, not from the rerun that took it over."""
    run_id: str = field(default_factory=lambda: str(ev.new_id()))
    resume: Resume | None = None
    """Go on with a run whose stream already begins (see Resume), instead of starting it."""
    session_id: str = ""
    """The test session the run was admitted to (events.sessions), if any."""
    continues: str = ""
    """The run this one reruns (RunStarted.continues), or ""."""
    today: date = field(default_factory=lambda: datetime.now(UTC).date())
    """The day known-failure marks are judged against (UTC)."""
    cancel_reason: str = "interrupted"
    """The reason its RunCancelled gives if the run's task is cancelled without one
    (``task.cancel(reason)`` gives one): the service's runs on a worker are cancelled only
    through the API, and say so."""
    shared: Mapping[str, Any] = field(default_factory=dict)
    """What the shared setups (``use:``) captured, by dotted name, in clear: in the
    namespace before the variables, as ``reused`` records them."""
    failed_setups: frozenset[str] = frozenset()
    """The labels of the shared setups that did not pass: the tests reading their captures
    are skipped."""
    setup_runs: tuple[str, ...] = ()
    """The runs of the shared setups the run starts with (RunStarted records them)."""


def run_started(plan: Plan, inputs: RunInputs) -> ev.RunStarted:
    """The event a run of ``plan`` with ``inputs`` begins with."""
    return ev.RunStarted(
        run_id=inputs.run_id,
        suite=plan.loaded.flow.name,
        suite_digest=plan.loaded.digest,
        plan=plan.planned,
        environment=inputs.environment,
        batch_id=inputs.batch_id,
        row=inputs.row,
        project=plan.loaded.flow.project if inputs.project is None else inputs.project,
        organization=inputs.organization,
        tags=list(inputs.tags),
        source=plan.loaded.label,
        session_id=inputs.session_id,
        continues=inputs.continues,
        setup_runs=list(inputs.setup_runs),
    )


def initial_namespace(inputs: RunInputs) -> dict[str, Any]:
    """What templates can read before any capture. Variables render in order: each may read
    env, secrets and the variables before it. Raises TemplateError."""
    namespace: dict[str, Any] = {"env": dict(inputs.env), "secrets": dict(inputs.secrets)}
    for name, value in inputs.shared.items():
        assign_dotted(namespace, name, value)
    for name, value in inputs.variables.items():
        namespace[name] = templating.render(value, namespace)
    return namespace


class Runner:
    """Shared by every run of one invocation: the connection pool, the writer, the limit,
    the services' rate limiters and their health as checked before the runs."""

    def __init__(
        self,
        *,
        writer: BatchingWriter,
        cipher: Cipher,
        transport: httpx.AsyncBaseTransport,
        concurrency: int = 10,
        limits: templating.Limits = templating.CLI_LIMITS,
        clock: Clock | None = None,
        limiters: Limiters | None = None,
        excerpt_limit: int = EXCERPT_LIMIT,
    ) -> None:
        """``limiters``: the process's rate limiters, when it makes a Runner per run (the
        service, a worker); by default the Runner's own, for every run it runs."""
        self.writer = writer
        self.limiters = limiters or Limiters(clock or SystemClock())
        self.health: dict[tuple[str, str], Health] = {}
        """By service key: what ``execute`` found before the runs (a service not checked
        has no entry, and its tests run)."""
        self.limits = limits
        self.excerpt_limit = excerpt_limit
        """Characters of each body the events keep (BATON_EXCERPT_LIMIT)."""
        self.cipher = cipher
        self.transport = transport
        self.slots = asyncio.Semaphore(concurrency)
        self.tokens = TokenCache()
        """OAuth2 tokens, shared by the Runner's runs."""

    async def run(self, plan: Plan, inputs: RunInputs) -> RunResult:
        return await RunExecution(self, plan, inputs).execute()

    async def render(self, renderer: templating.Renderer, namespace: Mapping[str, Any]) -> Any:
        """What ``renderer`` makes of ``namespace``: in a render thread if the limits say
        so and it evaluates more than names (a tenant's template cannot hold up the loop)."""
        if self.limits.off_loop and templating.is_costly(renderer):
            return await templating.off_loop(renderer, namespace)
        return renderer(namespace)

    async def off_loop(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` in the render thread if the limits say so: a tenant's checks
        and captures (their patterns, their schemas) cannot hold up the loop either."""
        if self.limits.off_loop:
            return await templating.off_loop(function, *args)
        return function(*args)


class RunExecution:
    def __init__(self, runner: Runner, plan: Plan, inputs: RunInputs) -> None:
        self.runner = runner
        self.plan = plan
        self.flow = plan.loaded.flow
        self.inputs = inputs
        self.stream = ev.run_stream(inputs.run_id)
        self.redactor = Redactor(inputs.hidden, redaction_policy(self.flow.defaults.redact))
        for name in plan.secret_names:
            if name in inputs.secrets:
                self.redactor.add(inputs.secrets[name])
        self.namespace: dict[str, Any] = {}
        self.results: dict[str, TestResult] = {}
        self.client = RunClient(transport=runner.transport)
        self.base_url = ""
        self.services: dict[str, ResolvedService] = {}

    def emit(self, event: ev.Event, at: int | None = None) -> None:
        """Record an event that happened ``at`` (microseconds since the Unix epoch), or now."""
        self.runner.writer.emit(self.stream, event, at)

    async def execute(self) -> RunResult:
        started_at = datetime.now(UTC).isoformat()
        start = time.perf_counter()
        templating.LIMITS.set(self.runner.limits)  # this run's task and its tests' tasks
        resume = self.inputs.resume
        if resume is None or not resume.version:
            self.emit(run_started(self.plan, self.inputs))
            made = self.inputs.reused_at
            for reused in self.inputs.reused:
                self.emit(reused, made.get((reused.test, reused.name)))
        if resume is not None:
            self.runner.writer.resume(self.stream, resume.version)
            self.results.update(resume.finished)
        try:
            if self.runner.limits.off_loop:
                await templating.off_loop(self._prepare)
            else:
                self._prepare()
        except templating.TemplateError as exc:
            if self.inputs.failed_setups:
                # what the flow reads of a failed setup is missing: that is the reason
                for name in self.plan.order:
                    self._skip(name, _setup_failed(self.inputs.failed_setups), "dependency_skipped")
            else:
                for name in self.plan.order:
                    self._skip(name, f"the flow's variables do not render: {exc}", "template")
        else:
            if resume is not None and resume.failure:
                for name in self.plan.order:
                    if name not in self.results:
                        self._skip(name, resume.failure)
            try:
                await self._schedule()
            except asyncio.CancelledError as exc:
                # who cancels the task may say why (``task.cancel(reason)``: the service's
                # API); else the reason is the run's own input
                said = str(exc.args[0]) if exc.args and exc.args[0] else ""
                self.emit(ev.RunCancelled(reason=said or self.inputs.cancel_reason))
                raise
        duration = (time.perf_counter() - start) * 1000
        tests = [self.results[name] for name in self.plan.order]
        failed = sum(1 for t in tests if t.status == "failed")
        skipped = sum(1 for t in tests if t.status == "skipped")
        status: ev.RunStatus = (
            "failed"
            if any(t.status == "failed" and not t.excused for t in tests)
            or any(t.category == "template" for t in tests)
            or (resume is not None and resume.failure)
            # its setup's failure is the run's: what it was to test was not tested
            or bool(self.inputs.failed_setups)
            else "passed"
        )
        self.emit(
            ev.RunCompleted(
                status=status,
                passed=len(tests) - failed - skipped,
                failed=failed,
                skipped=skipped,
                duration_ms=round(duration, 3),
                known_failures=sum(1 for t in tests if t.excused),
            )
        )
        return RunResult(
            run_id=self.inputs.run_id,
            suite=self.flow.name,
            file=self.plan.loaded.label,
            status=status,
            started_at=started_at,
            duration_ms=round(duration, 3),
            tests=tests,
            environment=self.inputs.environment,
            batch_id=self.inputs.batch_id,
            row=self.inputs.row,
            continues=self.inputs.continues,
            failed_setups=sorted(self.inputs.failed_setups),
        )

    def _prepare(self) -> None:
        self.namespace = initial_namespace(self.inputs)
        if self.inputs.resume is not None:
            _merge(self.namespace, self.inputs.resume.captures)
        self.base_url = str(templating.render(self.flow.base_url, self.namespace)).rstrip("/")
        self.services = resolve(self.flow, self.namespace)

    async def _schedule(self) -> None:
        graph = self.plan.graph
        waiting = {
            name: set(graph.predecessors(name))
            for name in self.plan.order
            if name not in self.results  # a resumed run's finished tests stand
        }
        running: dict[asyncio.Task[TestResult], str] = {}
        for name in [name for name in self.plan.order if name in self.results]:
            self._settle(name, waiting)

        def start_ready() -> None:
            for name in self.plan.order:
                if name in waiting and not waiting[name]:
                    del waiting[name]
                    running[asyncio.create_task(self._test(name))] = name

        for name in self.plan.order:
            failed = self.plan.setup_needs.get(name, frozenset()) & self.inputs.failed_setups
            if failed and name in waiting:
                del waiting[name]
                self._skip_tree(name, _setup_failed(failed))
        try:
            start_ready()
            await self._drain(running, waiting, start_ready)
        finally:
            # cancelled (baton run interrupted, or the service cancelling a run): its tests
            # stop with it instead of finishing their requests unobserved
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _drain(
        self,
        running: dict[asyncio.Task[TestResult], str],
        waiting: dict[str, set[str]],
        start_ready: Callable[[], None],
    ) -> None:
        while running:
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                name = running.pop(task)
                self.results[name] = task.result()
                self._settle(name, waiting)
            start_ready()

    def _settle(self, name: str, waiting: dict[str, set[str]]) -> None:
        """The test ``name`` has its result: its dependents may start, or are skipped."""
        result = self.results[name]
        for child in self.plan.graph.successors(name):
            if result.status == "passed":
                waiting.get(child, set()).discard(name)
            elif child in waiting:
                verb = "failed" if result.status == "failed" else "was skipped"
                self._skip_tree(child, f"depends on {name}, which {verb}")
                del waiting[child]

    def _skip_tree(self, name: str, reason: str) -> None:
        if name in self.results:
            return
        self._skip(name, reason, "dependency_skipped")
        for child in self.plan.graph.successors(name):
            self._skip_tree(child, f"depends on {name}, which was skipped")

    def _skip(self, name: str, reason: str, category: ev.FailureCategory | None = None) -> None:
        reason = self.redactor.redact(reason)  # a template error can quote a value
        self.emit(ev.TestSkipped(test=name, reason=reason, category=category))
        test = self.flow.tests[name]
        self.results[name] = TestResult(
            name=name, status="skipped", category=category, message=reason, tags=test.tags
        )

    async def _test(self, name: str) -> TestResult:
        compiled = self.plan.compiled[name]
        skip = compiled.spec.skip
        if skip:
            self._skip(name, skip if isinstance(skip, str) else "skip: true in the flow")
            return self.results[name]
        service = await self._service(name)
        if service is not None:
            health = self.runner.health.get(service.key)
            if health is not None and not health.usable:
                self._skip(name, health.reason)
                return self.results[name]
        limiter = self.runner.limiters.of(service) if service is not None else None
        async with self.runner.slots:
            return await TestExecution(self, compiled, limiter).execute()

    async def _service(self, name: str) -> ResolvedService | None:
        """The service the test calls (see ``services.service_of``)."""
        if not self.services:
            return None
        compiled = self.plan.compiled[name]
        url = ""
        if compiled.spec.service is None:
            try:
                namespace = {**self.namespace, "poll": {"attempt": 1}}
                url = str(await self.runner.render(compiled.request.url, namespace))
            except templating.TemplateError:
                return None  # the test reports it when it renders its request
            if "://" not in url:
                url = f"{self.base_url}/{url.lstrip('/')}"
        return _service_of(compiled.spec, url, self.services)


def _setup_failed(labels: frozenset[str]) -> str:
    return "; ".join(f"setup {label} failed" for label in sorted(labels))


def _merge(namespace: dict[str, Any], captures: Mapping[str, Any]) -> None:
    """``captures`` into ``namespace``, nested names (``auth.token``) into their parents."""
    for name, value in captures.items():
        parent = namespace.get(name)
        if isinstance(parent, dict) and isinstance(value, Mapping):
            _merge(parent, value)
        else:
            namespace[name] = value
