"""What a user reads in each report: the console, JUnit XML, JSON and HTML."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from events.types import (
    BatchStarted,
    PlannedTest,
    RunCancelled,
    RunCompleted,
    RunStarted,
    RunStatus,
    TestFailed,
    TestPassed,
    TestSkipped,
    TestStarted,
)
from orchestrator.reporters import (
    ConsoleProgress,
    read_json,
    render_html,
    render_summary,
    write_html,
    write_json,
    write_junit,
)
from orchestrator.results import AssertionResult, Exchange, RunResult, TestResult
from tests.test_dashboard import Page, chromium, page  # noqa: F401  (the browser fixtures)

XSS = '<script>alert("owned")</script>'


def passed(name: str, ms: float = 42.0, captures: dict[str, object] | None = None) -> TestResult:
    return TestResult(name, "passed", duration_ms=ms, attempts=1, captures=captures or {})


def failed_checkout() -> TestResult:
    return TestResult(
        name="checkout",
        status="failed",
        duration_ms=130.0,
        attempts=1,
        category="assertion",
        message="2 of 3 checks failed",
        assertions=[
            AssertionResult("status", "equals", 201, 500, passed=False),
            AssertionResult("json $.total", "equals", 42.5, "n/a", passed=False),
            AssertionResult("header content-type", "contains", "json", "application/json", True),
        ],
        exchange=Exchange(
            method="POST",
            url="https://shop.test/checkout",
            request_headers={"authorization": "***"},
            request_body='{"cart_id": "c-1"}',
            status=500,
            response_headers={"x-trace": "abc", "content-type": "text/html"},
            response_excerpt=f"<h1>oops</h1>{XSS}" + "x" * 2000,
            duration_ms=120.0,
        ),
    )


def skipped(name: str, reason: str) -> TestResult:
    return TestResult(name=name, status="skipped", category="dependency_skipped", message=reason)


def run(
    tests: list[TestResult], *, row: int = -1, status: RunStatus | None = None, seconds: int = 0
) -> RunResult:
    failed = any(test.status == "failed" for test in tests)
    return RunResult(
        run_id=f"r{row}",
        suite="shop checkout",
        file="flows/shop.yaml",
        status=status or ("failed" if failed else "passed"),
        started_at=f"2024-05-01T10:00:0{seconds}+00:00",
        duration_ms=1230.0,
        tests=tests,
        batch_id="b1" if row >= 0 else "",
        row=row,
    )


def failing_run(row: int = -1) -> RunResult:
    return run(
        [
            passed("login", captures={"auth.token": "***", "user_id": 7}),
            failed_checkout(),
            skipped("get_cart", "depends on checkout, which failed"),
        ],
        row=row,
    )


def batch() -> list[RunResult]:
    return [
        run([passed("login"), passed("catalog")], row=1, seconds=0),
        failing_run(row=2),
        run([passed("login"), passed("catalog")], row=3, seconds=1),
    ]


# ---- console summary --------------------------------------------------------------------


def test_summary_names_the_failing_test_with_expected_and_actual() -> None:
    text = render_summary([failing_run()], color=False)
    assert "shop checkout / checkout" in text
    assert "POST https://shop.test/checkout" in text
    assert "expected: 201\n" in text and "actual:   500\n" in text
    assert "expected: 42.5\n" in text and 'actual:   "n/a"\n' in text
    assert "2 of 3 checks failed" in text
    assert "header content-type" not in text  # a passing check is noise here
    assert "get_cart  skipped: depends on checkout, which failed" in text
    assert text.endswith("1 passed, 1 failed, 1 skipped in 1.23 s")


def test_summary_clips_the_body_and_strips_terminal_escapes() -> None:
    result = failing_run()
    exchange = result.tests[1].exchange
    assert exchange is not None
    exchange.response_excerpt = "\x1b[2J" + "y" * 5000
    text = render_summary([result], color=False)
    body = next(line for line in text.splitlines() if "| " in line and "yyy" in line)
    assert len(body) < 600 and body.endswith("…")
    assert "\x1b" not in text


def test_summary_counts_runs_of_a_batch_and_is_green_only_when_all_pass() -> None:
    text = render_summary(batch(), color=False)
    assert "shop checkout [row 2] / checkout" in text
    assert "[row 1]" not in text
    # rows 1 and 3 overlap row 2 in time: the wall clock is 2.23 s, not the 3.69 s sum
    assert text.endswith(
        "3 runs: 2 passed, 1 failed; tests: 5 passed, 1 failed, 1 skipped in 2.23 s"
    )
    green = render_summary([run([passed("login")])], color=True)
    assert green == "\x1b[32m1 passed in 1.23 s\x1b[0m"


def test_summary_reports_a_run_that_errored_without_failing_tests() -> None:
    text = render_summary([run([passed("login")], status="error")], color=False)
    assert "shop checkout: the run ended: error" in text


def test_summary_caps_the_detail_of_many_failures() -> None:
    text = render_summary([failing_run(row=n) for n in range(30)], color=False, max_failures=5)
    assert text.count(" / checkout") == 5
    assert "… and 25 more failed tests" in text


# ---- console progress -------------------------------------------------------------------


def started(run_id: str, row: int = -1) -> RunStarted:
    plan = [PlannedTest(name) for name in ("login", "checkout", "get_cart")]
    return RunStarted(
        run_id=run_id, suite="shop checkout", suite_digest="d", plan=plan, row=row,
        batch_id="b1" if row >= 0 else "",
    )  # fmt: skip


def feed(progress: ConsoleProgress, run_id: str, row: int = -1, fail: bool = True) -> None:
    progress(run_id, started(run_id, row))
    progress(run_id, TestStarted(test="login"))
    progress(run_id, TestPassed(test="login", attempts=1, duration_ms=42.0))
    if fail:
        progress(run_id, TestFailed("checkout", 1, 130.0, "assertion", "status 500, expected 201"))
        progress(run_id, TestSkipped("get_cart", "depends on checkout, which failed"))
    else:
        progress(run_id, TestPassed(test="checkout", attempts=2, duration_ms=1500.0))
        progress(run_id, TestPassed(test="get_cart", attempts=1, duration_ms=3.0))
    status: RunStatus = "failed" if fail else "passed"
    counts = (1, 1, 1) if fail else (3, 0, 0)
    progress(run_id, RunCompleted(status, *counts, duration_ms=1230.0))


def test_progress_without_a_terminal_prints_one_line_per_finished_test() -> None:
    out = io.StringIO()
    with ConsoleProgress(out) as progress:
        feed(progress, "r1")
    assert out.getvalue().splitlines() == [
        "shop checkout",
        "  ✓ login  42 ms",
        "  ✗ checkout  [assertion] status 500, expected 201",
        "  - get_cart  skipped: depends on checkout, which failed",
    ]


def test_progress_of_a_batch_is_one_line_per_run_with_detail_for_failed_rows() -> None:
    out = io.StringIO()
    progress = ConsoleProgress(out)
    progress("b1", BatchStarted("b1", "shop checkout", "rows.csv", ["r1", "r2", "r3"]))
    feed(progress, "r1", row=1, fail=False)
    feed(progress, "r2", row=2)
    feed(progress, "r3", row=3, fail=False)
    assert out.getvalue().splitlines() == [
        "shop checkout: 3 runs from rows.csv",
        "✓ shop checkout [row 1]  3 passed  1.23 s",
        "✗ shop checkout [row 2]  1 passed, 1 failed, 1 skipped  1.23 s",
        "    ✗ checkout  [assertion] status 500, expected 201",
        "    - get_cart  skipped: depends on checkout, which failed",
        "✓ shop checkout [row 3]  3 passed  1.23 s",
    ]


def test_quiet_progress_prints_only_failures() -> None:
    out = io.StringIO()
    progress = ConsoleProgress(out, quiet=True)
    feed(progress, "ok", fail=False)
    feed(progress, "bad")
    feed(progress, "row", row=4)
    assert out.getvalue().splitlines() == [
        "shop checkout",
        "  ✗ checkout  [assertion] status 500, expected 201",
        "✗ shop checkout [row 4]  1 passed, 1 failed, 1 skipped  1.23 s",
        "    ✗ checkout  [assertion] status 500, expected 201",
    ]


def test_concurrent_runs_are_written_as_whole_blocks_in_start_order() -> None:
    """Without a terminal, lines of runs going at once used to interleave under a header
    repeated at every switch. Each run is one block now: the first streams, the others
    are held until the blocks before them are written."""
    out = io.StringIO()
    progress = ConsoleProgress(out)

    def start(run_id: str, suite: str) -> None:
        progress(run_id, RunStarted(run_id=run_id, suite=suite, suite_digest="d", plan=[]))

    def ok(run_id: str, test: str) -> None:
        progress(run_id, TestPassed(test=test, attempts=1, duration_ms=5.0))

    start("a", "alpha")
    start("b", "beta")
    start("c", "gamma")
    ok("a", "a1")
    ok("b", "b1")
    ok("c", "c1")
    progress("c", TestFailed("c2", 1, 9.0, "assertion", "status 500, expected 200"))
    progress("c", RunCompleted("failed", 1, 1, 0, duration_ms=20.0))  # c ends first
    ok("b", "b2")
    ok("a", "a2")
    assert out.getvalue().splitlines() == ["alpha", "  ✓ a1  5 ms", "  ✓ a2  5 ms"]
    progress("a", RunCompleted("passed", 2, 0, 0, duration_ms=20.0))
    ok("b", "b3")
    progress("b", RunCompleted("passed", 3, 0, 0, duration_ms=20.0))
    assert out.getvalue().splitlines() == [
        "alpha",
        "  ✓ a1  5 ms",
        "  ✓ a2  5 ms",
        "beta",
        "  ✓ b1  5 ms",
        "  ✓ b2  5 ms",
        "  ✓ b3  5 ms",
        "gamma",
        "  ✓ c1  5 ms",
        "  ✗ c2  [assertion] status 500, expected 200",
    ]


def test_runs_still_going_when_progress_closes_are_written_too() -> None:
    out = io.StringIO()
    progress = ConsoleProgress(out)
    progress("a", RunStarted(run_id="a", suite="alpha", suite_digest="d", plan=[]))
    progress("b", RunStarted(run_id="b", suite="beta", suite_digest="d", plan=[]))
    progress("b", TestPassed(test="b1", attempts=1, duration_ms=5.0))
    progress("b", RunCancelled(reason="interrupted"))
    progress.close()
    assert out.getvalue().splitlines() == ["beta", "  ✓ b1  5 ms", "  ! cancelled: interrupted"]


def test_progress_colours_only_when_asked_and_respects_no_color(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    coloured = io.StringIO()
    feed(ConsoleProgress(coloured, color=True), "r1")
    assert "\x1b[31m✗\x1b[0m checkout" in coloured.getvalue()

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setenv("NO_COLOR", "1")
    terminal = Terminal()
    with ConsoleProgress(terminal, live=False) as progress:
        feed(progress, "r1")
    assert "\x1b[" not in terminal.getvalue()


def test_live_progress_on_a_terminal_keeps_failures_on_screen() -> None:
    out = io.StringIO()
    with ConsoleProgress(out, live=True, color=False) as progress:
        feed(progress, "r1")
    assert "✗ checkout  [assertion] status 500, expected 201" in out.getvalue()


def test_progress_without_a_terminal_does_not_import_rich() -> None:
    code = (
        "import io, sys\n"
        "from events.types import TestPassed\n"
        "from orchestrator.reporters import ConsoleProgress, render_summary\n"
        "p = ConsoleProgress(io.StringIO())\n"
        "p('r', TestPassed(test='t', attempts=1, duration_ms=1.0))\n"
        "render_summary([], color=False)\n"
        "print(sorted(m for m in ('rich', 'jinja2') if m in sys.modules))\n"
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"


# ---- JUnit ------------------------------------------------------------------------------


def test_junit_has_one_suite_per_run_with_counts_failures_and_skips(tmp_path: Path) -> None:
    path = tmp_path / "reports" / "junit.xml"
    write_junit(batch(), path)
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("7", "1", "0")
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == [f"shop checkout [row {n}]" for n in (1, 2, 3)]
    row2 = suites[1]
    assert (row2.get("tests"), row2.get("failures"), row2.get("skipped")) == ("3", "1", "1")
    assert row2.get("timestamp") == "2024-05-01T10:00:00" and row2.get("time") == "1.230"
    checkout = row2.find("testcase[@name='checkout']")
    assert checkout is not None and checkout.get("time") == "0.130"
    failure = checkout.find("failure")
    assert failure is not None
    assert failure.get("type") == "assertion" and failure.get("message") == "2 of 3 checks failed"
    assert "expected: 201" in (failure.text or "") and 'actual:   "n/a"' in (failure.text or "")
    skip = row2.find("testcase[@name='get_cart']/skipped")
    assert skip is not None and skip.get("message") == "depends on checkout, which failed"
    assert row2.find("testcase[@name='login']/failure") is None


def test_junit_marks_an_errored_run_and_survives_control_characters(tmp_path: Path) -> None:
    broken = failing_run()
    broken.tests[1].message = "bad \x00\x1b[31m bytes"
    errored = run([passed("login")], status="error")
    path = tmp_path / "junit.xml"
    write_junit([broken, errored], path)
    root = ET.parse(path).getroot()
    assert root.get("errors") == "1"
    error = root.find("testsuite[2]/testcase[@name='(run)']/error")
    assert error is not None and error.get("message") == "the run ended: error"
    failure = root.find(".//failure")
    assert failure is not None and failure.get("message") == "bad [31m bytes"


JUNIT_XSD = Path(__file__).resolve().parent / "data" / "junit-10.xsd"


def assert_valid_junit(path: Path) -> None:
    """Valid under Jenkins' junit-10.xsd, as the xUnit plugin checks it before reading."""
    import xmlschema

    errors = [
        f"{error.path}: {error.reason}"
        for error in xmlschema.XMLSchema(JUNIT_XSD).iter_errors(str(path))
    ]
    assert errors == []


