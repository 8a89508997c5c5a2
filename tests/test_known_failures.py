"""Known failures: a test the flow marks known-failing still runs and is reported, but fails
the run only once its mark has expired. The real CLI against the demo shop, real PostgreSQL;
the day a mark is judged against is a parameter, so the expiry is checked without waiting."""

from __future__ import annotations

import asyncio
import json
import textwrap
import xml.etree.ElementTree as ET
from datetime import date
from pathlib import Path

from events import types as ev
from events.postgres import PostgresEventStore
from orchestrator.known_failures import judged
from orchestrator.model import KnownFailure
from tests.cli import baton
from tests.test_reporters import assert_valid_junit

FLOW = """
name: known
base_url: "{{{{ env.SHOP_URL }}}}"
tests:
  teapot:
    request: {{url: /health}}
    expect: {{status: 418}}
    known_failure: {{reason: "bug 12: health is no teapot", until: {until}}}
  fixed:
    request: {{url: /health}}
    expect: {{status: 200}}
    known_failure: {{reason: "bug 7", until: {until}}}
  steady:
    request: {{url: /health}}
    expect: {{status: 200}}
"""


def run(tmp_path: Path, until: str) -> tuple[int, str, Path]:
    """``baton run`` of FLOW with every report; (exit code, what it printed, reports dir)."""
    flow = tmp_path / "known.yaml"
    flow.write_text(FLOW.format(until=until))
    out_dir = tmp_path / "reports"
    code, out, err = baton(
        "run",
        str(flow),
        "--junit",
        str(out_dir / "junit.xml"),
        "--json",
        str(out_dir / "report.json"),
        "--html",
        str(out_dir / "report.html"),
    )
    return code, out + err, out_dir


def junit_cases(out_dir: Path) -> dict[str, ET.Element]:
    root = ET.parse(out_dir / "junit.xml").getroot()
    return {case.get("name", ""): case for case in root.iter("testcase")}


async def test_a_known_failure_runs_is_reported_and_does_not_fail_the_run(
    env: dict[str, str], tmp_path: Path, pg_server_dsn: str
) -> None:
    code, out, out_dir = await asyncio.to_thread(run, tmp_path, "2999-12-31")
    assert code == 0, out
    assert "known failure: bug 12: health is no teapot, until 2999-12-31" in out
    assert "known failure passed: bug 7 (marked until 2999-12-31); remove the known_failure" in out
    assert "FAILURES" not in out.replace("KNOWN FAILURES", "")
    known = out[out.index("KNOWN FAILURES") :].splitlines()
    assert known[1:3] == [
        "  ✗ known / teapot  known failure: bug 12: health is no teapot, until 2999-12-31",
        "  ✓ known / fixed  known failure passed: bug 7 (marked until 2999-12-31); "
        "remove the known_failure mark",
    ]
    assert out.splitlines()[-1].startswith("2 passed, 1 known failure in ")

    report = json.loads((out_dir / "report.json").read_text())
    assert report["summary"]["status"] == "passed"
    assert (report["summary"]["failed"], report["summary"]["known_failures"]) == (0, 1)
    [result] = report["runs"]
    tests = {test["name"]: test for test in result["tests"]}
    assert tests["teapot"]["status"] == "failed"  # it ran, and its checks failed
    assert tests["teapot"]["known_failure"] == {
        "reason": "bug 12: health is no teapot",
        "until": "2999-12-31",
    }
    assert tests["fixed"]["status"] == "passed"
    assert "known_failure" not in tests["steady"]

    cases = junit_cases(out_dir)
    skipped = cases["teapot"].find("skipped")
    assert skipped is not None and cases["teapot"].find("failure") is None
    assert skipped.get("message") == "known failure: bug 12: health is no teapot, until 2999-12-31"
    assert "expected: 418" in (cases["teapot"].findtext("system-out") or "")
    assert "known failure passed: bug 7" in (cases["fixed"].findtext("system-out") or "")
    suite = ET.parse(out_dir / "junit.xml").getroot().find("testsuite")
    assert suite is not None and (suite.get("failures"), suite.get("skipped")) == ("0", "1")
    assert_valid_junit(out_dir / "junit.xml")

    html = (out_dir / "report.html").read_text()
    assert "known failure: bug 12: health is no teapot, until 2999-12-31" in html
    assert "known failure passed: bug 7" in html

    # the events say it, for the service and its read tables
    store = await PostgresEventStore.connect(pg_server_dsn)
    try:
        events = [r.event for r in await store.read_stream(ev.run_stream(result["run_id"]))]
    finally:
        await store.aclose()
    [failed] = [e for e in events if isinstance(e, ev.TestFailed)]
    assert failed.known_failure == ev.KnownFailureMark("bug 12: health is no teapot", "2999-12-31")
    passed = {e.test: e.known_failure for e in events if isinstance(e, ev.TestPassed)}
    assert passed == {"fixed": ev.KnownFailureMark("bug 7", "2999-12-31"), "steady": None}
    [completed] = [e for e in events if isinstance(e, ev.RunCompleted)]
    assert (completed.status, completed.failed, completed.known_failures) == ("passed", 1, 1)


