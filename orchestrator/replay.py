"""``baton replay``: a flow's current ``expect`` and ``capture`` against the responses a run
stored, without sending a request and without recording anything.

The responses are the run's ResponseReceived events (each test's last): status, headers
(credentials masked) and the body excerpt (redacted, BATON_EXCERPT_LIMIT characters). A
check that fails on an excerpt cut short says so instead of blaming the API.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonpath_rfc9535
import msgspec

from events import types as ev
from events.context import decrypted_variables, fold, hidden_values
from events.secrets import MASK, Cipher, Redactor
from events.store import EventStore
from orchestrator import templating
from orchestrator.assertions import evaluate
from orchestrator.captures import CaptureError, capture, compile_path, select
from orchestrator.compiled import CompiledTest, redaction_policy
from orchestrator.continuation import run_again
from orchestrator.errors import UsageError
from orchestrator.execution import Options
from orchestrator.known_failures import judged
from orchestrator.rerun import read_chain
from orchestrator.results import AssertionResult, ResponseView, RunResult, TestResult
from orchestrator.runner import initial_namespace


async def replay(
    store: EventStore,
    cipher: Cipher,
    run_id: str,
    options: Options,
    *,
    flow: Path | None,
    excerpt_limit: int,
) -> RunResult:
    """The run's stored responses checked by the flow as it is now."""
    began = time.perf_counter()
    events = await store.read_stream(ev.run_stream(run_id))
    if not events or not isinstance(events[0].event, ev.RunStarted):
        raise UsageError(f"no run {run_id!r} in the event store (see `baton runs`)")
    started = events[0].event
    job, inputs = await run_again(store, options, flow, started)
    context = fold(events)
    namespace: dict[str, Any] = initial_namespace(inputs)
    namespace.update(decrypted_variables(context, cipher))
    known = [inputs.secrets[n] for n in job.plan.secret_names if n in inputs.secrets]
    flow_spec = job.plan.loaded.flow
    redactor = Redactor(
        [*known, *hidden_values(context, cipher)], redaction_policy(flow_spec.defaults.redact)
    )
    responses, planned = await _stored(store, events)
    checker = _Checker(job.plan.loaded.base_dir, namespace, redactor, excerpt_limit)
    tests = []
    for name in job.plan.order:
        response = responses.get(name)
        if response is None:
            reason = (
                f"run {run_id} stored no response of this test"
                if name in planned
                else f"run {run_id} did not have this test (the flow gained it since)"
            )
            tests.append(TestResult(name=name, status="skipped", message=reason))
        else:
            compiled = job.plan.compiled[name]
            result = checker.test(compiled, response)
            # judged as a run today would: a known failure does not fail the replay either
            result.known_failure = judged(compiled.spec.known_failure, inputs.today)
            tests.append(result)
    failed = any(t.status == "failed" and not t.excused for t in tests)
    status: ev.RunStatus = "failed" if failed else "passed"
    return RunResult(
        run_id=run_id,
        suite=flow_spec.name,
        file=job.plan.loaded.label,
        status=status,
        started_at=datetime.now(UTC).isoformat(),
        duration_ms=round((time.perf_counter() - began) * 1000, 3),
        tests=tests,
        environment=started.environment,
    )


async def _stored(
    store: EventStore, events: list[ev.RecordedEvent]
) -> tuple[dict[str, ev.ResponseReceived], set[str]]:
    """Each test's last stored response and the tests planned, along the run's chain: a
    rerun carried over tests that passed in the runs it continues, whose logs hold them."""
    responses: dict[str, ev.ResponseReceived] = {}
    planned: set[str] = set()
    for log in await read_chain(store, events):
        stored = {r.event.test: r.event for r in log if isinstance(r.event, ev.ResponseReceived)}
        responses = stored | responses
        if log and isinstance(started := log[0].event, ev.RunStarted):
            planned.update(test.name for test in started.plan)
    return responses, planned


