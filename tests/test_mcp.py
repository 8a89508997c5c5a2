"""``baton mcp`` driven by the MCP client of the same package, over stdio, as a coding
agent would: a subprocess with a private BATON_HOME and database, against the demo shop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from tests.cli import baton

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
CHECKOUT = str(ROOT / "examples" / "shop" / "checkout.yaml")
PASSWORD = "secret-alice"

FAILING = """\
name: failing
base_url: "{{ env.SHOP_URL }}"
tests:
  health:
    request: {url: /health}
    expect:
      status: 201
      json: {"$.status": down}
  after:
    depends_on: [health]
    request: {url: /health}
"""


@asynccontextmanager
async def agent(env: dict[str, str]) -> AsyncIterator[Client]:
    server = StdioServerParameters(
        command=sys.executable,
        args=["-m", "orchestrator.cli", "mcp"],
        env={**os.environ, **env, "SHOP_PASSWORD": PASSWORD},
        cwd=str(ROOT),
    )
    async with Client(server, read_timeout_seconds=60) as client:
        yield client


async def call(client: Client, tool: str, **arguments: Any) -> tuple[bool, Any, str]:
    """(is an error, the structured answer, its text)."""
    result = await client.call_tool(tool, arguments)
    text = "\n".join(part.text for part in result.content if hasattr(part, "text"))
    return result.is_error, result.structured_content, text


async def test_the_tools_an_agent_sees(env: dict[str, str]) -> None:
    async with agent(env) as client:
        listed = await client.list_tools()
    tools = {tool.name: tool for tool in listed.tools}
    assert set(tools) == {"validate_flow", "run_flow", "run_failures", "run_context", "replay"}
    assert set(tools["run_flow"].input_schema["properties"]) == {"path", "env", "vars"}
    assert all(tool.description for tool in tools.values())


async def test_validate_a_flow_and_a_broken_one(env: dict[str, str], tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: broken\ntests:\n  a:\n    request: {url: /x, method: 7}\n")
    async with agent(env) as client:
        failed, answer, _ = await call(client, "validate_flow", path=CHECKOUT)
        assert not failed
        assert answer["flows"] == [{"file": CHECKOUT, "tests": 10, "runs": 1}]
        failed, _, text = await call(client, "validate_flow", path=str(broken))
        assert failed
        assert f"{broken}: tests.a.request.method" in text
        assert "[exit 2]" in text and "Traceback" not in text
        failed, _, text = await call(client, "validate_flow", path=CHECKOUT, env="nowhere")
        assert failed and "nowhere" in text and "[exit 2]" in text
        failed, _, text = await call(client, "run_flow", path=str(tmp_path / "missing.yaml"))
        assert failed and "missing.yaml: no such file or directory [exit 2]" in text
        needs = tmp_path / "needs.yaml"
        needs.write_text("name: needs\ntests:\n  a:\n    request: {url: 'http://{{ host }}/'}\n")
        failed, _, text = await call(client, "validate_flow", path=str(needs))
        assert failed and "host" in text and "[exit 2]" in text
        failed, answer, text = await call(
            client, "validate_flow", path=str(needs), vars={"host": "127.0.0.1"}
        )
        assert not failed, text
        assert answer["valid"] is True


async def test_run_then_read_its_context_with_secrets_masked(env: dict[str, str]) -> None:
    async with agent(env) as client:
        failed, ran, run_text = await call(client, "run_flow", path=CHECKOUT)
        assert not failed, run_text
        assert ran["status"] == "passed" and ran["exit_code"] == 0
        (run,) = ran["runs"]
        assert (run["passed"], run["failed"], run["skipped"]) == (10, 0, 0)
        assert ran["summary"].startswith("10 passed")
        failed, found, context_text = await call(client, "run_context", run_id=run["run_id"])
        assert not failed, context_text
        context = found["context"]
        assert context["status"] == "passed"
        assert context["auth"]["token"] == "***"
        assert context["captured"]["login"]["auth.token"] == "***"
        assert isinstance(context["variables"]["order_id"], int)
        _, failures, failures_text = await call(client, "run_failures", run_id=run["run_id"])
        assert failures == {
            "run_id": run["run_id"],
            "status": "passed",
            "failed": [],
            "skipped": [],
        }
    everything = json.dumps([ran, found, failures]) + run_text + context_text + failures_text
    assert PASSWORD not in everything


async def test_a_directory_sharing_a_login_names_the_setup_run(env: dict[str, str]) -> None:
    async with agent(env) as client:
        failed, ran, text = await call(
            client, "run_flow", path=str(ROOT / "examples" / "shared-setup" / "flows")
        )
    assert not failed and ran["exit_code"] == 0, text
    setup, *using = ran["runs"]
    assert setup["setup"] == "login.yaml::login" and setup["passed"] == 1
    assert [run["suite"] for run in using] and not any("setup" in run for run in using)


async def test_a_failing_run_and_its_failures(env: dict[str, str], tmp_path: Path) -> None:
    flow = tmp_path / "failing.yaml"
    flow.write_text(FAILING, encoding="utf-8")
    async with agent(env) as client:
        failed, ran, text = await call(client, "run_flow", path=str(flow))
        assert not failed, text  # a failed test is the run's answer, not the tool's error
        assert ran["status"] == "failed" and ran["exit_code"] == 1
        (run,) = ran["runs"]
        assert run["failed_tests"] == ["health"]
        failed, found, text = await call(client, "run_failures", run_id=run["run_id"])
        # the agent fixes the assertion and replays it on the stored response
        fixed = tmp_path / "fixed.yaml"
        fixed.write_text(FAILING.replace("201", "200").replace("down", "ok"), encoding="utf-8")
        replay_failed, replayed, replay_text = await call(
            client, "replay", run_id=run["run_id"], path=str(fixed)
        )
        _, unchanged, _ = await call(client, "replay", run_id=run["run_id"], path=str(flow))
    assert not replay_failed, replay_text
    assert replayed["status"] == "passed"
    assert {t["test"]: t["status"] for t in replayed["tests"]}["health"] == "passed"
    assert unchanged["status"] == "failed"
    (still,) = [t for t in unchanged["tests"] if t["test"] == "health"]
    assert {c["subject"] for c in still["failed_checks"]} == {"status", "json $.status"}
    assert not failed, text
    assert found["status"] == "failed"
    (failure,) = found["failed"]
    assert failure["test"] == "health" and failure["category"] == "assertion"
    checks = {check["subject"]: check for check in failure["assertions"]}
    assert checks["status"]["expected"] == 201 and checks["status"]["actual"] == 200
    assert checks["json $.status"]["actual"] == "ok"
    assert failure["response"]["status"] == 200
    (skipped,) = found["skipped"]
    assert skipped["test"] == "after" and "health" in skipped["reason"]


async def test_an_unknown_run_is_baton_s_error(env: dict[str, str]) -> None:
    async with agent(env) as client:
        for tool in ("run_failures", "run_context", "replay"):
            failed, _, text = await call(client, tool, run_id="no-such-run")
            assert failed
            assert "no run 'no-such-run' in the event store" in text
            assert "[exit 2]" in text


SLOW = """\
name: mcp slow
base_url: "{{ env.SHOP_URL }}"
tests:
  quick:
    request: {url: /health}
  slow:
    depends_on: [quick]
    request: {url: /slow, params: {ms: 10000}}
