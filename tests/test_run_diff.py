"""``baton diff RUN_A RUN_B``, GET /api/v1/runs/{a}/diff/{b} and the dashboard's
/runs/{a}/diff/{b}: two real runs of one flow against the demo shop, the second with its
knobs turned (a slow endpoint slower, a query that changes the echoed body's shape, a
bad parameter that answers 400), compared test by test, secrets never shown."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.cli import baton

PASSWORD = "secret-alice"

# the flow docs/diff.md shows and runs, so that the page's example is the one tested
PAGE = Path(__file__).resolve().parent.parent / "docs" / "diff.md"
FLOW = PAGE.read_text().split("```yaml\n# flows/diff.yaml\n")[1].split("```")[0]


@pytest.fixture
def shell(env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SHOP_PASSWORD", PASSWORD)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "diff.yaml").write_text(FLOW)
    return tmp_path


def _latest_run() -> str:
    code, listed, err = baton("runs", "--suite", "diff demo", "-n", "1")
    assert code == 0, listed + err
    found = re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", listed)
    assert found, listed
    return found.group(0)


def _two_runs() -> tuple[str, str]:
    """A: all pass. B: nap 400 ms slower, the echo's ``a`` a list and ``b`` new, and
    ``sized`` answered 400 (failed)."""
    code, out, err = baton("run", "diff.yaml")
    assert code == 0, out + err
    run_a = _latest_run()
    code, out, err = baton(
        "run", "diff.yaml", "--var", "nap=400", "--var", "query=a=1&a=2&b=x", "--var", "size=x"
    )
    assert code == 1, out + err
    return run_a, _latest_run()


def test_the_text_shows_each_change_and_flags_the_slowdown(shell: Path) -> None:
    run_a, run_b = _two_runs()
    code, out, err = baton("diff", run_a, run_b)
    assert code == 0, out + err
    lines = out.splitlines()
    assert lines[0] == f"A: run {run_a} (diff demo, passed)"
    assert lines[1] == f"B: run {run_b} (diff demo, failed)"
    row = {line.split()[0]: line for line in lines[3:] if line and not line.startswith(" ")}
    assert re.fullmatch(r"login +passed +200 +\d+ ms( -> \d+ ms)?", row["login"]), row
    assert re.search(r"nap +passed +200 +\d+ ms -> 4\d\d ms  !! \d+\.\dx slower$", row["nap"])
    assert re.search(r"sized +passed -> failed +200 -> 400 ", row["sized"]), row
    assert "!!" not in row["login"] and "!!" not in row["echo"]
    echo = out.split("\necho")[1].split("\nnap")[0]
    assert "    shape: $.query.a type string -> array" in echo
    assert "    shape: $.query.b added (string)" in echo
    assert '    capture first: "1" -> ["1","2"]' in echo
    login = out.split("\nlogin")[1].split("\necho")[0]
    # a new token at each login; the same user: only said to be changed, never shown
    assert "    capture auth.token: changed (secret)" in login
    assert "capture user" not in login  # unchanged lines stay quiet
    assert "shape: $.access_token" not in login  # the same shape, other values
    assert lines[-1] == "4 of 4 test(s) changed; passed in A, not in B: sized"
    assert PASSWORD not in out and "enc:v1:" not in out

    code, out, err = baton("diff", run_a, run_b, "--exit-code")
    assert code == 1 and "passed in A, not in B: sized" in out
    code, out, err = baton("diff", run_a, run_a, "--exit-code")
    assert code == 0 and out.splitlines()[-1] == "0 of 4 test(s) changed"


def test_json_for_tools_compares_secrets_without_their_values(shell: Path) -> None:
    run_a, run_b = _two_runs()
    code, out, err = baton("diff", run_a, run_b, "--json")
    assert code == 0, out + err
    found = json.loads(out)
    assert found["a"]["run_id"] == run_a and found["regressions"] == ["sized"]
    tests = {test["name"]: test for test in found["tests"]}
    captures = {c["name"]: c for c in tests["login"]["captures"]}
    assert captures["auth.token"] == {
        "name": "auth.token",
        "change": "changed",
        "secret": True,
        "a": None,
        "b": None,
    }
    assert captures["user"]["change"] == "unchanged" and captures["user"]["a"] is None
    nap = tests["nap"]
    assert nap["duration_flag"] == "slower" and nap["duration_ratio"] >= 1.5
    assert nap["duration_b_ms"] - nap["duration_a_ms"] >= 300
    assert tests["sized"]["response_a"] == 200 and tests["sized"]["response_b"] == 400
    assert {"path": "$.slept_ms", "change": "removed", "type_a": "number", "type_b": None} in (
        tests["sized"]["shape"]
    )
    assert PASSWORD not in out and "enc:v1:" not in out


def test_a_test_in_one_run_only_and_a_key_that_cannot_open_the_secrets(
    shell: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, err = baton("run", "diff.yaml")
    assert code == 0, out + err
    run_a = _latest_run()
    (shell / "diff.yaml").write_text(FLOW.replace("  sized:", "  resized:"))
    monkeypatch.setenv("BATON_EXCERPT_LIMIT", "512")  # B keeps 512 characters of a body
    code, out, err = baton("run", "diff.yaml", "--var", "query=a=" + "x" * 600)
    monkeypatch.delenv("BATON_EXCERPT_LIMIT")
    assert code == 0, out + err
    run_b = _latest_run()
    code, out, err = baton("diff", run_a, run_b)
    assert code == 0, out + err
    assert re.search(r"^sized +only in A \(passed\)$", out, re.M), out
    assert re.search(r"^resized +only in B \(passed\)$", out, re.M), out
    # a body longer than Baton records is cut: its shape is not guessed
    assert (
        "    shape: B: the recorded body is cut short (BATON_EXCERPT_LIMIT) and does not parse"
        in out
    )

    # another key than the one the runs were recorded with: secrets cannot be compared
    monkeypatch.setenv("BATON_SECRET_KEY", "A" * 43 + "=")
    code, out, err = baton("diff", run_a, run_b)
    assert code == 0, out + err
    assert "capture auth.token: unknown (secret, recorded with another key)" in out


def test_a_rerun_s_carried_over_tests_are_neither_changes_nor_regressions(shell: Path) -> None:
    code, out, err = baton("run", "diff.yaml", "--var", "size=x")
    assert code == 1, out + err
    run_a = _latest_run()
    code, out, err = baton("rerun", run_a, "--failed")  # size is 1 again: sized passes
    assert code == 0, out + err
    run_b = _latest_run()
    code, out, err = baton("diff", run_a, run_b, "--exit-code")
    assert code == 0, out + err
    assert f"(diff demo, passed), continues run {run_a}" in out
    for name in ("login", "echo", "nap"):
        assert re.search(rf"^{name} +carried over into B \(passed\)$", out, re.M), out
    assert out.splitlines()[-1] == "1 of 4 test(s) changed"
    code, out, err = baton("diff", run_b, run_a, "--json")
    found = json.loads(out)
    assert found["a"]["continues"] == run_a and found["regressions"] == ["sized"]
    assert {t["name"]: t["presence"] for t in found["tests"]}["login"] == "carried over into A"


def test_an_unknown_run_is_one_line_and_exit_2(shell: Path) -> None:
    code, out, err = baton("run", "diff.yaml")
    run_a = _latest_run()
    missing = "00000000-0000-0000-0000-000000000000"
    code, out, err = baton("diff", run_a, missing)
    assert code == 2, out + err
    assert err == f"error: no run '{missing}' in the event store (see `baton runs`)\n"
    code, out, err = baton("diff", run_a)
    assert code == 2 and "Missing argument 'RUN_B'" in err


async def test_the_service_and_the_dashboard_compare_the_organizations_runs_only(
    live_service: Any, shop_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from context_service.keys import create_key
    from tests.conftest import Org

    monkeypatch.setenv("SHOP_URL", shop_url)
    monkeypatch.setenv("SHOP_PASSWORD", PASSWORD)
    monkeypatch.setenv("BATON_DATABASE_URL", live_service.settings.database_url)
    monkeypatch.setenv("BATON_SECRET_KEY", live_service.settings.secret_key)
    monkeypatch.setenv("BATON_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "diff.yaml").write_text(FLOW)
    run_a, run_b = await asyncio.to_thread(_two_runs)
    code, printed, err = await asyncio.to_thread(baton, "diff", run_a, run_b, "--json")
    assert code == 0, err

    settings = live_service.settings
    key = await create_key(settings, organization="default", scopes=["read"], name="r")
    other = await create_key(settings, organization="diff-other", scopes=["read"], name="o")
    org, stranger = Org(live_service, key), Org(live_service, other)
    try:
        answer = await org.ok("GET", f"/api/v1/runs/{run_a}/diff/{run_b}")
        assert answer == json.loads(printed)  # the same key: the same secrets compared

        response = await org.http.get(f"/runs/{run_b}")
        assert f'href="/runs/{run_a}/diff/{run_b}"' in response.text  # the previous run
        html = (await org.http.get(f"/runs/{run_a}/diff/{run_b}")).text
        assert "Passed in A, not in B: sized" in html
        assert "<code>$.query.b</code> added (string)" in html
        assert re.search(r"capture <code>auth\.token</code>:\s+changed \(secret\)", html)
        assert re.search(r"capture <code>user</code>:\s+unchanged \(secret\)", html)
        assert re.search(r"[\d.]+x slower", html)  # the slowed endpoint, flagged
        assert PASSWORD not in html and "enc:v1:" not in html

        for path in (f"/api/v1/runs/{run_a}/diff/{run_b}", f"/runs/{run_a}/diff/{run_b}"):
            refused = await stranger.http.get(path)
            assert refused.status_code == 404, path
    finally:
        await org.http.aclose()
        await stranger.http.aclose()


def _recorded(run_id: str, body: str) -> list[Any]:
    import uuid
    from datetime import UTC, datetime

    from events import types as ev

    stream = ev.run_stream(run_id)
    events: list[ev.Event] = [
        ev.RunStarted(run_id, "shapes", "d", [ev.PlannedTest("list")]),
        ev.TestStarted("list"),
        ev.ResponseReceived(
            "list", 1, 200, {"content-type": "application/json"}, body, ev.Timings(total_ms=3)
        ),
        ev.TestPassed("list", 1, 3.0),
    ]
    at = datetime.now(UTC)
    return [
        ev.RecordedEvent(uuid.uuid4(), stream, version, version, at, event)
        for version, event in enumerate(events, 1)
    ]


def test_array_items_are_one_path_whose_types_merge() -> None:
    from orchestrator.run_diff import diff

    a = _recorded("a", '{"items": [{"id": 1}, {"id": 2}], "next": null}')
    b = _recorded("b", '{"items": [{"id": 1}, {"id": "2", "tags": ["x"]}], "next": "/p/2"}')
    (test,) = diff(a, b, "a", "b").tests
    shown = [(s.path, s.change, s.type_a, s.type_b) for s in test.shape]
    assert shown == [
        ("$.next", "type changed", "null", "string"),
        ("$.items[*].id", "type changed", "number", "number|string"),
        ("$.items[*].tags", "added", None, "array"),  # its items ([*]) not listed again
    ]
    assert test.changed and test.shape_notes == [] and test.duration_flag == ""
