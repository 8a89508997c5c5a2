"""The JUnit XML report, in the dialect GitLab, Jenkins, GitHub test reporters and Azure read.

It is valid under Jenkins' junit-10.xsd (the xUnit plugin refuses a report that is not;
tests/data holds the schema and a test validates against it), so it carries no attribute
that schema lacks: the flow file is on the testsuite, not on each testcase, and the totals
of ``testsuites`` are tests, failures, errors and time.

::

    <testsuites name="baton" tests= failures= errors= time=>
      <testsuite name="shop checkout [row 2]" id= tests= failures= errors= skipped=
                 time= timestamp= hostname= file=>
        <properties> run_id, status, environment, batch_id, row, continues, setup </properties>
        <testcase classname="shop checkout [row 2]" name="checkout" time="0.042">
          <failure message="first line" type="assertion">expected/actual, exchange</failure>
        </testcase>
        <testcase ...><skipped message="depends on add_to_cart, which failed"/></testcase>
        <testcase ...><skipped message="known failure: bug 12, until 2026-12-31"/>
          <system-out>the failure</system-out></testcase>
      </testsuite>
    </testsuites>

A known failure (marked, not expired) is a ``<skipped>``, as pytest writes an xfail, so CI
reads the run as green as Baton's exit code does; an expired mark is a ``<failure>`` again.

A shared setup (``use:``) is a testsuite of its own, once, before the runs using it:
``name="shared login [setup login.yaml::login]"`` (classname too) and a ``setup``
property; its failure is a ``<failure>`` there, and the tests it kept from running are
``<skipped message="setup login.yaml::login failed"/>`` in the runs using it, which get no
``(run)`` error of their own for it: one failure, once.

A run that errored or was cancelled without a failing test gets one extra ``(run)``
testcase with an ``<error>``, so CI never reads such a run as green.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path

from orchestrator.reporters import _format as fmt
from orchestrator.reporters.json_report import summarize
from orchestrator.results import RunResult, TestResult

_MESSAGE_LIMIT = 500


def _seconds(ms: float) -> str:
    return f"{ms / 1000:.3f}"


def _timestamp(iso: str) -> str:
    """JUnit's schema wants local-less ``YYYY-MM-DDThh:mm:ss``; runs record UTC."""
    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment.isoformat(timespec="seconds")


def _text(value: str, limit: int | None = None) -> str:
    cleaned = fmt.printable(value)
    return fmt.clip(cleaned, limit) if limit else cleaned


def _set(element: ET.Element, **attributes: str | int) -> None:
    for name, value in attributes.items():
        element.set(name, _text(str(value)))


def _testcase(parent: ET.Element, run: RunResult, test: TestResult) -> ET.Element:
    case = ET.SubElement(parent, "testcase")
    # classname carries the row too: Jenkins and GitLab key results on classname + name,
    # so fifty rows of one suite would otherwise collapse into one test
    _set(case, classname=fmt.run_label(run), name=test.name, time=_seconds(test.duration_ms))
    note = fmt.known_failure_note(test)
    out_lines = [f"captured {name} = {fmt.show(value)}" for name, value in test.captures.items()]
    if test.excused:
        skipped = ET.SubElement(case, "skipped")
        _set(skipped, message=fmt.first_line(note, _MESSAGE_LIMIT))
        out_lines = fmt.failure_detail(test) + out_lines
    elif test.status == "failed":
        failure = ET.SubElement(case, "failure")
        _set(failure, message=fmt.headline(test, _MESSAGE_LIMIT), type=test.category or "")
        failure.text = _text("\n".join(fmt.failure_detail(test)))
    elif test.status == "skipped":
        skipped = ET.SubElement(case, "skipped")
        _set(skipped, message=fmt.first_line(test.message or "skipped", _MESSAGE_LIMIT))
    elif note:  # passed, marked known-failing: the mark can go
        out_lines.insert(0, note)
    if out_lines:
        out = ET.SubElement(case, "system-out")
        out.text = _text("\n".join(out_lines))
    return case


def _testsuite(parent: ET.Element, index: int, run: RunResult) -> tuple[int, int]:
    """Append one run; return its (tests, errors) as counted in the XML."""
    suite = ET.SubElement(parent, "testsuite")
    properties = ET.SubElement(suite, "properties")
    for name, value in (
        ("run_id", run.run_id),
        ("status", run.status),
        ("environment", run.environment),
        ("batch_id", run.batch_id),
        ("row", str(run.row) if run.row >= 0 else ""),
        ("continues", run.continues),
        ("setup", run.setup),
    ):
        if value:
            _set(ET.SubElement(properties, "property"), name=name, value=value)
    for test in run.tests:
        _testcase(suite, run, test)
    errors = 0
    problem = fmt.run_problem(run)
    if problem:
        errors = 1
        case = ET.SubElement(suite, "testcase")
        _set(case, classname=fmt.run_label(run), name="(run)", time="0.000")
        _set(ET.SubElement(case, "error"), message=problem, type=run.status)
    tests = len(run.tests) + errors
    _set(
        suite,
        name=fmt.run_label(run),
        id=index,
        tests=tests,
        failures=run.count("failed") - run.known_failures,
        errors=errors,
        skipped=run.count("skipped") + run.known_failures,
        time=_seconds(run.duration_ms),
        timestamp=_timestamp(run.started_at),
        hostname="localhost",
    )
    if run.file:
        _set(suite, file=run.file)
    return tests, errors


def build_junit(results: list[RunResult]) -> ET.ElementTree[ET.Element]:
    root = ET.Element("testsuites")
    tests = errors = 0
    for index, run in enumerate(results):
        run_tests, run_errors = _testsuite(root, index, run)
        tests += run_tests
        errors += run_errors
    summary = summarize(results)
    _set(
        root,
        name="baton",
        tests=tests,
        failures=summary.failed,
        errors=errors,
        time=_seconds(summary.duration_ms),
    )
    ET.indent(root)
    return ET.ElementTree(root)


def write_junit(results: list[RunResult], path: Path) -> None:
    """Write the JUnit XML report to ``path``, creating its directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    build_junit(results).write(path, encoding="utf-8", xml_declaration=True)
