"""Runs a plan: sends the requests, checks, captures, and records every step as an event.

The runner never prints. It hands each event to the event writer (the log) and to an
observer (live progress), and returns plain result data for the reporters.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import msgspec

from events import types as ev
from events.context import assign_dotted
from events.secrets import Cipher, Redactor
from events.writer import BatchingWriter
from orchestrator import templating
from orchestrator.assertions import evaluate
from orchestrator.captures import CaptureError, capture, is_secret
from orchestrator.model import Expect, Request, Retry, Test, Until, retry_policy, seconds
from orchestrator.planner import Plan
from orchestrator.results import AssertionResult, Exchange, ResponseView, RunResult, TestResult
from orchestrator.run_client import RunClient
from orchestrator.run_client import text as response_text

Observer = Callable[[str, ev.Event], None]
EXCERPT = 2048


@dataclass(frozen=True)
class RunInputs:
    """What one run reads besides captures: variables (lowest precedence first, already
    merged), the process environment and the secrets."""

    variables: Mapping[str, Any]
    env: Mapping[str, str]
    secrets: Mapping[str, str]
    environment: str = ""
    row: int = -1
    batch_id: str = ""
    tags: tuple[str, ...] = ()
    """The --tag selection the run was started with."""
    run_id: str = field(default_factory=lambda: str(ev.new_id()))


def initial_namespace(inputs: RunInputs) -> dict[str, Any]:
    """What templates can read before any capture. Variables render in order: each may read
    env, secrets and the variables before it. Raises TemplateError."""
    namespace: dict[str, Any] = {"env": dict(inputs.env), "secrets": dict(inputs.secrets)}
    for name, value in inputs.variables.items():
        namespace[name] = templating.render(value, namespace)
    return namespace


class Runner:
    """Shared by every run of one invocation: the connection pool, the writer, the limit."""

    def __init__(
        self,
        *,
        writer: BatchingWriter,
        cipher: Cipher,
        transport: httpx.AsyncBaseTransport,
        concurrency: int = 10,
        observer: Observer | None = None,
    ) -> None:
        self.writer = writer
        self.cipher = cipher
        self.transport = transport
        self.slots = asyncio.Semaphore(concurrency)
        self.observer = observer
        # compiled once per spec, not per request; each entry keeps its spec alive, so that
        # its id is not reused while it is cached
        self._expects: dict[int, tuple[templating.Renderer | None, Expect]] = {}
        self._requests: dict[int, tuple[_RequestParts, Test]] = {}
        self._secret_names: dict[int, tuple[set[str], Plan]] = {}

    async def run(self, plan: Plan, inputs: RunInputs) -> RunResult:
        return await _Run(self, plan, inputs).execute()

    def expect_renderer(self, spec: Expect) -> templating.Renderer | None:
        """What renders an expectation's templates; None if it has none."""
        known = self._expects.get(id(spec))
        if known is None:
            data = msgspec.to_builtins(spec)
            has = next(templating.template_strings(data), None) is not None
            known = self._expects[id(spec)] = (
                templating.compile_value(data) if has else None,
                spec,
            )
        return known[0]

    def secret_names(self, plan: Plan) -> set[str]:
        known = self._secret_names.get(id(plan))
        if known is None:
            known = self._secret_names[id(plan)] = (_secret_names(plan), plan)
        return known[0]

    def request_parts(self, test: Test, default_headers: dict[str, str]) -> _RequestParts:
        known = self._requests.get(id(test))
        if known is None:
            known = self._requests[id(test)] = (
                _RequestParts.of(test.request, default_headers),
                test,
            )
        return known[0]


@dataclass(frozen=True)
class _RequestParts:
    """A test's request, compiled: each part a function of the namespace."""

    url: templating.Renderer
    headers: templating.Renderer
    json: templating.Renderer | None
    body: templating.Renderer | None
    form: templating.Renderer | None
    params: templating.Renderer | None

    @classmethod
    def of(cls, request: Request, default_headers: dict[str, str]) -> _RequestParts:
        def optional(value: Any) -> templating.Renderer | None:
            return None if value is None else templating.compile_value(value)

        return cls(
            url=templating.compile_value(request.url),
            headers=templating.compile_value({**default_headers, **request.headers}),
            json=None if request.json is msgspec.UNSET else templating.compile_value(request.json),
            body=optional(request.body),
            form=optional(request.form),
            params=optional(request.params or None),
        )


