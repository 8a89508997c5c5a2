"""``baton report issue RUN_ID TEST`` and GET /api/v1/runs/{id}/tests/{test}/issue: a
failed test as a Markdown issue, from a real run against the demo shop, with every secret
masked, those the flow never named as secrets too."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.cli import baton

PASSWORD = "secret-alice"
LITERAL = "literal-credential-9f3e"

FLOW = """
name: issue demo
base_url: "{{ env.SHOP_URL }}"
tests:
  login:
    request:
      method: POST
      url: /auth/login
      json: {username: alice, password: "{{ secrets.SHOP_PASSWORD }}"}
    expect: {status: 200}
    capture: {auth.token: {json: $.access_token}, user: {json: $.user_id}}
  echo:
    request:
      method: POST
      url: /echo?page=2
      headers: {Authorization: "Bearer {{ auth.token }}", X-Trace: trace-1}
      json: {note: hello, client_secret: "LITERAL"}
    expect:
      status: 200
      json:
        $.method: PUT
        $.path: /echo
""".replace("LITERAL", LITERAL)


@pytest.fixture
def shell(env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SHOP_PASSWORD", PASSWORD)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "issue.yaml").write_text(FLOW)
    return tmp_path


def _run_id(out: str) -> str:
    found = re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", out)
    assert found, out
    return found.group(0)


def _failed_run() -> str:
    code, out, err = baton("run", "issue.yaml")
    assert code == 1, out + err
    code, listed, err = baton("runs", "--suite", "issue demo", "-n", "1")
    assert code == 0, listed + err
    return _run_id(listed)


def test_the_report_shows_request_response_checks_and_context_without_secrets(
    shell: Path,
) -> None:
    run_id = _failed_run()
    code, report, err = baton("report", "issue", run_id, "echo")
    assert code == 0, report + err

    assert report.startswith("# `echo` fails in issue demo: assertion\n")
    assert "**What failed:** 1 of 3 checks failed; first: json $.method equals" in report
    assert re.search(r"`POST http://127\.0\.0\.1:\d+/echo\?page=2` \(request 1, 1 attempt", report)
    assert "X-Trace: trace-1" in report and "Authorization: ***" in report
    assert "Status **200** in " in report
    assert '{"note":"hello","client_secret":"***"}' in report  # the request body excerpt
    assert '"x-trace":"trace-1"' in report  # the response body: the echo
    assert "| `json $.method` | equals | `PUT` | `POST` |" in report
    assert "$.path" not in report.split("## Expected against actual")[1]  # it passed
    assert f"- Run: `{run_id}` (failed: 1 passed, 1 failed, 0 skipped)" in report
    assert "- Project: default; environment: default" in report
    assert "- Captured before it: `auth.token` = `***`, `user` = `1`" in report
    assert "Reproduce: `baton run issue.yaml`" in report
    # the password, the token, and the flow's literal credential, wherever they echo back
    assert PASSWORD not in report and LITERAL not in report
    assert not re.search(r"Bearer [A-Za-z0-9._-]{8,}", report), report


def test_a_passed_or_unknown_test_is_refused_with_the_reason(shell: Path) -> None:
    run_id = _failed_run()
    code, out, err = baton("report", "issue", run_id, "login")
    assert code == 2, out + err
    assert f"test 'login' of run {run_id} passed: an issue report is for a failed test" in err
    code, out, err = baton("report", "issue", run_id, "logn")
    assert code == 2 and "has no test 'logn' (its tests: login, echo)" in err
    code, out, err = baton("report", "issue", "00000000-0000-0000-0000-000000000000", "echo")
    assert code == 2 and "no run '00000000-0000-0000-0000-000000000000'" in err
    code, out, err = baton("report")
    assert code == 2 and "give --batch ID, or a subcommand" in err


async def test_the_service_serves_the_same_report(
    live_service: Any, shop_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import asyncio

    from context_service.keys import create_key
    from tests.conftest import Org

    monkeypatch.setenv("SHOP_URL", shop_url)
    monkeypatch.setenv("SHOP_PASSWORD", PASSWORD)
    monkeypatch.setenv("BATON_DATABASE_URL", live_service.settings.database_url)
    monkeypatch.setenv("BATON_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "issue.yaml").write_text(FLOW)
    run_id = await asyncio.to_thread(_failed_run)
    code, printed, err = await asyncio.to_thread(baton, "report", "issue", run_id, "echo")
    assert code == 0, err

    key = await create_key(live_service.settings, organization="default", scopes=["read"], name="r")
    org = Org(live_service, key)
    try:
        response = await org.http.get(f"/api/v1/runs/{run_id}/tests/echo/issue")
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/markdown")
        assert response.text == printed
        passed = await org.http.get(f"/api/v1/runs/{run_id}/tests/login/issue")
        assert passed.status_code == 409 and "is for a failed test" in passed.text
        unknown = await org.http.get(f"/api/v1/runs/{run_id}/tests/nope/issue")
        assert unknown.status_code == 404 and "has no test 'nope'" in unknown.text
    finally:
        await org.http.aclose()
