"""``baton rerun``: the failed tests and what they made skip, or one test onwards, run again
against the demo shop with the passed tests' captures restored from the log."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import asyncpg
import networkx as nx
import pytest

from tests.cli import baton
from tests.flows import events_of, run_flow, write_flow

CHAIN = """
health:
  request: {url: /health}
  expect: {status: 200}
login:
  request:
    method: POST
    url: /auth/login
    json: {username: alice, password: secret-alice, ttl: TOKEN_LIFE}
  expect: {status: 200}
  capture:
    auth.token: {json: "$.access_token"CAPTURE_TTL}
    user_id: {json: "$.user_id"}
profile:
  request:
    url: /me
    headers: {Authorization: "Bearer {{ auth.token }}"}
  expect:
    status: 200
    json: {"$.username": WANT}
  capture: {username: {json: "$.username"}}
greeting:
  request: {url: "/echo?who={{ username }}&id={{ user_id }}"}
  expect: {status: 200}
"""


def chain(directory: Path, want: str, *, life: int = 300, ttl: str = "") -> Path:
    tests = (
        CHAIN.replace("WANT", want)
        .replace("TOKEN_LIFE", str(life))
        .replace("CAPTURE_TTL", f", ttl: {ttl}" if ttl else "")
    )
    return write_flow(directory, tests, name="chain.yaml")


def rerun(*args: str) -> tuple[int, str, str]:
    code, out, err = baton("rerun", *args)
    assert "Traceback" not in out + err
    return code, out, err


def report_of(path: Path) -> dict[str, Any]:
    run: dict[str, Any] = json.loads(path.read_text())["runs"][0]
    return run


async def token_time(dsn: str, run_id: str) -> Any:
    connection = await asyncpg.connect(dsn)
    try:
        return await connection.fetchval(
            "SELECT recorded_at FROM events WHERE stream = $1 AND type = 'AuthTokenUpdated'",
            f"run-{run_id}",
        )
    finally:
        await connection.close()


async def sent(dsn: str, run_id: str) -> list[str]:
    """The tests that sent a request in the run."""
    return [event["test"] for event in await events_of(dsn, run_id, "RequestSent")]


@pytest.fixture
def here(env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


async def test_failed_reruns_the_failure_and_its_dependents_without_logging_in_again(
    here: Path, env: dict[str, str]
) -> None:
    flow = chain(here, "bob")
    code, _, _, first = await run_flow(flow)
    assert code == 1
    assert first["profile"]["status"] == "failed" and first["greeting"]["status"] == "skipped"
    chain(here, "alice")  # the assertion is fixed
    report = here / "rerun.json"
    junit, html = here / "rerun.xml", here / "rerun.html"
    code, out, err = await asyncio.to_thread(
        rerun,
        first["_run_id"],
        "--failed",
        *("--json", str(report), "--junit", str(junit), "--html", str(html)),
    )
    assert code == 0, out + err
    again = report_of(report)
    assert again["continues"] == first["_run_id"]
    assert [test["name"] for test in again["tests"]] == ["profile", "greeting"]
    assert all(test["status"] == "passed" for test in again["tests"])
    assert f"continues run {first['_run_id']}" in out
    # login's token and user_id came from the log: neither login nor health was sent again
    assert await sent(env["BATON_DATABASE_URL"], again["run_id"]) == ["profile", "greeting"]
    reused = await events_of(env["BATON_DATABASE_URL"], again["run_id"], "AuthTokenUpdated")
    assert [(event["test"], event["name"]) for event in reused] == [("login", "auth.token")]
    # recorded with the time it was captured: a ttl counts from the capture, not the rerun
    dsn = env["BATON_DATABASE_URL"]
    assert await token_time(dsn, again["run_id"]) == await token_time(dsn, first["_run_id"])
    properties = {p.get("name"): p.get("value") for p in ElementTree.parse(junit).iter("property")}
    assert properties["continues"] == first["_run_id"]
    assert f"continues {first['_run_id']}" in html.read_text()
    code, shown, _ = await asyncio.to_thread(baton, "show", again["run_id"])
    assert code == 0 and f"continues run {first['_run_id']}" in shown


async def test_from_reruns_one_test_onwards(here: Path, env: dict[str, str]) -> None:
    flow = chain(here, "alice")
    code, _, _, first = await run_flow(flow)
    assert code == 0
    report = here / "from.json"
    code, out, err = await asyncio.to_thread(
        rerun, first["_run_id"], "--from", "profile", "--json", str(report)
    )
    assert code == 0, out + err
    again = report_of(report)
    assert [test["name"] for test in again["tests"]] == ["profile", "greeting"]
    assert await sent(env["BATON_DATABASE_URL"], again["run_id"]) == ["profile", "greeting"]


async def test_a_failure_a_from_rerun_carried_over_is_rerun_by_failed_of_that_rerun(
    here: Path, env: dict[str, str]
) -> None:
    flow = chain(here, "bob")
    code, _, _, first = await run_flow(flow)
    assert code == 1
    report = here / "from.json"
    # health onwards is health alone: profile's failure is carried over, not fixed
    code, out, err = await asyncio.to_thread(
        rerun, first["_run_id"], "--from", "health", "--json", str(report)
    )
    assert code == 0, out + err
    second = report_of(report)["run_id"]
    chain(here, "alice")
    code, out, err = await asyncio.to_thread(rerun, second, "--failed", "--json", str(report))
    assert code == 0, out + err
    assert f"continues run {second}: again profile, greeting" in out
    assert await sent(env["BATON_DATABASE_URL"], report_of(report)["run_id"]) == [
        "profile",
        "greeting",
    ]


async def test_failed_of_a_shard_s_run_reruns_that_unit_only(
    here: Path, env: dict[str, str]
) -> None:
    """Under --shard, health (no capture shared) is a unit of its own, another run: a rerun
    of the failed chain's run does not send it."""
    flow = chain(here, "bob")
    report = here / "shard.json"
    code, out, err = await asyncio.to_thread(
        baton,
        *("run", str(flow), "--shard", "1/1", "--batch", f"b-{here.name}"),
        *("--json", str(report)),
    )
    assert code == 1, out + err
    runs = json.loads(report.read_text())["runs"]
    [failed] = [run for run in runs if run["status"] == "failed"]
    assert [test["name"] for test in failed["tests"]] == ["login", "profile", "greeting"]
    chain(here, "alice")
    code, out, err = await asyncio.to_thread(
        rerun, failed["run_id"], "--failed", "--json", str(report)
    )
    assert code == 0, out + err
    assert f"continues run {failed['run_id']}: again profile, greeting" in out
    assert await sent(env["BATON_DATABASE_URL"], report_of(report)["run_id"]) == [
        "profile",
        "greeting",
    ]


