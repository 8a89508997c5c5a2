"""Shared setup (``use:``): a directory of flows sharing one login against the demo shop,
in this process so that the test can count the logins the shop answered and know the
token it handed out."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from examples.shop.server import STATE
from examples.shop.server import serve as serve_shop
from tests.cli import baton

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "shared-setup"
SETUP_FAILED = "setup login.yaml::login failed"
SETUP_SUITE = "shared login [setup login.yaml::login]"


@pytest.fixture
async def shop() -> AsyncIterator[web.AppRunner]:
    runner, _url = await serve_shop("127.0.0.1", 0)
    yield runner
    await runner.cleanup()


@pytest.fixture
def project(
    shop: web.AppRunner, pg_server_dsn: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Path:
    """A copy of examples/shared-setup: auth/login.yaml and three flows using it."""
    monkeypatch.setenv("SHOP_URL", f"http://127.0.0.1:{shop.addresses[0][1]}")
    monkeypatch.setenv("BATON_DATABASE_URL", pg_server_dsn)
    monkeypatch.setenv("BATON_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("BATON_SECRET_KEY", raising=False)
    monkeypatch.delenv("SHOP_PASSWORD", raising=False)
    shutil.copytree(EXAMPLE, tmp_path / "project")
    return tmp_path / "project"


def logins(shop: web.AppRunner) -> list[str]:
    """Every access token the shop handed out."""
    return list(shop.app[STATE].access)


async def run(*args: str) -> tuple[int, str]:
    code, out, err = await asyncio.to_thread(baton, *args)
    return code, out + err


def report(path: Path) -> dict[str, dict[str, Any]]:
    """The runs of a JSON report by the name of their file."""
    return {Path(r["file"]).name: r for r in json.loads(path.read_text())["runs"]}


def reports(project: Path) -> tuple[str, ...]:
    return tuple(
        f"--{kind}={project / name}"
        for kind, name in (
            ("json", "r.json"),
            ("junit", "r.xml"),
            ("ctrf", "r.ctrf.json"),
            ("html", "r.html"),
        )
    )


def junit_cases(path: Path) -> dict[tuple[str, str], tuple[str, str | None]]:
    """(testsuite, testcase) -> (status, message), asserting that classname is the suite's."""
    cases = {}
    for suite in ET.parse(path).getroot().iter("testsuite"):
        for case in suite.iter("testcase"):
            assert case.get("classname") == suite.get("name")
            outcome = next((c for c in case if c.tag in ("failure", "skipped", "error")), None)
            status = "passed" if outcome is None else outcome.tag
            message = None if outcome is None else outcome.get("message")
            cases[(suite.get("name", ""), case.get("name", ""))] = (status, message)
    return cases


def ctrf_cases(path: Path) -> dict[tuple[str, str], tuple[str, str | None]]:
    tests = json.loads(path.read_text())["results"]["tests"]
    cases = {(t["suite"][0], t["name"]): (t["status"], t.get("message")) for t in tests}
    assert len(cases) == len(tests)  # each test once
    return cases


async def events(dsn: str, run_ids: list[str]) -> list[tuple[str, str, dict[str, Any]]]:
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            "SELECT stream, type, data::text FROM events WHERE stream = ANY($1::text[])"
            " ORDER BY position",
            [f"run-{run_id}" for run_id in run_ids],
        )
    finally:
        await connection.close()
    return [(row[0], row[1], json.loads(row[2])) for row in rows]


async def test_a_directory_of_flows_logs_in_once_and_every_flow_uses_the_token(
    project: Path, shop: web.AppRunner, pg_server_dsn: str
) -> None:
    code, shown = await run("run", str(project / "flows"), *reports(project))
    assert code == 0, shown
    [token] = logins(shop)  # one login for the three flows
    runs = report(project / "r.json")
    assert sorted(runs) == ["cart.yaml", "login.yaml", "orders.yaml", "profile.yaml"]
    assert all(r["status"] == "passed" for r in runs.values()), runs
    listed = json.loads((project / "r.json").read_text())
    assert listed["runs"][0]["setup"] == "login.yaml::login"  # once, before its users
    assert [r.get("setup") for r in listed["runs"][1:]] == [None, None, None]
    assert listed["summary"]["runs"] == 4
    using = [r["run_id"] for r in runs.values() if "setup" not in r]
    found = await events(pg_server_dsn, using)
    setup_runs = {tuple(data["setup_runs"]) for _, kind, data in found if kind == "RunStarted"}
    assert setup_runs == {(runs["login.yaml"]["run_id"],)}  # every flow names that run
    [[setup_run]] = setup_runs
    cases = junit_cases(project / "r.xml")
    assert [key for key in cases if key[0] == SETUP_SUITE] == [(SETUP_SUITE, "login")]
    assert len(cases) == 5 and all(status == "passed" for status, _ in cases.values())
    ctrf = ctrf_cases(project / "r.ctrf.json")
    assert ctrf[(SETUP_SUITE, "login")] == ("passed", None) and len(ctrf) == 5
    setup = await events(pg_server_dsn, [setup_run])
    sent = [data["url"] for _, kind, data in setup if kind == "RequestSent"]
    assert len(sent) == 1 and sent[0].endswith("/auth/login")
    reused = [data for _, kind, data in found if kind == "AuthTokenUpdated"]
    assert len(reused) == 3 and all(d["test"] == "login.yaml::login" for d in reused)
    everything = shown + (project / "r.json").read_text() + json.dumps(found + setup)
    assert '"Authorization": "***"' in everything  # the header was sent, masked
    assert token not in everything