"""


def _run_events(suite: str) -> tuple[str, list[str]]:
    """The suite's one run: its id and its events' lines (``baton events``)."""
    code, listed, _ = baton("runs", "--suite", suite)
    assert code == 0
    rows = listed.splitlines()[1:]
    if not rows:
        return "", []
    run_id = rows[0].split()[0]
    code, shown, _ = baton("events", run_id)
    assert code == 0
    return run_id, shown.splitlines()[1:]


def test_sigterm_while_run_flow_is_in_flight_ends_the_run_as_cancelled(
    env: dict[str, str], tmp_path: Path
) -> None:
    """An agent's host stops ``baton mcp`` as a supervisor does: the run in flight records
    its end; before, it stayed ``running`` until another Baton process swept it."""
    flow = tmp_path / "slow.yaml"
    flow.write_text(SLOW)
    with subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "mcp"],
        env={**os.environ, **env},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdin is not None and process.stdout is not None
        try:
            for message in (
                {
                    "jsonrpc": "2.0",
                    "id": 1,
                    "method": "initialize",
                    "params": {
                        "protocolVersion": "2025-06-18",
                        "capabilities": {},
                        "clientInfo": {"name": "test", "version": "1"},
                    },
                },
                {"jsonrpc": "2.0", "method": "notifications/initialized"},
                {
                    "jsonrpc": "2.0",
                    "id": 2,
                    "method": "tools/call",
                    "params": {"name": "run_flow", "arguments": {"path": str(flow)}},
                },
            ):
                process.stdin.write(json.dumps(message) + "\n")
                process.stdin.flush()
                if message.get("id") == 1:
                    assert '"id":1' in process.stdout.readline()
            deadline = time.monotonic() + 60
            while sum(" RequestSent " in line for line in _run_events("mcp slow")[1]) < 2:
                assert time.monotonic() < deadline, "the run never sent its slow request"
                time.sleep(0.1)
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=30)
        finally:
            process.kill()

    assert process.returncode == 128 + signal.SIGTERM.value
    assert stderr.strip().splitlines()[-1] == "interrupted by SIGTERM"
    assert "Traceback" not in stderr and " ERROR " not in stderr
    run_id, events = _run_events("mcp slow")
    assert events[-1].split()[3:] == ["RunCancelled", "reason=interrupted"]
    listed = baton("runs", "--suite", "mcp slow")[1]
    assert listed.splitlines()[1].split()[:2] == [run_id, "cancelled"]