def test_junit_is_valid_under_jenkins_junit_xsd(tmp_path: Path) -> None:
    """Every shape a report takes: passed, failed, skipped, a batch, an errored run, a
    cancelled one, control characters, captures in system-out. It carried three
    attributes the schema lacks (testsuites skipped and timestamp, testcase file)."""
    broken = failing_run()
    broken.tests[1].message = "bad \x00\x1b[31m bytes"
    results = [
        *batch(),
        broken,
        run([passed("login")], status="error"),
        run([skipped("a", "cancelled")], status="cancelled"),
        run([]),
    ]
    path = tmp_path / "junit.xml"
    write_junit(results, path)
    assert_valid_junit(path)
    write_junit([], path)
    assert_valid_junit(path)


# ---- JSON -------------------------------------------------------------------------------


def test_json_round_trips_with_a_summary(tmp_path: Path) -> None:
    results = batch()
    path = tmp_path / "out" / "report.json"
    write_json(results, path)
    report = read_json(path)
    assert report.version == 1
    assert report.runs == results
    summary = report.summary
    assert (summary.runs, summary.runs_passed, summary.runs_failed) == (3, 2, 1)
    assert (summary.passed, summary.failed, summary.skipped) == (5, 1, 1)
    assert summary.status == "failed" and summary.duration_ms == 2230.0
    assert '"summary"' in path.read_text()


