"""Text building blocks shared by the reporters: values, durations, labels, failure detail.

Every reporter shows a failure the same way (the console, the JUnit failure text and the
HTML page), so the wording lives here once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from orchestrator.known_failures import describe
from orchestrator.results import AssertionResult, Exchange, RunResult, TestResult

Paint = Callable[[str, str], str]
"""``paint(style, text)``: the console colours text, the other reporters keep it plain."""

VALUE_LIMIT = 200
BODY_LIMIT = 500
MESSAGE_LIMIT = 300

# Headers that explain a failure best come first; the rest follow in the server's order.
_USEFUL_HEADERS = ("content-type", "content-length", "location", "retry-after", "www-authenticate")
# Terminal escapes from a response body could rewrite the user's screen; XML 1.0 forbids
# most control characters outright. Tab and newline stay.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f\ufffe\uffff\ud800-\udfff]")
_encoder = msgspec.json.Encoder()


def plain(style: str, text: str) -> str:
    return text


def printable(text: str) -> str:
    """Drop control characters (ANSI escapes included) but keep newlines and tabs."""
    return _CONTROL.sub("", text.replace("\r\n", "\n"))


def clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[: max(limit - 1, 0)] + "…"


def first_line(text: str, limit: int = 120) -> str:
    line = text.strip().split("\n", 1)[0]
    more = "\n" in text.strip()
    return clip(line + (" …" if more else ""), limit)


def show(value: Any, limit: int = VALUE_LIMIT) -> str:
    """A value as JSON (strings quoted, so ``"201"`` and ``201`` differ visibly), clipped."""
    try:
        text = _encoder.encode(value).decode()
    except (TypeError, msgspec.EncodeError):
        text = repr(value)
    return clip(printable(text), limit)


def duration(ms: float) -> str:
    if ms < 1000:
        return f"{ms:.0f} ms"
    if ms < 60_000:
        return f"{ms / 1000:.2f} s"
    minutes, seconds = divmod(ms / 1000, 60)
    return f"{minutes:.0f} min {seconds:.0f} s"


def is_batch_row(run: RunResult) -> bool:
    return run.row >= 0


def run_label(run: RunResult) -> str:
    """How every report names a run: a batch row's with its row, a shared setup's with its
    label, the name the skip reasons of the runs using it give (``setup X failed``)."""
    if run.setup:
        return f"{run.suite} [setup {run.setup}]"
    return f"{run.suite} [row {run.row}]" if is_batch_row(run) else run.suite


def counts(passed: int, failed: int, skipped: int, known: int = 0) -> str:
    """``failed`` leaves out the ``known`` failures (marked, not expired)."""
    parts = [f"{passed} passed"]
    if failed:
        parts.append(f"{failed} failed")
    if known:
        parts.append(f"{known} known failure" + ("s" if known > 1 else ""))
    if skipped:
        parts.append(f"{skipped} skipped")
    return ", ".join(parts)


def run_counts(run: RunResult) -> str:
    known = run.known_failures
    return counts(run.count("passed"), run.count("failed") - known, run.count("skipped"), known)


def known_failure_note(test: TestResult) -> str:
    """What the flow's known-failure mark means for this test's result; "" if unmarked."""
    if test.known_failure is None or test.status == "skipped":
        return ""
    return describe(test.known_failure, test.status)


def headline(test: TestResult, limit: int) -> str:
    """One line for a CI's list of failures: the known-failure mark, the runner's message,
    else the first failed check."""
    if note := known_failure_note(test):
        return first_line(note, limit)
    if test.message:
        return first_line(printable(test.message), limit)
    for check in failed_assertions(test):
        expected, actual = show(check.expected, 100), show(check.actual, 100)
        return f"{check.subject} {check.predicate}: expected {expected}, got {actual}"
    return "failed"


def run_problem(run: RunResult) -> str:
    """Why a run failed when none of its tests did (an error or a cancellation), else ""."""
    if run.status == "passed" or run.count("failed") > run.known_failures:
        return ""
    if run.status == "failed" and run.failed_setups:
        return ""  # the setup's own run, in the same report, holds the failure: once
    return "the run was cancelled" if run.status == "cancelled" else f"the run ended: {run.status}"


def pick_headers(headers: dict[str, str], limit: int = 5) -> list[tuple[str, str]]:
    by_name = {name.lower(): (name, value) for name, value in headers.items()}
    chosen = [by_name[name] for name in _USEFUL_HEADERS if name in by_name]
    rest = [item for name, item in by_name.items() if name not in _USEFUL_HEADERS]
    return [(name, clip(printable(value), 120)) for name, value in (chosen + rest)[:limit]]


def failed_assertions(test: TestResult) -> list[AssertionResult]:
    return [check for check in test.assertions if not check.passed]


def assertion_lines(check: AssertionResult, paint: Paint = plain) -> list[str]:
    lines = [f"{check.subject} {check.predicate}"]
    if check.message:
        lines.append(f"  {clip(printable(check.message), MESSAGE_LIMIT)}")
    lines.append(f"  expected: {paint('expected', show(check.expected))}")
    lines.append(f"  actual:   {paint('actual', show(check.actual))}")
    return lines


def exchange_lines(exchange: Exchange, paint: Paint = plain) -> list[str]:
    lines = [f"request:  {exchange.method} {printable(exchange.url)}"]
    if exchange.status is None:
        lines.append("response: none")
        return lines
    took = f"  ({duration(exchange.duration_ms)})" if exchange.duration_ms else ""
    lines.append(f"response: {exchange.status}{took}")
    lines.extend(
        f"  {paint('dim', name)}: {value}"
        for name, value in pick_headers(exchange.response_headers)
    )
    body = clip(printable(exchange.response_excerpt).strip(), BODY_LIMIT)
    lines.extend(f"  {paint('dim', '|')} {line}" for line in body.split("\n") if body)
    return lines


def failure_detail(test: TestResult, paint: Paint = plain) -> list[str]:
    """What went wrong in one test: the message, each failed check, the last exchange."""
    lines: list[str] = []
    if note := known_failure_note(test):
        lines.append(printable(note))
    if test.message:
        category = f"[{test.category}] " if test.category else ""
        lines.append(category + clip(printable(test.message), MESSAGE_LIMIT))
    for check in failed_assertions(test):
        lines.extend(assertion_lines(check, paint))
    if test.exchange is not None:
        lines.extend(exchange_lines(test.exchange, paint))
    if test.attempts > 1:
        lines.append(f"attempts: {test.attempts}")
    return lines


def indent(lines: Iterable[str], prefix: str) -> list[str]:
    return [prefix + line for line in lines]