async def test_an_expired_capture_makes_its_producer_run_again(
    here: Path, env: dict[str, str]
) -> None:
    # the shop's token lives one second, and the flow says so
    flow = chain(here, "bob", life=1, ttl="1s")
    code, _, _, first = await run_flow(flow)
    assert code == 1
    await asyncio.sleep(1.3)
    chain(here, "alice", life=1, ttl="1s")
    report = here / "ttl.json"
    code, out, err = await asyncio.to_thread(
        rerun, first["_run_id"], "--failed", "--json", str(report)
    )
    assert code == 0, out + err
    again = report_of(report)
    assert f"login of run {first['_run_id']} runs again: a capture it made outlived its ttl" in out
    assert [test["name"] for test in again["tests"]] == ["login", "profile", "greeting"]
    assert await sent(env["BATON_DATABASE_URL"], again["run_id"]) == [
        "login",
        "profile",
        "greeting",
    ]


async def test_a_rerun_of_a_rerun_counts_the_ttl_from_the_capture(
    here: Path, env: dict[str, str]
) -> None:
    flow = chain(here, "bob", ttl="3s")
    code, _, _, first = await run_flow(flow)
    made_before = time.monotonic()  # the capture is at least this old from here on
    assert code == 1
    report = here / "again.json"
    code, out, _ = await asyncio.to_thread(
        rerun, first["_run_id"], "--failed", "--json", str(report)
    )
    assert code == 1  # still bob: the token was reused, fresh
    second = report_of(report)["run_id"]
    await asyncio.sleep(max(0.0, 3.3 - (time.monotonic() - made_before)))
    chain(here, "alice", ttl="3s")
    code, out, err = await asyncio.to_thread(rerun, second, "--failed", "--json", str(report))
    assert code == 0, out + err
    assert f"login of run {second} runs again" in out
    assert await sent(env["BATON_DATABASE_URL"], report_of(report)["run_id"]) == [
        "login",
        "profile",
        "greeting",
    ]


async def test_without_ttl_the_stale_token_is_reused_and_the_rerun_says_so(
    here: Path, env: dict[str, str]
) -> None:
    flow = chain(here, "bob", life=1)
    code, _, _, first = await run_flow(flow)
    assert code == 1
    await asyncio.sleep(1.3)
    chain(here, "alice", life=1)
    code, out, _ = await asyncio.to_thread(rerun, first["_run_id"], "--failed")
    assert code == 1  # the reused token expired at the shop: 401
    assert "profile" in out and "401" in out


