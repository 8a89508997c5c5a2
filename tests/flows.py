"""Write a flow file of a few tests, run it with the real CLI, and read what it recorded."""

from __future__ import annotations

import asyncio
import json
import textwrap
from pathlib import Path
from typing import Any

import asyncpg

from tests.cli import baton


def write_flow(directory: Path, tests: str, head: str = "", name: str = "flow.yaml") -> Path:
    flow = directory / name
    flow.write_text(
        f'name: {flow.stem}\nbase_url: "{{{{ env.SHOP_URL }}}}"\n'
        + textwrap.dedent(head)
        + "tests:\n"
        + textwrap.indent(textwrap.dedent(tests), "  ")
    )
    return flow


async def run_flow(flow: Path, *args: str) -> tuple[int, str, str, dict[str, Any]]:
    """(exit code, stdout, stderr, {test: its JSON report}) of ``baton run flow``."""
    report = flow.parent / "report.json"
    # baton() runs an event loop of its own: keep it off the test's
    code, out, err = await asyncio.to_thread(baton, "run", str(flow), "--json", str(report), *args)
    assert "Traceback" not in out + err
    tests: dict[str, Any] = {}
    if report.exists():
        run = json.loads(report.read_text())["runs"][0]
        tests = {test["name"]: test for test in run["tests"]} | {"_run_id": run["run_id"]}
    return code, out, err, tests


async def events_of(dsn: str, run_id: str, kind: str) -> list[dict[str, Any]]:
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            "SELECT data::text FROM events WHERE stream = $1 AND type = $2 ORDER BY version",
            f"run-{run_id}",
            kind,
        )
    finally:
        await connection.close()
    return [json.loads(row[0]) for row in rows]
