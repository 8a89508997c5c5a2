"""``baton replay``: the flow's current checks against the responses a run stored, with the
demo shop stopped: no request can be sent."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import asyncpg
import pytest

from tests.cli import baton
from tests.conftest import start_shop, stop
from tests.flows import run_flow, write_flow

FLOW = """
login:
  request:
    method: POST
    url: /auth/login
    json: {username: alice, password: secret-alice}
  expect: {status: 200}
  capture: {auth.token: {json: "$.access_token"}}
profile:
  request: {url: /me, headers: {Authorization: "Bearer {{ auth.token }}"}}
  expect:
    status: 200
    json: {"$.username": WANT}
  capture: {email: {json: "$.email"}}
"""


@pytest.fixture
def here(env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def replay(*args: str) -> tuple[int, str, str]:
    code, out, err = baton("replay", *args)
    assert "Traceback" not in out + err
    return code, out, err


async def stream_length(dsn: str, run_id: str) -> int:
    connection = await asyncpg.connect(dsn)
    try:
        count: int = await connection.fetchval(
            "SELECT count(*) FROM events WHERE stream = $1", f"run-{run_id}"
        )
    finally:
        await connection.close()
    return count


async def recorded_with_own_shop(
    here: Path, monkeypatch: pytest.MonkeyPatch, tests: str, *args: str
) -> tuple[Path, str]:
    """Run ``tests`` against a shop of their own, then stop it: (the flow, the run's id)."""
    process, url = start_shop()
    monkeypatch.setenv("SHOP_URL", url)
    try:
        flow = write_flow(here, tests)
        _, out, err, recorded = await run_flow(flow, *args)
    finally:
        stop(process)
    assert "_run_id" in recorded, out + err
    return flow, recorded["_run_id"]


async def test_replay_checks_an_edited_assertion_without_sending(
    here: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    flow, run_id = await recorded_with_own_shop(here, monkeypatch, FLOW.replace("WANT", "alice"))
    before = await stream_length(env["BATON_DATABASE_URL"], run_id)
    code, out, err = await asyncio.to_thread(replay, run_id)
    assert code == 0, out + err
    assert "✓ login" in out and "✓ profile" in out and "no request sent" in out
    write_flow(here, FLOW.replace("WANT", "bob"))
    code, out, err = await asyncio.to_thread(replay, run_id, str(flow))
    assert code == 1
    assert "✗ profile" in out and '"bob"' in out and "alice" in out
    assert await stream_length(env["BATON_DATABASE_URL"], run_id) == before


async def test_a_check_beyond_the_stored_excerpt_says_to_raise_the_limit(
    here: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    tests = """
    login:
      request:
        method: POST
        url: /auth/login
        json: {username: alice, password: secret-alice}
      capture: {auth.token: {json: "$.access_token"}}
    catalog:
      request: {url: /catalog, headers: {Authorization: "Bearer {{ auth.token }}"}}
      expect: {status: 200}
    """
    monkeypatch.setenv("BATON_EXCERPT_LIMIT", "80")
    _, run_id = await recorded_with_own_shop(here, monkeypatch, tests)
    write_flow(here, tests.replace("{status: 200}", '{json: {"$.count": {gt: 0}}}'))
    code, out, _ = await asyncio.to_thread(replay, run_id)
    assert code == 1
    assert "the stored response excerpt (80 bytes) is too short for this check" in out
    assert "raise BATON_EXCERPT_LIMIT" in out
    # with a limit above the body's length, the same check passes on what was stored
    monkeypatch.setenv("BATON_EXCERPT_LIMIT", "20000")
    _, run_id = await recorded_with_own_shop(here, monkeypatch, tests)
    code, out, err = await asyncio.to_thread(replay, run_id)
    assert code == 0, out + err


def test_replay_of_an_unknown_run_is_one_line_and_exit_2(here: Path) -> None:
    code, _, err = replay("0190a3c2-0000-7000-8000-000000000000")
    assert code == 2
    assert err.strip().splitlines() == [
        "error: no run '0190a3c2-0000-7000-8000-000000000000' in the event store (see `baton runs`)"
    ]


def test_a_bad_excerpt_limit_is_one_line_and_exit_2(
    here: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATON_EXCERPT_LIMIT", "lots")
    code, _, err = replay("0190a3c2-0000-7000-8000-000000000000")
    assert code == 2
    assert err.strip() == (
        "error: BATON_EXCERPT_LIMIT='lots': expected a whole number above 0, like 8192"
    )


async def test_a_failed_replay_check_never_shows_a_secret(
    here: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = here / "secrets.yaml"
    secrets.write_text("API_KEY: k3y-0f-the-replay-7e5t\n")
    tests = """
    echo:
      request: {url: /echo, headers: {X-Api-Key: "{{ secrets.API_KEY }}"}}
      expect: {status: 200}
    """
    _, run_id = await recorded_with_own_shop(here, monkeypatch, tests, "--secrets", str(secrets))
    # the stored echo shows the key masked: a check that wants it in clear fails, and says
    # so without the key
    write_flow(here, tests.replace("{status: 200}", '{json: {"$.path": "{{ secrets.API_KEY }}"}}'))
    code, out, err = await asyncio.to_thread(replay, run_id, "--secrets", str(secrets))
    assert code == 1, out + err
    assert "✗ echo" in out and "***" in out
    assert "k3y-0f-the-replay-7e5t" not in out + err


async def test_a_batch_row_replays_with_its_own_row(
    here: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = here / "users.csv"
    rows.write_text("username,password\nuser001,pw-user001\nuser002,pw-user002\n")
    tests = """
    login:
      request:
        method: POST
        url: /auth/login
        json: {username: "{{ username }}", password: "{{ password }}"}
      capture: {auth.token: {json: "$.access_token"}}
    profile:
      request: {url: /me, headers: {Authorization: "Bearer {{ auth.token }}"}}
      expect: {json: {"$.username": "{{ username }}"}}
    """
    head = "variables: {username: nobody, password: none}\n"
    process, url = start_shop()
    monkeypatch.setenv("SHOP_URL", url)
    report = here / "rows.json"
    try:
        flow = write_flow(here, tests, head=head)
        code, out, err = await asyncio.to_thread(
            baton, "run", str(flow), "--data", str(rows), "--json", str(report)
        )
    finally:
        stop(process)
    assert code == 0, out + err
    second = json.loads(report.read_text())["runs"][1]
    assert second["row"] == 2
    code, out, err = await asyncio.to_thread(replay, second["run_id"])
    assert code == 0, out + err
    assert "✓ profile" in out


async def test_a_check_of_a_value_stored_masked_is_not_judged_again(
    here: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The login's token was masked when its response was stored: replaying the unchanged,
    passing run passes, and says which checks it could not judge, instead of failing them
    against '***'."""
    checked = FLOW.replace("WANT", "alice").replace(
        "expect: {status: 200}\n  capture",
        'expect:\n    status: 200\n    json: {"$.access_token": {length: 32}, "$.token_type": '
        "{equals: Bearer}}\n  capture",
        1,
    )
    _, run_id = await recorded_with_own_shop(here, monkeypatch, checked)
    code, out, err = await asyncio.to_thread(replay, run_id)
    assert code == 0, out + err
    assert (
        "✓ login  not checked, masked in the stored response: json $.access_token, "
        "json $.token_type" in out
    )
    # a check the stored response can answer is still judged
    write_flow(here, checked.replace("{equals: Bearer}", '{equals: Bearer}, "$.user_id": 2'))
    code, out, _ = await asyncio.to_thread(replay, run_id)
    assert code == 1 and "✗ login" in out


async def test_a_rerun_replays_with_the_responses_of_the_tests_it_carried_over(
    here: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    process, url = start_shop()
    monkeypatch.setenv("SHOP_URL", url)
    try:
        flow = write_flow(here, FLOW.replace("WANT", "bob"))
        _, _, _, first = await run_flow(flow)
        write_flow(here, FLOW.replace("WANT", "alice"))
        report = here / "rerun.json"
        code, out, err = await asyncio.to_thread(
            baton, "rerun", first["_run_id"], "--failed", "--json", str(report)
        )
    finally:
        stop(process)
    assert code == 0, out + err
    again = json.loads(report.read_text())["runs"][0]
    assert [t["name"] for t in again["tests"]] == ["profile"]  # login was carried over
    code, out, err = await asyncio.to_thread(replay, again["run_id"])
    assert code == 0, out + err
    assert "✓ login" in out and "✓ profile" in out
    write_flow(here, FLOW.replace("WANT", "alice") + "\nlogout: {request: {url: /logout}}\n")
    code, out, _ = await asyncio.to_thread(replay, again["run_id"])
    assert "did not have this test (the flow gained it since)" in out