async def test_a_failing_setup_skips_what_reads_it_in_every_flow(
    project: Path, shop: web.AppRunner
) -> None:
    (project / "secrets.yaml").write_text("SHOP_PASSWORD: wrong\n")
    code, shown = await run(
        "run",
        str(project / "flows"),
        *("--secrets", str(project / "secrets.yaml"), *reports(project)),
    )
    assert code == 1, shown
    assert logins(shop) == []
    runs = report(project / "r.json")
    statuses = {
        (file, test["name"]): (test["status"], test.get("message"))
        for file, r in runs.items()
        for test in r["tests"]
    }
    why = "1 of 1 checks failed; first: status equals: expected 200, got 401"
    assert statuses == {
        ("login.yaml", "login"): ("failed", why),
        ("cart.yaml", "add"): ("skipped", SETUP_FAILED),
        ("cart.yaml", "products"): ("passed", None),  # it reads nothing of the login
        ("orders.yaml", "orders"): ("skipped", SETUP_FAILED),
        ("profile.yaml", "me"): ("skipped", SETUP_FAILED),
    }
    assert all(r["status"] == "failed" for r in runs.values())
    assert runs["login.yaml"]["setup"] == "login.yaml::login"
    assert runs["cart.yaml"]["failed_setups"] == ["login.yaml::login"]
    # CI sees the failed login that explains the skips, once, under the setup's name
    expected = {
        (SETUP_SUITE, "login"): ("failure", why),
        ("cart", "add"): ("skipped", SETUP_FAILED),
        ("cart", "products"): ("passed", None),
        ("orders", "orders"): ("skipped", SETUP_FAILED),
        ("profile", "me"): ("skipped", SETUP_FAILED),
    }
    assert junit_cases(project / "r.xml") == expected
    expected[(SETUP_SUITE, "login")] = ("failed", why)
    assert ctrf_cases(project / "r.ctrf.json") == expected
    assert f"✗ {SETUP_SUITE} / login" in shown  # the summary's FAILURES
    assert f"<strong>{SETUP_SUITE}</strong>" in (project / "r.html").read_text()
    assert "wrong" not in shown.replace("went wrong", "")


async def test_a_single_flow_alone_runs_its_setup_first(project: Path, shop: web.AppRunner) -> None:
    code, shown = await run("run", str(project / "flows" / "cart.yaml"))
    assert code == 0, shown
    assert len(logins(shop)) == 1
    assert shown.index("shared login") < shown.index("cart")


async def test_a_batch_runs_its_setup_once(project: Path, shop: web.AppRunner) -> None:
    (project / "rows.csv").write_text("n\n1\n2\n3\n")
    flow = project / "flows" / "orders.yaml"
    code, shown = await run("run", str(flow), "--data", str(project / "rows.csv"))
    assert code == 0, shown
    assert len(logins(shop)) == 1


async def test_a_setup_reading_a_data_row_is_a_usage_error(project: Path) -> None:
    login = project / "auth" / "login.yaml"
    login.write_text(login.read_text().replace("username: alice", 'username: "{{ name }}"'))
    (project / "rows.csv").write_text("name\nalice\nbob\n")
    flow = project / "flows" / "orders.yaml"
    code, shown = await run("validate", str(flow), "--data", str(project / "rows.csv"))
    assert code == 2
    assert f"{flow}: use[0]: the shared setup login.yaml::login reads the data-row" in shown
    assert "Traceback" not in shown


def test_a_use_cycle_is_a_usage_error_naming_the_place(tmp_path: Path) -> None:
    for this, other in (("a", "b"), ("b", "a")):
        (tmp_path / f"{this}.yaml").write_text(
            f"name: {this}\nuse: [{{flow: {other}.yaml, test: t}}]\n"
            "tests:\n  t: {request: {url: http://127.0.0.1:1/}}\n"
        )
    code, _out, err = baton("validate", str(tmp_path / "a.yaml"))
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: {tmp_path / 'b.yaml'}: use[0].flow: use cycle: a.yaml -> b.yaml -> a.yaml "
        "(break one of these links)"
    ]