async def test_an_expired_mark_fails_the_run_again_and_says_when_it_expired(
    env: dict[str, str], tmp_path: Path
) -> None:
    code, out, out_dir = await asyncio.to_thread(run, tmp_path, "2000-01-31")
    assert code == 1, out
    failures = out[out.index("FAILURES") :]
    assert "known / teapot" in failures
    assert "the known-failure mark expired on 2000-01-31: bug 12: health is no teapot" in failures
    assert out.splitlines()[-1].startswith("2 passed, 1 failed in ")

    report = json.loads((out_dir / "report.json").read_text())
    assert (report["summary"]["status"], report["summary"]["failed"]) == ("failed", 1)
    [teapot] = [t for t in report["runs"][0]["tests"] if t["name"] == "teapot"]
    assert teapot["known_failure"]["expired"] is True

    failure = junit_cases(out_dir)["teapot"].find("failure")
    assert failure is not None
    assert_valid_junit(out_dir / "junit.xml")
    assert failure.get("message") == (
        "the known-failure mark expired on 2000-01-31: bug 12: health is no teapot"
    )
    html = (out_dir / "report.html").read_text()
    assert "the known-failure mark expired on 2000-01-31" in html

    code, issue, err = await asyncio.to_thread(
        baton, "report", "issue", report["runs"][0]["run_id"], "teapot"
    )
    assert code == 0, issue + err
    assert (
        "**Marked in the flow:** the known-failure mark expired on 2000-01-31: "
        "bug 12: health is no teapot"
    ) in issue


def test_a_mark_holds_through_its_last_day_and_expires_the_day_after() -> None:
    mark = KnownFailure(reason="bug 12", until=date(2026, 12, 31))
    assert judged(mark, date(2026, 12, 31)) == ev.KnownFailureMark("bug 12", "2026-12-31")
    assert judged(mark, date(2027, 1, 1)) == ev.KnownFailureMark("bug 12", "2026-12-31", True)
    assert judged(None, date(2027, 1, 1)) is None


def test_a_bad_date_or_a_missing_reason_is_a_usage_error_naming_the_place(
    tmp_path: Path,
) -> None:
    flow = tmp_path / "bad.yaml"
    flow.write_text(
        textwrap.dedent(
            """
            name: bad
            tests:
              a:
                request: {url: "http://127.0.0.1:9/"}
                known_failure: {reason: "bug 1", until: 2026-13-01}
              b:
                request: {url: "http://127.0.0.1:9/"}
                known_failure: {reason: "bug 2", until: next week}
              c:
                request: {url: "http://127.0.0.1:9/"}
                known_failure: {until: 2026-12-01}
            """
        )
    )
    code, out, err = baton("validate", str(flow))
    assert code == 2, out + err
    assert err.splitlines() == [
        f"error: {flow}: tests.a.known_failure.until: '2026-13-01' is not a date "
        "(write it as YYYY-MM-DD, such as 2026-12-31)",
        f"error: {flow}: tests.b.known_failure.until: 'next week' is not a date "
        "(write it as YYYY-MM-DD, such as 2026-12-31)",
        f"error: {flow}: tests.c.known_failure: the field 'reason' is required",
    ]


async def test_the_batch_report_rebuilt_from_the_log_keeps_the_known_failure(
    env: dict[str, str], tmp_path: Path
) -> None:
    """``baton report --batch`` has only the events: the mark must be in them."""
    flow = tmp_path / "known.yaml"
    flow.write_text(FLOW.format(until="2999-12-31"))
    batch = f"known-{tmp_path.name}"
    code, out, err = await asyncio.to_thread(
        baton, "run", "-q", str(flow), "--shard", "1/1", "--batch", batch
    )
    assert code == 0, out + err
    report = tmp_path / "merged.json"
    code, out, err = await asyncio.to_thread(
        baton, "report", "--batch", batch, "--json", str(report)
    )
    assert code == 0, out + err
    assert "known failure: bug 12: health is no teapot, until 2999-12-31" in out
    # each independent test is a unit of its own in a batch: three runs, all passed
    assert out.splitlines()[-1].startswith("3 runs: 3 passed; tests: 2 passed, 1 known failure in ")
    runs = json.loads(report.read_text())["runs"]
    [teapot] = [t for run in runs for t in run["tests"] if t["name"] == "teapot"]
    assert teapot["known_failure"]["until"] == "2999-12-31"


async def test_replay_judges_the_mark_as_a_run_today_would(
    env: dict[str, str], tmp_path: Path
) -> None:
    """A replay reports what a run would: the marked failure does not fail it, until the
    flow's mark (as it is now) has expired."""
    code, out, out_dir = await asyncio.to_thread(run, tmp_path, "2999-12-31")
    assert code == 0, out
    [recorded] = json.loads((out_dir / "report.json").read_text())["runs"]
    flow = tmp_path / "known.yaml"

    code, out, err = await asyncio.to_thread(baton, "replay", recorded["run_id"], str(flow))
    assert code == 0, out + err
    assert "  ✗ known / teapot  known failure: bug 12: health is no teapot, until 2999-12-31" in out
    assert out.splitlines()[-1].startswith("2 passed, 1 known failure in ")

    flow.write_text(FLOW.format(until="2000-01-01"))
    code, out, err = await asyncio.to_thread(baton, "replay", recorded["run_id"], str(flow))
    assert code == 1, out + err
    assert "the known-failure mark expired on 2000-01-01: bug 12: health is no teapot" in out