class _Checker:
    def __init__(
        self, base_dir: Path, namespace: dict[str, Any], redactor: Redactor, limit: int
    ) -> None:
        self.base_dir = base_dir
        self.namespace = namespace
        self.redactor = redactor
        self.limit = limit

    def test(self, compiled: CompiledTest, stored: ev.ResponseReceived) -> TestResult:
        view = ResponseView(
            status=stored.status,
            headers={k.lower(): v for k, v in stored.headers.items()},
            text=stored.body_excerpt,
            duration_ms=stored.timings.total_ms,
        )
        name = compiled.name
        checks: list[AssertionResult] = []
        try:
            if compiled.expect is not None:
                checks = evaluate(self._expect(compiled), view, base_dir=self.base_dir)
        except templating.TemplateError as exc:
            return self._failed(name, "template", f"template error: {exc}", [], view)
        safe = [self._safe(check) for check in checks]
        # a secret was masked when the response was stored: a check of that value cannot be
        # judged again (it passed or failed on the clear value), so it does not fail here
        safe = [_unjudged(check) if _masked(check, view) else check for check in safe]
        failed = [check for check in safe if not check.passed]
        if failed:
            first = failed[0]
            message = (
                f"{len(failed)} of {len(checks)} checks failed; first: {first.subject} "
                f"{first.predicate}: expected {_short(first.expected)}, got {_short(first.actual)}"
            )
            return self._failed(name, "assertion", message, safe, view)
        captured: dict[str, Any] = {}
        for capture_name, spec in compiled.captures.items():
            if spec.collect:
                continue  # every page's values: one stored response does not hold them
            try:
                captured[capture_name] = self.redactor.redact_value(
                    capture(capture_name, spec, view)
                )
            except CaptureError as exc:
                return self._failed(name, "capture", exc.shown(self.redactor), safe, view)
        unjudged = [check.subject for check in safe if check.message == UNJUDGED]
        note = (
            f"not checked, masked in the stored response: {', '.join(unjudged)}" if unjudged else ""
        )
        return TestResult(
            name=name, status="passed", message=note, assertions=safe, captures=captured
        )

    def _expect(self, compiled: CompiledTest) -> Any:
        expectation = compiled.expect
        assert expectation is not None
        if expectation.renderer is None:
            return expectation.spec
        rendered = expectation.renderer(self.namespace)
        try:
            return msgspec.convert(rendered, type(expectation.spec))
        except msgspec.ValidationError as exc:
            raise templating.TemplateError(f"expectations after rendering: {exc}") from None

    def _safe(self, check: AssertionResult) -> AssertionResult:
        redact = self.redactor
        return AssertionResult(
            subject=check.subject,
            predicate=check.predicate,
            expected=redact.redact_value(check.expected),
            actual=redact.redact_value(check.actual),
            passed=check.passed,
            message=redact.redact(check.message),
        )

    def _failed(
        self,
        name: str,
        category: ev.FailureCategory,
        message: str,
        checks: list[AssertionResult],
        view: ResponseView,
    ) -> TestResult:
        if self._cut_short(view):
            size = len(view.text.encode("utf-8"))
            message = (
                f"the stored response excerpt ({size} bytes) is too short for this check; "
                f"raise BATON_EXCERPT_LIMIT (now {self.limit}) and run again ({message})"
            )
        return TestResult(
            name=name,
            status="failed",
            category=category,
            message=self.redactor.redact(message),
            assertions=checks,
        )

    def _cut_short(self, view: ResponseView) -> bool:
        """The body was longer than what the event kept: an excerpt at the limit, or a JSON
        response whose excerpt does not parse."""
        if len(view.text) >= self.limit:
            return True
        if "json" not in view.headers.get("content-type", "") or not view.text:
            return False
        try:
            msgspec.json.decode(view.text)
        except msgspec.DecodeError:
            return True
        return False


UNJUDGED = "not checked: the stored response has this value masked (a secret)"


def _masked(check: AssertionResult, view: ResponseView) -> bool:
    """Whether a failed check reads a value the stored response holds masked."""
    if check.passed:
        return False
    if check.subject.startswith("header "):
        return MASK in view.headers.get(check.subject.removeprefix("header ").lower(), "")
    if check.subject == "body":
        return MASK in view.text
    if check.subject.startswith("json "):
        try:
            found = select(compile_path(check.subject.removeprefix("json ")), view.json)
        except (ValueError, jsonpath_rfc9535.JSONPathError):
            return False
        return MASK in msgspec.json.encode(found).decode()
    return False


def _unjudged(check: AssertionResult) -> AssertionResult:
    return msgspec.structs.replace(check, passed=True, actual=MASK, message=UNJUDGED)


def _short(value: Any, limit: int = 120) -> str:
    text = value if isinstance(value, str) else msgspec.json.encode(value).decode()
    return text if len(text) <= limit else text[: limit - 1] + "…"