async def test_failed_rows_rerun_only_the_failed_rows_in_a_new_batch(
    here: Path, env: dict[str, str]
) -> None:
    rows = here / "users.csv"
    rows.write_text("username,password\nuser001,pw-user001\nuser002,wrong\nuser003,pw-user003\n")
    tests = """
    login:
      request:
        method: POST
        url: /auth/login
        json: {username: "{{ username }}", password: "{{ password }}"}
      expect: {status: 200}
      capture: {auth.token: {json: "$.access_token"}}
    profile:
      request: {url: /me, headers: {Authorization: "Bearer {{ auth.token }}"}}
      expect: {status: 200}
    """
    flow = write_flow(here, tests, name="rows.yaml")
    report = here / "batch.json"
    code, out, err = await asyncio.to_thread(
        baton, "run", str(flow), "--data", str(rows), "--json", str(report)
    )
    assert code == 1, out + err
    runs = json.loads(report.read_text())["runs"]
    batch_id = runs[0]["batch_id"]
    failed_run = next(run["run_id"] for run in runs if run["status"] == "failed")
    # the console says how to rerun the batch's failed rows
    assert (
        out.strip().splitlines()[-1]
        == f"rerun the failed rows: baton rerun {batch_id} --failed-rows"
    )
    # and a row's run leads the user to its batch
    code, shown, err = await asyncio.to_thread(baton, "show", failed_run)
    assert code == 0 and f"  batch {batch_id}, row 2" in shown.splitlines(), shown + err
    code, _, err = await asyncio.to_thread(rerun, failed_run, "--failed-rows")
    assert code == 2 and f"use baton rerun {batch_id} --failed-rows (its batch)" in err
    rows.write_text("username,password\nuser001,pw-user001\nuser002,pw-user002\nuser003,x\n")
    again_path = here / "again.json"
    code, out, err = await asyncio.to_thread(
        rerun, batch_id, "--failed-rows", "--json", str(again_path)
    )
    assert code == 0, out + err
    again = json.loads(again_path.read_text())["runs"]
    assert [(run["row"], run["continues"]) for run in again] == [(2, failed_run)]
    assert again[0]["batch_id"] != batch_id
    assert f"continues batch {batch_id}" in out
    # a sharded batch has no BatchStarted to rerun rows from: say what to do instead
    code, out, err = await asyncio.to_thread(
        baton, "run", str(flow), "--data", str(rows), "--shard", "1/1", "--batch", "ci-7"
    )
    assert code == 1, out + err
    assert "--failed-rows" not in out
    code, _, err = await asyncio.to_thread(rerun, "ci-7", "--failed-rows")
    assert code == 2
    assert "batch ci-7 ran in shards" in err
    assert "--shard K/N --batch ci-7" in err


def test_unknown_run_is_one_line_and_exit_2(here: Path) -> None:
    code, _, err = rerun("0190a3c2-0000-7000-8000-000000000000", "--failed")
    assert code == 2
    assert err.strip().splitlines() == [
        "error: no run '0190a3c2-0000-7000-8000-000000000000' in the event store (see `baton runs`)"
    ]


async def test_usage_errors(here: Path) -> None:
    flow = chain(here, "alice")
    code, _, _, first = await run_flow(flow)
    assert code == 0
    run_id = first["_run_id"]
    code, _, err = await asyncio.to_thread(rerun, run_id)
    assert code == 2 and "give one of --failed, --from TEST or --failed-rows" in err
    code, _, err = await asyncio.to_thread(rerun, run_id, "--failed")
    assert code == 2 and "nothing to rerun" in err
    code, _, err = await asyncio.to_thread(rerun, run_id, "--from", "nosuch")
    assert code == 2 and "--from nosuch" in err and "profile" in err
    code, _, err = await asyncio.to_thread(rerun, run_id, "--failed-rows")
    assert code == 2 and "is a run" in err
    flow.unlink()
    code, _, err = await asyncio.to_thread(rerun, run_id, "--from", "login")
    assert code == 2 and "--flow PATH" in err and len(err.strip().splitlines()) == 1


def test_a_capture_counts_as_expired_only_after_its_ttl_at_the_given_time() -> None:
    from datetime import UTC, datetime, timedelta

    from events.context import Context
    from orchestrator.rerun import Prior, Selection, select

    order = ["login", "profile", "report"]
    graph = nx.DiGraph([("login", "profile"), ("profile", "report")])
    made = datetime(2026, 1, 1, tzinfo=UTC)
    context = Context(
        statuses={"login": "passed", "profile": "failed", "report": "skipped"},
        captured={"login": {"auth.token": "sealed"}},
    )
    prior = Prior(context, {("login", "auth.token"): made}, context.statuses)
    ttls = {("login", "auth.token"): 600.0}
    fresh = select(order, graph, prior, Selection(failed=True), ttls=ttls, now=made)
    assert fresh.tests == ["profile", "report"] and fresh.expired == []
    assert [event.name for event in fresh.reused] == ["auth.token"]
    later = made + timedelta(minutes=11)
    stale = select(order, graph, prior, Selection(failed=True), ttls=ttls, now=later)
    assert stale.tests == order and stale.expired == ["login"] and stale.reused == []
