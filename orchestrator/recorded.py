"""A run's results rebuilt from its events: what the runner returned, read back from the log.

``baton report --batch`` merges the runs other processes made (the shards of a CI matrix),
so it has only their events. What it rebuilds is what the runner's ``RunResult`` held,
with two gaps the events do not carry: an assertion's explanatory ``message`` (its
expected and actual are there) and a test's ``tags``. Secret captures are ``***``, as
the runner reports them; every other string was redacted before it was stored.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC

from events import types as ev
from events.secrets import MASK
from orchestrator.results import AssertionResult, Exchange, RunResult, TestResult


class _Test:
    """What the events of one test say, as they come."""

    def __init__(self) -> None:
        self.assertions: list[AssertionResult] = []
        self.captures: dict[str, object] = {}
        self.exchange: Exchange | None = None
        self.result: TestResult | None = None

    def sent(self, event: ev.RequestSent) -> None:
        self.exchange = Exchange(
            method=event.method,
            url=event.url,
            request_headers=dict(event.headers),
            request_body=event.body_excerpt,
        )

    def received(self, event: ev.ResponseReceived) -> None:
        if self.exchange is None:
            return
        self.exchange.status = event.status
        self.exchange.response_headers = dict(event.headers)
        self.exchange.response_excerpt = event.body_excerpt
        self.exchange.duration_ms = event.timings.total_ms

    def finished(self, event: ev.TestPassed | ev.TestFailed | ev.TestSkipped) -> None:
        if isinstance(event, ev.TestSkipped):
            self.result = TestResult(
                name=event.test, status="skipped", category=event.category, message=event.reason
            )
            return
        failed = isinstance(event, ev.TestFailed)
        self.result = TestResult(
            name=event.test,
            status="failed" if failed else "passed",
            duration_ms=event.duration_ms,
            attempts=event.attempts,
            category=event.category if isinstance(event, ev.TestFailed) else None,
            message=event.message if isinstance(event, ev.TestFailed) else "",
            assertions=self.assertions,
            captures=self.captures,
            exchange=self.exchange if failed else None,
            known_failure=event.known_failure,
        )


def run_result(recorded: Iterable[ev.RecordedEvent]) -> RunResult | None:
    """The run of a stream's events (in version order), or None until it has ended
    (RunCompleted or RunCancelled); its tests in plan order, those that finished."""
    started, tests, end = _read(recorded)
    if started is None or end is None:
        return None
    return _ended(started, end, [t.result for t in tests.values() if t.result])


def finished_tests(recorded: Iterable[ev.RecordedEvent]) -> dict[str, TestResult]:
    """The tests of a run, ended or not, that have their result, by name (plan order)."""
    _, tests, _ = _read(recorded)
    return {name: test.result for name, test in tests.items() if test.result is not None}


def _read(
    recorded: Iterable[ev.RecordedEvent],
) -> tuple[ev.RecordedEvent | None, dict[str, _Test], ev.RecordedEvent | None]:
    """RunStarted, what each test's events say, and the event that ended the run."""
    started: ev.RecordedEvent | None = None
    tests: dict[str, _Test] = {}
    ended: ev.RecordedEvent | None = None
    for item in recorded:
        event = item.event
        if isinstance(event, ev.RunStarted):
            started = item
            tests = {planned.name: _Test() for planned in event.plan}
            continue
        if isinstance(event, ev.RunCompleted | ev.RunCancelled) and started is not None:
            ended = item
            continue
        # a rerun's reused captures name tests outside its plan: no result of this run's
        name = getattr(event, "test", "")
        test = tests.get(name)
        if test is None:
            continue
        if isinstance(event, ev.TestStarted) and event.attempt == 1:
            # sent again from the start (a worker resumed the run its killed one began):
            # what the first try recorded is no part of the result
            tests[name] = _Test()
        elif isinstance(event, ev.RequestSent):
            test.sent(event)
        elif isinstance(event, ev.ResponseReceived):
            test.received(event)
        elif isinstance(event, ev.AssertionEvaluated):
            test.assertions.append(
                AssertionResult(
                    event.subject, event.predicate, event.expected, event.actual, event.passed
                )
            )
        elif isinstance(event, ev.VariableCaptured | ev.AuthTokenUpdated):
            secret = isinstance(event, ev.AuthTokenUpdated) or event.secret
            test.captures[event.name] = MASK if secret else event.value
        elif isinstance(event, ev.TestPassed | ev.TestFailed | ev.TestSkipped):
            test.finished(event)
    return started, tests, ended


def _ended(started: ev.RecordedEvent, end: ev.RecordedEvent, tests: list[TestResult]) -> RunResult:
    first = started.event
    assert isinstance(first, ev.RunStarted)
    last = end.event
    if isinstance(last, ev.RunCompleted):
        status: ev.RunStatus = last.status
        duration = last.duration_ms
    else:  # cancelled: no duration of its own
        status = "cancelled"
        duration = round((end.recorded_at - started.recorded_at).total_seconds() * 1000, 3)
    return RunResult(
        run_id=first.run_id,
        suite=first.suite,
        file=first.source,
        status=status,
        started_at=started.recorded_at.astimezone(UTC).isoformat(),
        duration_ms=duration,
        tests=tests,
        environment=first.environment,
        batch_id=first.batch_id,
        row=first.row,
    )