def test_a_missing_flow_or_test_is_a_usage_error_naming_the_place(tmp_path: Path) -> None:
    flow = tmp_path / "flows" / "cart.yaml"
    flow.parent.mkdir()
    shutil.copytree(EXAMPLE / "auth", tmp_path / "auth")
    flow.write_text(
        "name: cart\nuse:\n  - {flow: ../auth/nope.yaml, test: login}\n"
        "  - {flow: ../auth/login.yaml, test: logn}\n"
        "tests:\n  t: {request: {url: 'http://127.0.0.1:1/{{ auth.token }}'}}\n"
    )
    for command in ("validate", "run", "graph"):
        code, out, err = baton(command, str(flow))
        assert code == 2, out + err
        lines = err.strip().splitlines()
        assert lines[0].startswith(f"error: {flow}: use[0].flow: no flow file ../auth/nope.yaml")
        assert lines[1] == (
            f"error: {flow}: use[1].test: login.yaml has no test 'logn' (did you mean 'login'?)"
        )
        assert "Traceback" not in err


def test_validate_and_graph_show_the_setup(project: Path) -> None:
    flows = project / "flows"
    code, out, err = baton("validate", str(flows))
    assert code == 0, err
    assert f"{flows / 'cart.yaml'}: ok (2 tests, 1 run(s), setup login.yaml::login)" in out
    code, out, err = baton("graph", str(flows / "cart.yaml"))
    assert code == 0, err
    assert out.splitlines()[1:] == [
        "  setup login.yaml::login (run first, once for every flow using it)",
        "  1. add  <- login.yaml::login (setup)",
        "  2. products",
    ]
    code, out, err = baton("graph", "--format", "mermaid", str(flows / "cart.yaml"))
    assert 's1["setup login.yaml::login"]' in out and "s1 -->|setup| n1" in out


def test_a_capture_named_like_the_setups_is_a_usage_error(project: Path) -> None:
    flow = project / "flows" / "orders.yaml"
    flow.write_text(flow.read_text() + "    capture: {user_id: {json: $.user_id}}\n")
    code, _out, err = baton("validate", str(flow))
    assert code == 2
    assert (
        f"{flow}: tests.orders.capture.user_id: 'user_id' is already captured by the shared "
        "setup login.yaml::login" in err
    )


async def test_a_tag_selection_runs_the_whole_setup(project: Path, shop: web.AppRunner) -> None:
    flow = project / "flows" / "orders.yaml"
    flow.write_text(flow.read_text() + "    tags: [smoke]\n")
    code, shown = await run("run", str(flow), "--tag", "smoke")
    assert code == 0, shown
    assert len(logins(shop)) == 1


def test_plan_json_names_the_setup_each_test_reads(project: Path) -> None:
    code, out, err = baton("plan", "--json", str(project / "flows" / "cart.yaml"))
    assert code == 0, err
    [flow] = json.loads(out)["flows"]
    assert {t["name"]: t.get("setups") for t in flow["tests"]} == {
        "add": ["login.yaml::login"],
        "products": None,
    }


async def test_shard_and_queue_refuse_flows_with_a_setup(project: Path) -> None:
    flows = str(project / "flows")
    code, shown = await run("run", flows, "--shard", "1/2", "--batch", "b1")
    assert code == 2
    assert shown.strip().endswith(
        "use: a shared setup runs in one baton run; --queue and --shard split the flows "
        "among processes (run it without them)"
    )


async def test_an_unreachable_setup_host_is_exit_3(project: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        unused_port = probe.getsockname()[1]
    login = project / "auth" / "login.yaml"
    login.write_text(
        login.read_text().replace(
            "{{ env.SHOP_URL | default('http://127.0.0.1:8765') }}",
            f"http://127.0.0.1:{unused_port}",
        )
    )
    code, shown = await run("run", str(project / "flows"))
    assert code == 3, shown
    assert f"cannot reach http://127.0.0.1:{unused_port}" in shown
    assert "Traceback" not in shown


async def test_rerun_reuses_a_passed_setup_and_runs_a_failed_one_again(
    project: Path, shop: web.AppRunner
) -> None:
    flow, report_file = str(project / "flows" / "cart.yaml"), project / "r.json"
    code, shown = await run("run", flow, "--json", str(report_file))
    assert code == 0, shown
    code, shown = await run("rerun", "--from", "add", report(report_file)["cart.yaml"]["run_id"])
    assert code == 0, shown
    assert len(logins(shop)) == 1  # the token came from the log
    (project / "secrets.yaml").write_text("SHOP_PASSWORD: wrong\n")
    secrets = ("--secrets", str(project / "secrets.yaml"))
    code, shown = await run("run", flow, *secrets, "--json", str(report_file))
    assert code == 1, shown
    code, shown = await run("rerun", "--failed", report(report_file)["cart.yaml"]["run_id"])
    assert code == 0, shown  # the right password again: the setup ran first
    assert len(logins(shop)) == 2
