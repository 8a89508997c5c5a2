"""A failed test as a ready-to-file Markdown issue: ``baton report issue RUN_ID TEST`` and
the service's ``GET /api/v1/runs/{id}/tests/{test}/issue``.

Everything comes from the run's events, which the runner redacted as it recorded them.
The report redacts once more with the default policy (events.secrets), so that a
credential the flow never named (an ``Authorization`` header, a ``password`` field, a
bearer token in a body) is masked too, whatever the flow's redaction said; secret
captures are ``***``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from events import types as ev
from events.secrets import MASK, Redactor
from orchestrator.errors import UsageError
from orchestrator.known_failures import describe

SHOWN = 1500
"""Characters of a body the report quotes."""


class NotReportable(UsageError):
    """No failed test of that name in that run. ``missing``: no such run or test at all
    (the service's 404); else the test did not fail (its 409)."""

    def __init__(self, message: str, *, missing: bool) -> None:
        super().__init__(message)
        self.missing = missing


@dataclass
class _Seen:
    """What a run's events say of the reported test, and of the run around it."""

    started: ev.RecordedEvent | None = None
    ended: ev.Event | None = None
    request: ev.RequestSent | None = None
    response: ev.ResponseReceived | None = None
    checks: list[ev.AssertionEvaluated] = field(default_factory=list)
    outcome: ev.TestPassed | ev.TestFailed | ev.TestSkipped | None = None
    statuses: dict[str, str] = field(default_factory=dict)
    captured: dict[str, Any] = field(default_factory=dict)
    """What earlier tests captured before this one failed (secret values masked)."""


def issue_markdown(recorded: Sequence[ev.RecordedEvent], test: str, run_id: str) -> str:
    """The report of ``test``'s failure in the run whose stream is ``recorded``. Raises
    NotReportable."""
    seen = _read(recorded, test)
    if seen.started is None:
        raise NotReportable(
            f"no run {run_id!r} in the event store (see `baton runs`)", missing=True
        )
    started = seen.started.event
    assert isinstance(started, ev.RunStarted)
    planned = {planned.name: planned for planned in started.plan}
    if test not in planned:
        names = ", ".join(planned) or "none"
        raise NotReportable(f"run {run_id} has no test {test!r} (its tests: {names})", missing=True)
    if not isinstance(seen.outcome, ev.TestFailed):
        state = (
            "has not finished"
            if seen.outcome is None
            else "passed"
            if isinstance(seen.outcome, ev.TestPassed)
            else f"was skipped ({seen.outcome.reason})"
        )
        raise NotReportable(
            f"test {test!r} of run {run_id} {state}: an issue report is for a failed test",
            missing=False,
        )
    return _render(seen, seen.outcome, started, planned[test], _Shown(Redactor()))


def _read(recorded: Sequence[ev.RecordedEvent], test: str) -> _Seen:
    seen = _Seen()
    for item in recorded:
        event = item.event
        if isinstance(event, ev.RunStarted):
            seen.started = item
        elif isinstance(event, ev.RunCompleted | ev.RunCancelled):
            seen.ended = event
        elif isinstance(event, ev.TestPassed | ev.TestFailed | ev.TestSkipped):
            seen.statuses[event.test] = _status(event)
            if event.test == test:
                seen.outcome = event
        elif getattr(event, "test", None) != test:
            if isinstance(event, ev.VariableCaptured | ev.AuthTokenUpdated) and (
                seen.outcome is None
            ):
                secret = isinstance(event, ev.AuthTokenUpdated) or event.secret
                seen.captured[event.name] = MASK if secret else event.value
        elif isinstance(event, ev.TestStarted) and event.attempt == 1:
            seen.request, seen.response, seen.checks = None, None, []  # sent again afresh
        elif isinstance(event, ev.RequestSent):
            seen.request, seen.response = event, None
        elif isinstance(event, ev.ResponseReceived):
            seen.response = event
        elif isinstance(event, ev.AssertionEvaluated):
            seen.checks = [c for c in seen.checks if c.attempt == event.attempt] + [event]
    return seen


def _status(event: ev.TestPassed | ev.TestFailed | ev.TestSkipped) -> str:
    return {ev.TestPassed: "passed", ev.TestFailed: "failed"}.get(type(event), "skipped")


class _Shown:
    """Values as the report shows them: redacted with the default policy, and fit for
    Markdown."""

    def __init__(self, redactor: Redactor) -> None:
        self.redactor = redactor

    def text(self, value: str) -> str:
        return self.redactor.redact(value)

    def value(self, value: Any) -> str:
        value = self.redactor.redact_value(value)
        text = value if isinstance(value, str) else msgspec.json.encode(value).decode()
        return self.redactor.redact(text)

    def cell(self, value: Any) -> str:
        text = self.value(value).replace("\n", " ")
        if len(text) > 200:
            text = text[:199] + "…"
        return "`" + text.replace("`", "'").replace("|", "\\|") + "`"

    def block(self, text: str, language: str = "") -> str:
        shown = self.redactor.excerpt(text, SHOWN)
        if len(text) > SHOWN:
            shown += "\n… (cut)"
        fence = "`" * max(3, _longest_backticks(shown) + 1)
        return f"{fence}{language}\n{shown}\n{fence}"

    def headers(self, headers: dict[str, str]) -> str:
        masked = self.redactor.mask_headers(headers)
        return self.block("\n".join(f"{name}: {value}" for name, value in masked.items()), "http")


def _longest_backticks(text: str) -> int:
    return max((len(run) for run in re.findall(r"`+", text)), default=0)


def _render(
    seen: _Seen,
    failed: ev.TestFailed,
    started: ev.RunStarted,
    planned: ev.PlannedTest,
    shown: _Shown,
) -> str:
    test = failed.test
    lines = [
        f"# `{test}` fails in {started.suite}: {failed.category}",
        "",
        f"**What failed:** {shown.text(failed.message)}",
        "",
    ]
    if failed.known_failure is not None:
        # the flow already knows of it: whoever files the issue links it to the known one
        note = describe(failed.known_failure, "failed")
        lines += [f"**Marked in the flow:** {shown.text(note)}", ""]
    lines += [
        "## Request",
        "",
    ]
    request, response = seen.request, seen.response
    if request is None:
        lines += ["No request was sent (it failed before: see above).", ""]
    else:
        lines += [
            f"`{request.method} {shown.text(request.url)}` "
            f"(request {request.attempt}, {failed.attempts} attempt(s))",
            "",
        ]
        if request.headers:
            lines += ["Headers:", "", shown.headers(dict(request.headers)), ""]
        if request.body_excerpt:
            lines += ["Body (excerpt):", "", shown.block(request.body_excerpt), ""]
    lines += ["## Response", ""]
    if response is None:
        lines += ["No response was received.", ""]
    else:
        lines += [f"Status **{response.status}** in {response.timings.total_ms:g} ms", ""]
        if response.headers:
            lines += ["Headers:", "", shown.headers(dict(response.headers)), ""]
        if response.body_excerpt:
            lines += ["Body (excerpt):", "", shown.block(response.body_excerpt), ""]
    failures = [check for check in seen.checks if not check.passed]
    if failures:
        lines += [
            "## Expected against actual",
            "",
            "| check | predicate | expected | actual |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {shown.cell(c.subject)} | {c.predicate} | {shown.cell(c.expected)} "
            f"| {shown.cell(c.actual)} |"
            for c in failures
        ]
        lines.append("")
    lines += ["## Context", ""]
    lines += [
        f"- Run: `{started.run_id}` ({_run_state(seen.ended)}), started "
        f"{seen.started.recorded_at.isoformat() if seen.started else ''}",
        f"- Suite: {started.suite}, file `{started.source or '?'}` "
        f"(sha256 `{started.suite_digest[:12]}`)",
        f"- Project: {started.project}; environment: {started.environment or 'default'}",
    ]
    if started.batch_id:
        lines.append(f"- Batch: `{started.batch_id}`, row {started.row}")
    if started.tags:
        lines.append(f"- Tags: {', '.join(started.tags)}")
    if planned.depends_on:
        deps = ", ".join(
            f"{name} ({kind}, {seen.statuses.get(name, 'not run')})"
            for name, kind in planned.depends_on.items()
        )
        lines.append(f"- Depends on: {deps}")
    if seen.captured:
        lines.append(
            "- Captured before it: "
            + ", ".join(f"`{name}` = {shown.cell(value)}" for name, value in seen.captured.items())
        )
    lines += ["", f"Reproduce: `baton run {started.source or '<flow file>'}`"]
    if started.environment:
        lines[-1] = lines[-1][:-1] + f" --env {started.environment}`"
    return "\n".join(lines) + "\n"


def _run_state(ended: ev.Event | None) -> str:
    if isinstance(ended, ev.RunCompleted):
        return (
            f"{ended.status}: {ended.passed} passed, {ended.failed} failed, {ended.skipped} skipped"
        )
    if isinstance(ended, ev.RunCancelled):
        return f"cancelled: {ended.reason}"
    return "running"
