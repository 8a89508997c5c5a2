"""The CTRF report (``--ctrf FILE``): valid under the official schema, statuses as a CI
dashboard reads them, known failures as ``other``, no secret in clear."""

from __future__ import annotations

import asyncio
import json
import textwrap
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import jsonschema
import pytest

from events.types import KnownFailureMark
from orchestrator.reporters import build_ctrf, write_ctrf
from orchestrator.results import AssertionResult, Exchange, RunResult, TestResult
from tests.cli import baton

SCHEMA = json.loads((Path(__file__).parent / "data" / "ctrf.schema.json").read_text())


def assert_valid(report: dict[str, Any]) -> None:
    validator = jsonschema.Draft7Validator(SCHEMA, format_checker=jsonschema.FormatChecker())
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(report)]
    assert not errors, errors


def encoded(results: list[RunResult]) -> dict[str, Any]:
    import msgspec

    decoded: dict[str, Any] = msgspec.to_builtins(build_ctrf(results))
    return decoded


def result(name: str, status: str, mark: KnownFailureMark | None = None, **kw: Any) -> TestResult:
    return TestResult(name, status, duration_ms=12.6, attempts=1, known_failure=mark, **kw)  # type: ignore[arg-type]


def failing_checkout() -> TestResult:
    return result(
        "checkout",
        "failed",
        category="assertion",
        assertions=[AssertionResult("status", "equals", 201, 500, passed=False)],
        exchange=Exchange("POST", "https://shop.test/checkout", status=500),
    )


def run(
    tests: list[TestResult], status: str, row: int = -1, batch: str = "", environment: str = ""
) -> RunResult:
    return RunResult(
        run_id=f"run-{row}",
        suite="shop",
        file="flows/shop.yaml",
        status=status,  # type: ignore[arg-type]
        started_at="2026-05-01T10:00:00+00:00",
        duration_ms=1500.4,
        tests=tests,
        batch_id=batch,
        row=row,
        environment=environment,
    )


def test_every_outcome_is_valid_ctrf_with_the_status_a_dashboard_counts() -> None:
    known = KnownFailureMark("bug 12", "2099-12-31")
    expired = KnownFailureMark("bug 7", "2020-01-01", expired=True)
    results = [
        run(
            [
                result("login", "passed", tags=["smoke"]),
                failing_checkout(),
                result("get_cart", "skipped", message="depends on checkout, which failed"),
                result("refund", "failed", known, message="500 on refund"),
                result("stale", "failed", expired, message="still broken"),
                TestResult("flaky", "passed", duration_ms=3.0, attempts=3),
            ],
            "failed",
            row=1,
            batch="ci-42",
            environment="staging",
        ),
        run([result("login", "passed")], "cancelled", 2, "ci-42", "staging"),
    ]
    report = encoded(results)
    assert_valid(report)
    assert report["reportFormat"] == "CTRF"
    assert report["runId"] == "ci-42"
    assert report["results"]["environment"] == {"testEnvironment": "staging"}
    tests = {(t["suite"][0], t["name"]): t for t in report["results"]["tests"]}
    row1 = "shop [row 1]"
    assert tests[row1, "login"]["status"] == "passed"
    assert tests[row1, "login"]["tags"] == ["smoke"]
    assert tests[row1, "login"]["duration"] == 13
    checkout = tests[row1, "checkout"]
    assert checkout["status"] == "failed"
    assert checkout["message"] == "status equals: expected 201, got 500"
    assert "request:  POST https://shop.test/checkout" in checkout["trace"]
    assert tests[row1, "get_cart"]["status"] == "skipped"
    assert tests[row1, "get_cart"]["message"] == "depends on checkout, which failed"
    refund = tests[row1, "refund"]
    assert (refund["status"], refund["rawStatus"]) == ("other", "known_failure")
    assert refund["message"] == "known failure: bug 12, until 2099-12-31"
    assert "500 on refund" in refund["trace"]
    assert tests[row1, "stale"]["status"] == "failed"
    assert "expired on 2020-01-01" in tests[row1, "stale"]["message"]
    assert tests[row1, "flaky"] | {"retries": 2, "flaky": True} == tests[row1, "flaky"]
    # a cancelled run without a failed test still fails the report
    assert tests["shop [row 2]", "(run)"]["status"] == "failed"
    assert tests["shop [row 2]", "(run)"]["message"] == "the run was cancelled"
    summary = report["results"]["summary"]
    assert {k: summary[k] for k in ("tests", "passed", "failed", "skipped", "other", "flaky")} == {
        "tests": 8,
        "passed": 3,
        "failed": 3,
        "skipped": 1,
        "other": 1,
        "flaky": 1,
    }
    assert summary["stop"] - summary["start"] == summary["duration"] == 1500
    assert summary["start"] == 1777629600000  # 2026-05-01T10:00:00Z in ms


def test_no_runs_is_still_a_valid_report(tmp_path: Path) -> None:
    write_ctrf([], tmp_path / "reports" / "ctrf.json")
    report = json.loads((tmp_path / "reports" / "ctrf.json").read_text())
    assert_valid(report)
    assert report["results"]["summary"]["tests"] == 0
    assert "environment" not in report["results"] and "runId" not in report


PASSWORD = "hunter2-ctrf-canary"
FLOW = textwrap.dedent("""
    name: ctrf canary
    base_url: "{{ env.SHOP_URL }}"
    tests:
      echo:
        request:
          method: POST
          url: /echo
          params: {q: "{{ secrets.SHOP_PASSWORD }}"}
          json: {note: "{{ secrets.SHOP_PASSWORD }}"}
        expect:
          json: {"$.method": GET}   # fails on purpose: its exchange is reported
      after:
        depends_on: [echo]
        request: {url: /health}
""")


@pytest.mark.usefixtures("env")
async def test_baton_run_writes_ctrf_without_a_secret_in_clear(tmp_path: Path) -> None:
    (tmp_path / "flow.yaml").write_text(FLOW)
    (tmp_path / "secrets.yaml").write_text(f"SHOP_PASSWORD: {PASSWORD}\n")
    target = tmp_path / "out" / "ctrf.json"
    code, out, err = await asyncio.to_thread(
        baton,
        *("run", str(tmp_path / "flow.yaml"), "--secrets", str(tmp_path / "secrets.yaml")),
        *("--ctrf", str(target)),
    )
    assert code == 1, out + err
    text = target.read_text()
    report = json.loads(text)
    assert_valid(report)
    statuses = {t["name"]: t["status"] for t in report["results"]["tests"]}
    assert statuses == {"echo": "failed", "after": "skipped"}
    echo = report["results"]["tests"][0]
    assert "response: 200" in echo["trace"], echo  # the exchange is there, masked
    for form in {PASSWORD, quote(PASSWORD), quote_plus(PASSWORD), json.dumps(PASSWORD)[1:-1]}:
        assert form not in text
    assert report["results"]["tool"]["name"] == "baton"
    assert echo["filePath"] == str(tmp_path / "flow.yaml")