# ---- HTML -------------------------------------------------------------------------------


def test_html_shows_tests_failures_and_captures(tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    write_html(batch(), path)
    html = path.read_text()
    for name in ("login", "catalog", "checkout", "get_cart", "shop checkout [row 2]"):
        assert name in html
    assert "depends on checkout, which failed" in html
    assert '<td class="mono">201</td>' in html  # expected
    assert "&#34;n/a&#34;" in html  # actual, a JSON string, escaped
    assert "POST https://shop.test/checkout" in html
    assert "user_id" in html and "auth.token" in html


def test_html_escapes_response_bodies_and_loads_nothing_external() -> None:
    html = render_html([failing_run()])
    assert XSS not in html
    assert "&lt;script&gt;alert(&#34;owned&#34;)&lt;/script&gt;" in html
    assert html.count("<script>") == 1  # only the page's own toggle
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "@import" not in html and "url(" not in html


def test_html_status_line_and_request_body_stand_on_lines_of_their_own() -> None:
    html = render_html([failing_run()])
    # trim_blocks ate the line break after the duration: "500  (120 ms)x-trace: abc"
    assert "<pre>500  (120 ms)\nx-trace: abc\ncontent-type: text/html\n\n&lt;h1&gt;oops" in html
    assert "authorization: ***\n\n{&#34;cart_id&#34;" in html


def wide_run() -> RunResult:
    """Values with nowhere to wrap: a long test name, URL, JSON value and header."""
    long = "x" * 150
    test = failed_checkout()
    test.name = "checkout_" + "with_a_very_long_name_" * 4
    test.assertions.append(
        AssertionResult(f"json $.{long}", "equals", {"id": long}, [long, long], passed=False)
    )
    assert test.exchange is not None
    test.exchange.url = f"https://shop.test/checkout/{long}?q={long}"
    test.exchange.response_headers["x-" + long] = long
    return run([passed("login_" + long), test, skipped("get_cart", "depends on " + long)])


_LAYOUT = """(() => {
  document.getElementById("only-failed").checked = false;
  document.getElementById("only-failed").dispatchEvent(new Event("change"));
  document.querySelectorAll("details.run").forEach((d) => { d.open = true; });
  const spills = [];
  for (const card of document.querySelectorAll("details.run")) {
    const edge = card.getBoundingClientRect().right;
    if (card.scrollWidth > card.clientWidth + 1) spills.push("card scrolls: " + card.className);
    for (const part of card.querySelectorAll("table, pre, tr")) {
      if (part.getBoundingClientRect().right > edge + 1) spills.push(part.outerHTML.slice(0, 80));
    }
  }
  if (document.documentElement.scrollWidth > window.innerWidth) spills.push("page scrolls");
  const marks = {};
  for (const row of document.querySelectorAll("details.run.failed tr.test:not(.detail)")) {
    marks[row.classList[1]] = getComputedStyle(row.querySelector(".mark")).color;
  }
  return {spills, marks, width: window.innerWidth};
})()"""


@pytest.mark.parametrize("width", [1280, 390])
async def test_html_report_in_chromium_fits_its_cards_and_marks_each_test(
    page: Page,  # noqa: F811  (the fixture imported above)
    tmp_path: Path,
    width: int,
) -> None:
    """At a desktop's and a phone's width, every table and block stays inside its run's
    card (the checks table spilled out at 390 px), and a passed test of a failed run has
    a green mark (it was red: the run's class coloured every mark in it)."""
    path = tmp_path / "report.html"
    write_html([*batch(), wide_run()], path)
    await page.call(
        "Emulation.setDeviceMetricsOverride",
        width=width,
        height=900,
        deviceScaleFactor=1,
        mobile=False,
    )
    await page.open(path.as_uri())
    layout = await page.js(_LAYOUT)
    assert layout["width"] == width
    assert layout["spills"] == []
    assert layout["marks"] == {
        "passed": "rgb(26, 127, 55)",
        "failed": "rgb(207, 34, 46)",
        "skipped": "rgb(154, 103, 0)",
    }
