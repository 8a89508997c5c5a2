"""The Common Test Report Format (CTRF) JSON report, read by GitHub job summaries
(ctrf-io/github-test-reporter) and other CI dashboards.

It is valid under the official schema (github.com/ctrf-io/ctrf, schema/ctrf.schema.json;
tests/data holds a copy and a test validates against it). Statuses::

    passed                         -> passed
    failed                         -> failed
    skipped (a dependency failed)  -> skipped, message: why
    failed, known failure not expired -> other, rawStatus "known_failure", message: the mark

A known failure is ``other``, not ``skipped``: the test ran and its failure is in
``trace``, which a skip would deny; dashboards count ``other`` apart from failures, so
the report reads as green as Baton's exit code. An expired mark is ``failed`` again.

A shared setup (``use:``) appears once: its tests with the suite
``shared login [setup login.yaml::login]`` and ``extra.setup`` holding its label, the
name the skip messages of the runs using it give.

A run that errored or was cancelled without a failing test gets one extra failed test
named ``(run)``, as in the JUnit report, so no dashboard reads such a run as green.
Secrets are redacted before results reach a reporter; this file holds only what they hold.
"""

from __future__ import annotations

import importlib.metadata
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import msgspec

from orchestrator.reporters import _format as fmt
from orchestrator.reporters.json_report import wall_clock_ms
from orchestrator.results import RunResult, TestResult

SPEC_VERSION = "0.0.0"
"""The version of the CTRF specification (spec/ctrf.md) this report follows."""
TOOL = "baton"
_MESSAGE_LIMIT = 500

Status = Literal["passed", "failed", "skipped", "pending", "other"]


class CtrfTest(msgspec.Struct, omit_defaults=True, rename="camel"):
    name: str
    status: Status
    duration: int
    suite: list[str]
    file_path: str = ""
    message: str = ""
    trace: str = ""
    raw_status: str = ""
    tags: list[str] = []
    retries: int = 0
    flaky: bool = False
    extra: dict[str, Any] = {}


class CtrfSummary(msgspec.Struct):
    tests: int
    passed: int
    failed: int
    skipped: int
    pending: int
    other: int
    flaky: int
    suites: int
    start: int
    stop: int
    duration: int


class CtrfTool(msgspec.Struct):
    name: str
    version: str


class CtrfEnvironment(msgspec.Struct, omit_defaults=True, rename="camel"):
    test_environment: str = ""


class CtrfResults(msgspec.Struct, omit_defaults=True):
    tool: CtrfTool
    summary: CtrfSummary
    tests: list[CtrfTest]
    environment: CtrfEnvironment | None = None


class CtrfReport(msgspec.Struct, omit_defaults=True, rename="camel"):
    report_format: Literal["CTRF"]
    spec_version: str
    report_id: str
    timestamp: str
    generated_by: str
    results: CtrfResults
    run_id: str = ""


def _epoch_ms(iso: str) -> int | None:
    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # runs record UTC
    return int(moment.timestamp() * 1000)


def _status(test: TestResult) -> Status:
    if test.excused:
        return "other"
    return test.status


def _extra(run: RunResult, test: TestResult | None) -> dict[str, Any]:
    extra: dict[str, Any] = {"run_id": run.run_id, "run_status": run.status}
    for name, value in (
        ("environment", run.environment),
        ("batch_id", run.batch_id),
        ("continues", run.continues),
        ("setup", run.setup),
    ):
        if value:
            extra[name] = value
    if fmt.is_batch_row(run):
        extra["row"] = run.row
    if test is not None:
        if test.category:
            extra["category"] = test.category
        if test.known_failure is not None:
            extra["known_failure"] = msgspec.to_builtins(test.known_failure)
    return extra


def _test(run: RunResult, test: TestResult) -> CtrfTest:
    status = _status(test)
    message = trace = ""
    if status in ("failed", "other"):
        message = fmt.headline(test, _MESSAGE_LIMIT)
        trace = fmt.printable("\n".join(fmt.failure_detail(test)))
    elif status == "skipped":
        message = fmt.first_line(fmt.printable(test.message or "skipped"), _MESSAGE_LIMIT)
    elif note := fmt.known_failure_note(test):  # passed, marked known-failing
        message = fmt.first_line(note, _MESSAGE_LIMIT)
    return CtrfTest(
        name=test.name,
        status=status,
        duration=round(test.duration_ms),
        suite=[fmt.run_label(run)],
        file_path=run.file,
        message=message,
        trace=trace,
        raw_status="known_failure" if test.excused else "",
        tags=list(test.tags),
        retries=max(test.attempts - 1, 0),
        flaky=test.status == "passed" and test.attempts > 1,
        extra=_extra(run, test),
    )


def _run_tests(run: RunResult) -> list[CtrfTest]:
    tests = [_test(run, test) for test in run.tests]
    if problem := fmt.run_problem(run):
        tests.append(
            CtrfTest(
                name="(run)",
                status="failed",
                duration=0,
                suite=[fmt.run_label(run)],
                file_path=run.file,
                message=problem,
                raw_status=run.status,
                extra=_extra(run, None),
            )
        )
    return tests


def _version() -> str:
    try:
        return importlib.metadata.version("baton")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def build_ctrf(results: list[RunResult], now: datetime | None = None) -> CtrfReport:
    now = now or datetime.now(UTC)
    tests = [case for run in results for case in _run_tests(run)]
    started_at, duration_ms = wall_clock_ms(results)
    start = _epoch_ms(started_at) if started_at else None
    if start is None:  # no runs, or an unreadable start: end now, as long as it took
        start = int((now - timedelta(milliseconds=duration_ms)).timestamp() * 1000)

    def count(status: Status) -> int:
        return sum(1 for case in tests if case.status == status)

    summary = CtrfSummary(
        tests=len(tests),
        passed=count("passed"),
        failed=count("failed"),
        skipped=count("skipped"),
        pending=count("pending"),
        other=count("other"),
        flaky=sum(1 for case in tests if case.flaky),
        suites=len(results),
        start=start,
        stop=start + round(duration_ms),
        duration=round(duration_ms),
    )
    batches = {run.batch_id for run in results}
    environments = {run.environment for run in results} - {""}
    return CtrfReport(
        report_format="CTRF",
        spec_version=SPEC_VERSION,
        report_id=str(uuid.uuid4()),
        timestamp=now.isoformat(timespec="seconds"),
        generated_by=TOOL,
        results=CtrfResults(
            CtrfTool(TOOL, _version()),
            summary,
            tests,
            # --env NAME, when every run had the same: dashboards group reports by it
            CtrfEnvironment(environments.pop()) if len(environments) == 1 else None,
        ),
        # CTRF's runId is the logical run that shards share: Baton's batch
        run_id=batches.pop() if len(batches) == 1 and "" not in batches else "",
    )


def write_ctrf(results: list[RunResult], path: Path) -> None:
    """Write the CTRF report to ``path``, creating its directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    encoded = msgspec.json.format(msgspec.json.encode(build_ctrf(results)), indent=2)
    path.write_bytes(encoded + b"\n")