class _Failure(Exception):
    def __init__(self, category: ev.FailureCategory, message: str) -> None:
        super().__init__(message)
        self.category: ev.FailureCategory = category


class _Run:
    def __init__(self, runner: Runner, plan: Plan, inputs: RunInputs) -> None:
        self.runner = runner
        self.plan = plan
        self.flow = plan.loaded.flow
        self.inputs = inputs
        self.stream = ev.run_stream(inputs.run_id)
        self.redactor = Redactor()
        for name in runner.secret_names(plan):
            if name in inputs.secrets:
                self.redactor.add(inputs.secrets[name])
        self.namespace: dict[str, Any] = {}
        self.results: dict[str, TestResult] = {}
        self.client = RunClient(transport=runner.transport)
        self.base_url = ""

    def emit(self, event: ev.Event) -> None:
        self.runner.writer.emit(self.stream, event)
        if self.runner.observer is not None:
            self.runner.observer(self.inputs.run_id, event)

    async def execute(self) -> RunResult:
        started_at = datetime.now(UTC).isoformat()
        start = time.perf_counter()
        self.emit(
            ev.RunStarted(
                run_id=self.inputs.run_id,
                suite=self.flow.name,
                suite_digest=self.plan.loaded.digest,
                plan=self.plan.planned,
                environment=self.inputs.environment,
                batch_id=self.inputs.batch_id,
                row=self.inputs.row,
                project=self.flow.project,
                tags=list(self.inputs.tags),
                source=self.plan.loaded.label,
            )
        )
        try:
            self._prepare()
        except templating.TemplateError as exc:
            for name in self.plan.order:
                self._skip(name, f"the flow's variables do not render: {exc}", "template")
        else:
            try:
                await self._schedule()
            except asyncio.CancelledError:
                self.emit(ev.RunCancelled(reason="interrupted"))
                raise
        duration = (time.perf_counter() - start) * 1000
        tests = [self.results[name] for name in self.plan.order]
        failed = sum(1 for t in tests if t.status == "failed")
        skipped = sum(1 for t in tests if t.status == "skipped")
        status: ev.RunStatus = (
            "failed" if failed or any(t.category == "template" for t in tests) else "passed"
        )
        self.emit(
            ev.RunCompleted(
                status=status,
                passed=len(tests) - failed - skipped,
                failed=failed,
                skipped=skipped,
                duration_ms=round(duration, 3),
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
        )

    def _prepare(self) -> None:
        self.namespace = initial_namespace(self.inputs)
        self.base_url = str(templating.render(self.flow.base_url, self.namespace)).rstrip("/")

    async def _schedule(self) -> None:
        graph = self.plan.graph
        waiting = {name: set(graph.predecessors(name)) for name in self.plan.order}
        running: dict[asyncio.Task[TestResult], str] = {}

        def start_ready() -> None:
            for name in self.plan.order:
                if name in waiting and not waiting[name]:
                    del waiting[name]
                    running[asyncio.create_task(self._test(name))] = name

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
        graph = self.plan.graph
        while running:
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                name = running.pop(task)
                result = task.result()
                self.results[name] = result
                for child in graph.successors(name):
                    if result.status == "passed":
                        waiting.get(child, set()).discard(name)
                    elif child in waiting:
                        verb = "failed" if result.status == "failed" else "was skipped"
                        self._skip_tree(child, f"depends on {name}, which {verb}")
                        del waiting[child]
            start_ready()

    def _skip_tree(self, name: str, reason: str) -> None:
        if name in self.results:
            return
        self._skip(name, reason, "dependency_skipped")
        for child in self.plan.graph.successors(name):
            self._skip_tree(child, f"depends on {name}, which was skipped")

    def _skip(self, name: str, reason: str, category: ev.FailureCategory | None = None) -> None:
        self.emit(ev.TestSkipped(test=name, reason=reason, category=category))
        test = self.flow.tests[name]
        self.results[name] = TestResult(
            name=name, status="skipped", category=category, message=reason, tags=test.tags
        )

    async def _test(self, name: str) -> TestResult:
        test = self.flow.tests[name]
        if test.skip:
            reason = test.skip if isinstance(test.skip, str) else "skip: true in the flow"
            self._skip(name, reason)
            return self.results[name]
        async with self.runner.slots:
            return await _TestRun(self, name, test).execute()


class _TestRun:
    def __init__(self, run: _Run, name: str, test: Test) -> None:
        self.run = run
        self.name = name
        self.test = test
        self.attempt = 0
        """Requests sent, polls and retries included."""
        self.tries = 0
        """Attempts in the sense of retries: what a flaky-test detector counts."""
        self.unreported: ResponseView | None = None
        self.exchange: Exchange | None = None
        self.assertions: list[AssertionResult] = []
        self.captured: dict[str, Any] = {}

    async def execute(self) -> TestResult:
        start = time.perf_counter()
        try:
            response = await self._send_until()
            self._learn_secrets(response)
            self._report_response()
            self._check(response)
            self._capture(response)
        except _Failure as failure:
            self._report_response()
            duration = (time.perf_counter() - start) * 1000
            message = self.run.redactor.redact(str(failure))
            self.run.emit(
                ev.TestFailed(
                    test=self.name,
                    attempts=self.tries,
                    duration_ms=round(duration, 3),
                    category=failure.category,
                    message=message,
                )
            )
            return self._result("failed", duration, failure.category, message)
        duration = (time.perf_counter() - start) * 1000
        self.run.emit(
            ev.TestPassed(test=self.name, attempts=self.tries, duration_ms=round(duration, 3))
        )
        return self._result("passed", duration)

    def _result(
        self,
        status: ev.TestStatus,
        duration: float,
        category: ev.FailureCategory | None = None,
        message: str = "",
    ) -> TestResult:
        return TestResult(
            name=self.name,
            status=status,
            duration_ms=round(duration, 3),
            attempts=self.tries,
            category=category,
            message=message,
            assertions=self.assertions,
            captures=self.captured,
            exchange=self.exchange if status == "failed" else None,
            tags=self.test.tags,
        )

    def _render(self, renderer: templating.Renderer) -> Any:
        try:
            return renderer(self.run.namespace)
        except templating.TemplateError as exc:
            raise _Failure("template", f"template error: {exc}") from None

    async def _send_until(self) -> ResponseView:
        until = self.test.until
        polls = until.max_attempts if until is not None else 1
        for poll in range(1, polls + 1):
            response = await self._send_with_retries()
            if until is None:
                return response
            checks = evaluate(self._expect(until), response, base_dir=self.run.plan.loaded.base_dir)
            if all(check.passed for check in checks):
                return response
            self._report_response()
            if poll == polls:
                self.assertions.extend(self._record(checks, "until "))
                raise _Failure(
                    "assertion", f"until: the condition still failed after {polls} attempts"
                )
            await asyncio.sleep(seconds(until.interval))
        raise AssertionError("unreachable")

    def _expect(self, expect: Expect | Until) -> Expect:
        renderer = self.run.runner.expect_renderer(expect)
        if renderer is None:
            return expect
        rendered = self._render(renderer)
        try:
            return msgspec.convert(rendered, Until if isinstance(expect, Until) else Expect)
        except msgspec.ValidationError as exc:
            raise _Failure("template", f"expectations after rendering: {exc}") from None

    async def _send_with_retries(self) -> ResponseView:
        flow = self.run.flow
        policy = retry_policy(self.test.retries, flow.defaults.retries)
        for retry in range(policy.attempts + 1):
            self.attempt += 1
            if retry or self.tries == 0:
                self.tries = retry + 1
                self.run.emit(ev.TestStarted(test=self.name, attempt=self.tries))
            try:
                response = await self._send()
            except _Failure as failure:
                if retry < policy.attempts and failure.category in policy_conditions(policy):
                    await asyncio.sleep(_backoff(policy, retry))
                    continue
                raise
            condition = "5xx" if response.status >= 500 else "429" if response.status == 429 else ""
            if condition and condition in policy.on and retry < policy.attempts:
                self._report_response()
                wait = _retry_after(response.headers.get("retry-after"))
                await asyncio.sleep(
                    min(max(wait, _backoff(policy, retry)), seconds(policy.max_delay))
                )
                continue
            return response
        raise AssertionError("unreachable")

    async def _send(self) -> ResponseView:
        run, flow = self.run, self.run.flow
        request: Request = self.test.request
        parts = run.runner.request_parts(self.test, flow.defaults.headers)
        url = str(self._render(parts.url))
        if "://" not in url:
            url = f"{run.base_url}/{url.lstrip('/')}"
        headers = {str(k): str(v) for k, v in self._render(parts.headers).items()}
        content: bytes | str | None = None
        if parts.json is not None:
            content = msgspec.json.encode(self._render(parts.json))
            if not any(name.lower() == "content-type" for name in headers):
                headers["content-type"] = "application/json"
        elif parts.body is not None:
            content = str(self._render(parts.body))
        form = self._render(parts.form) if parts.form is not None else None
        params = self._render(parts.params) if parts.params is not None else None
        timeout = seconds(request.timeout if request.timeout is not None else flow.defaults.timeout)
        follow = (
            request.follow_redirects
            if request.follow_redirects is not None
            else flow.defaults.follow_redirects
        )
        redact = run.redactor.redact
        self.run.emit(
            ev.RequestSent(
                test=self.name,
                attempt=self.attempt,
                method=request.method,
                url=redact(url),
                headers=run.redactor.mask_headers(headers),
                body_excerpt=redact(_text(content or form or "")[:EXCERPT]),
            )
        )
        started = time.perf_counter()
        try:
            prepared = run.client.prepare(
                request.method,
                url,
                headers=headers,
                content=content,
                data=form,
                params=params,
                timeout=timeout,
            )
            response = await run.client.send(prepared, follow_redirects=follow)
        except httpx.TimeoutException:
            self._note_exchange(request.method, url, headers, content or form)
            raise _Failure("timeout", f"no response within {timeout:g} s from {url}") from None
        except httpx.TransportError as exc:
            self._note_exchange(request.method, url, headers, content or form)
            raise _Failure(
                "connection", f"cannot reach {url}: {exc or type(exc).__name__}"
            ) from None
        elapsed = (time.perf_counter() - started) * 1000
        joined: dict[str, str] = {}
        for key, value in response.headers.multi_items():  # lower-case names
            joined[key] = f"{joined[key]}, {value}" if key in joined else value
        view = ResponseView(
            status=response.status_code,
            headers=joined,
            text=response_text(response),
            duration_ms=elapsed,
            set_cookie=tuple(response.headers.get_list("set-cookie"))
            if "set-cookie" in joined
            else (),
        )
        self._note_exchange(request.method, url, headers, content or form)
        self.unreported = view
        return view

    def _report_response(self) -> None:
        """Record the last response. Deferred until the test's secret captures are known, so
        a token is redacted in the very response that brings it."""
        view, self.unreported = self.unreported, None
        if view is None or self.exchange is None:
            return
        excerpt = self.run.redactor.redact(view.text[:EXCERPT])
        masked = self.run.redactor.mask_headers(view.headers)
        self.run.emit(
            ev.ResponseReceived(
                test=self.name,
                attempt=self.attempt,
                status=view.status,
                headers=masked,
                body_excerpt=excerpt,
                timings=ev.Timings(total_ms=round(view.duration_ms, 3)),
            )
        )
        self.exchange.status = view.status
        self.exchange.response_headers = masked
        self.exchange.response_excerpt = excerpt
        self.exchange.duration_ms = round(view.duration_ms, 3)

    def _learn_secrets(self, response: ResponseView) -> None:
        for name, spec in self.test.capture.items():
            if is_secret(name, spec):
                # a capture that fails is reported when the captures run
                with contextlib.suppress(CaptureError):
                    self.run.redactor.add(_secret_text(capture(name, spec, response)))

    def _note_exchange(self, method: str, url: str, headers: dict[str, str], body: Any) -> None:
        redact = self.run.redactor.redact
        self.exchange = Exchange(
            method=method,
            url=redact(url),
            request_headers=self.run.redactor.mask_headers(headers),
            request_body=redact(_text(body or "")[:EXCERPT]),
        )

    def _check(self, response: ResponseView) -> None:
        if self.test.expect is None:
            return
        checks = evaluate(
            self._expect(self.test.expect), response, base_dir=self.run.plan.loaded.base_dir
        )
        self.assertions.extend(self._record(checks))
        failed = [check for check in checks if not check.passed]
        if failed:
            category: ev.FailureCategory = "server_error" if response.status >= 500 else "assertion"
            first = failed[0]
            raise _Failure(
                category,
                f"{len(failed)} of {len(checks)} checks failed; first: {first.subject} "
                f"{first.predicate}: expected {_short(first.expected)}, "
                f"got {_short(first.actual)}" + (f" ({first.message})" if first.message else ""),
            )

    def _record(self, checks: list[AssertionResult], prefix: str = "") -> list[AssertionResult]:
        redact = self.run.redactor.redact_value
        recorded = []
        for check in checks:
            safe = AssertionResult(
                subject=prefix + check.subject,
                predicate=check.predicate,
                expected=redact(check.expected),
                actual=redact(check.actual),
                passed=check.passed,
                message=self.run.redactor.redact(check.message),
            )
            recorded.append(safe)
            self.run.emit(
                ev.AssertionEvaluated(
                    test=self.name,
                    attempt=self.attempt,
                    subject=safe.subject,
                    predicate=safe.predicate,
                    expected=safe.expected,
                    actual=safe.actual,
                    passed=safe.passed,
                )
            )
        return recorded

    def _capture(self, response: ResponseView) -> None:
        run = self.run
        for name, spec in self.test.capture.items():
            try:
                value = capture(name, spec, response)
            except CaptureError as exc:
                raise _Failure("capture", run.redactor.redact(str(exc))) from None
            assign_dotted(run.namespace, name, value)
            if is_secret(name, spec):
                text = _secret_text(value)
                run.redactor.add(text)
                sealed = run.runner.cipher.encrypt(text)
                self.captured[name] = "***"
                if name.startswith("auth."):
                    run.emit(ev.AuthTokenUpdated(test=self.name, name=name, value=sealed))
                else:
                    run.emit(
                        ev.VariableCaptured(test=self.name, name=name, value=sealed, secret=True)
                    )
            else:
                self.captured[name] = value
                run.emit(ev.VariableCaptured(test=self.name, name=name, value=value))


def policy_conditions(policy: Retry) -> set[ev.FailureCategory]:
    wanted: set[ev.FailureCategory] = set()
    if "timeout" in policy.on:
        wanted.add("timeout")
    if "connect" in policy.on:
        wanted.add("connection")
    return wanted


def _backoff(policy: Retry, retry: int) -> float:
    return min(seconds(policy.delay) * policy.backoff**retry, seconds(policy.max_delay))


def _retry_after(value: str | None) -> float:
    """Retry-After in seconds: a number, or an HTTP date; 0 when absent or unreadable."""
    if not value:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return 0.0
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


_SECRET_REFERENCE = re.compile(r"secrets\.(\w+)|secrets\[['\"](\w+)['\"]\]")


def _secret_names(plan: Plan) -> set[str]:
    """Every secret a flow mentions, also those only read under ``| default(...)``."""
    from orchestrator.loader import test_parts

    names: set[str] = set()
    parts = [part for test in plan.loaded.flow.tests.values() for part in test_parts(test)]
    parts.append(("variables", plan.loaded.flow.variables))
    for _, value in parts:
        for text in templating.template_strings(value):
            names.update(a or b for a, b in _SECRET_REFERENCE.findall(text))
    return names


def _secret_text(value: Any) -> str:
    return value if isinstance(value, str) else msgspec.json.encode(value).decode()


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value
    return msgspec.json.encode(value).decode()


def _short(value: Any, limit: int = 120) -> str:
    text = value if isinstance(value, str) and value == "<missing>" else _text(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
