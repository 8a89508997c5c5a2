"""``baton mcp`` driven by the MCP client of the same package, over stdio, as a coding
agent would: a subprocess with a private BATON_HOME and database, against the demo shop."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

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
    assert set(tools) == {"validate_flow", "run_flow", "run_failures", "run_context"}
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
        for tool in ("run_failures", "run_context"):
            failed, _, text = await call(client, tool, run_id="no-such-run")
            assert failed
            assert "no run 'no-such-run' in the event store" in text
            assert "[exit 2]" in text
