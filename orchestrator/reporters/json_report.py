"""The JSON report: one file with a summary and every run's results.

Shape (``version`` changes only if a field's meaning or type changes; new fields may be
added at any time, so readers should ignore what they do not know)::

    {
      "version": 1,
      "summary": {
        "status": "passed" | "failed",   # failed if any run did not pass
        "runs": 3, "runs_passed": 2, "runs_failed": 1,   # runs_failed: failed, error or cancelled
        "tests": 18, "passed": 15, "failed": 1, "skipped": 2,
        "known_failures": 0,   # failed, but marked known-failing and not expired: not in "failed"
        "started_at": "2024-05-01T10:00:00+00:00",   # the earliest run's start, "" if no runs
        "duration_ms": 1234.5                        # wall clock from first start to last end
      },
      "runs": [RunResult, ...]
    }

Each element of ``runs`` is an ``orchestrator.results.RunResult`` encoded by msgspec, with
default-valued fields left out: ``run_id``, ``suite``, ``file``, ``status``, ``started_at``,
``duration_ms``, ``tests`` (each a ``TestResult``: ``name``, ``status``, ``duration_ms``,
``attempts``, ``category``, ``message``, ``known_failure`` with ``reason``, ``until`` and
``expired`` for a test the flow marks known-failing, ``assertions`` with ``subject``, ``predicate``,
``expected``, ``actual``, ``passed``, ``message``; ``captures``; ``exchange`` with the
request and the response excerpt), for batch rows ``batch_id`` and ``row``, and for a
rerun ``continues`` (the run it reruns), and for a shared setup (``use:``) ``setup``, its
label (``login.yaml::login``): the setup's run is listed once, before the runs using it, and
counts in the summary as any run; a run using a setup that failed names it in
``failed_setups``.
Secrets are redacted before results reach a reporter; this file holds only what they hold.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

import msgspec

from orchestrator.results import RunResult

REPORT_VERSION = 1


class Summary(msgspec.Struct, frozen=True):
    status: Literal["passed", "failed"]
    runs: int
    runs_passed: int
    runs_failed: int
    tests: int
    passed: int
    failed: int
    skipped: int
    started_at: str
    duration_ms: float
    known_failures: int = 0


class JsonReport(msgspec.Struct):
    version: int
    summary: Summary
    runs: list[RunResult]


def _parse_time(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def wall_clock_ms(results: list[RunResult]) -> tuple[str, float]:
    """The earliest start and the time until the last run ended.

    Batch rows run concurrently, so adding their durations would overstate the time a
    user waited; with an unreadable start time the longest run is the best lower bound.
    """
    if not results:
        return "", 0.0
    starts = [_parse_time(run.started_at) for run in results]
    if any(start is None for start in starts) or len({s.tzinfo is None for s in starts if s}) > 1:
        return min(run.started_at for run in results), max(run.duration_ms for run in results)
    spans = [
        (start, start + timedelta(milliseconds=run.duration_ms))
        for start, run in zip(starts, results, strict=True)
        if start is not None
    ]
    first = min(begin for begin, _ in spans)
    last = max(end for _, end in spans)
    earliest = results[starts.index(first)].started_at
    return earliest, (last - first).total_seconds() * 1000


def summarize(results: list[RunResult]) -> Summary:
    tests = [test for run in results for test in run.tests]
    runs_passed = sum(1 for run in results if run.status == "passed")
    known = sum(1 for test in tests if test.excused)
    failed = sum(1 for test in tests if test.status == "failed") - known
    started_at, duration_ms = wall_clock_ms(results)
    return Summary(
        status="passed" if runs_passed == len(results) and not failed else "failed",
        runs=len(results),
        runs_passed=runs_passed,
        runs_failed=len(results) - runs_passed,
        tests=len(tests),
        passed=sum(1 for test in tests if test.status == "passed"),
        failed=failed,
        skipped=sum(1 for test in tests if test.status == "skipped"),
        started_at=started_at,
        duration_ms=round(duration_ms, 3),
        known_failures=known,
    )


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(JsonReport)


def encode_json(results: list[RunResult]) -> bytes:
    report = JsonReport(version=REPORT_VERSION, summary=summarize(results), runs=results)
    return msgspec.json.format(_encoder.encode(report), indent=2)


def write_json(results: list[RunResult], path: Path) -> None:
    """Write the report to ``path``, creating its directory (CI often asks for reports/x.json)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_json(results) + b"\n")


def read_json(path: Path) -> JsonReport:
    """Read a report written by ``write_json`` (to merge shards or compare with history)."""
    return _decoder.decode(path.read_bytes())
