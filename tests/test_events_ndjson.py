"""``baton run --events ndjson``: every event as one JSON line on standard output, in the
shape of the service's run stream, redacted, flushed as it happens; the schemas of
docs/ are what the code generates."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest

from events.secrets import MASK
from examples.shop.server import serve as serve_shop
from orchestrator.errors import UsageError
from orchestrator.loader import decode_yaml, load_flow
from tests.cli import baton
from tests.test_leaks import FLOW, PASSWORD, assert_nothing_leaks, issued

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLES = ROOT / "examples"


def validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((DOCS / name).read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def lines_of(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


@pytest.mark.parametrize("kind", ["flow", "events"])
def test_committed_schemas_are_the_generated_ones(kind: str) -> None:
    code, out, _ = baton("schema", kind)
    assert code == 0
    committed = (DOCS / f"{kind}.schema.json").read_text(encoding="utf-8")
    assert out == committed, f"docs/{kind}.schema.json is stale: baton schema {kind} > it"


def test_ndjson_of_the_shop_checkout_validates_and_keeps_stdout_pure(
    env: dict[str, str],
) -> None:
    code, out, err = baton("run", str(EXAMPLES / "shop" / "checkout.yaml"), "--events", "ndjson")
    assert code == 0, err
    lines = lines_of(out)  # every line of stdout is JSON: the human output is elsewhere
    assert "10 passed" in err
    events = validator("events.schema.json")
    for line in lines:
        assert not list(events.iter_errors(line)), line
        assert line["type"] == line["event"]["type"]
    kinds = [line["type"] for line in lines]
    assert kinds[0] == "RunStarted" and kinds[-1] == "RunCompleted"
    assert kinds.count("TestPassed") == 10
    assert {line["run_id"] for line in lines} == {lines[0]["event"]["run_id"]}
    # the stream's events are the log's: the same ones, in the same order
    code, log, _ = baton("events", lines[0]["run_id"])
    assert code == 0
    assert len(log.splitlines()) == len(lines) + 1  # and its header


def test_a_line_is_the_run_streams_event(env: dict[str, str]) -> None:
    """What an SSE ``data:`` of the service's run stream carries is a line's ``event``; the
    position is the log's (what the stream resumes after)."""
    from context_service.feed import Entry
    from context_service.realtime import _ws_of
    from events.store import EventStore

    code, out, _ = baton("run", str(EXAMPLES / "shop" / "checkout.yaml"), "--events", "ndjson")
    assert code == 0
    lines = lines_of(out)

    async def stored() -> list[Any]:
        from events import open_store
        from events.settings import Settings

        store: EventStore = await open_store(Settings.from_env())
        try:
            return list(await store.read_stream(f"run-{lines[0]['run_id']}"))
        finally:
            await store.aclose()

    records = asyncio.run(stored())
    assert [json.loads(Entry(r, None).data) for r in records] == [line["event"] for line in lines]
    # a line is the WebSocket message of the run stream (position included), with the
    # run's id (as data: the log's JSONB keeps no key order)
    sockets = [json.loads(_ws_of(Entry(r, None), project=False)[0]) for r in records]
    assert [{**m, "run_id": lines[0]["run_id"]} for m in sockets] == lines


def test_an_invalid_event_line_is_refused_by_the_schema() -> None:
    events = validator("events.schema.json")
    assert not events.is_valid({"type": "TestPassed", "event": {"type": "TestPassed"}})
    assert not events.is_valid({"type": "Nope", "event": {"type": "Nope"}})


async def test_ndjson_is_redacted(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A secret the flow reads and a refresh token the login answers with (the flow never
    names it) appear in no line; the run's failure still exits 1."""
    shop, url = await serve_shop("127.0.0.1", 0)
    try:
        flow = tmp_path / "canary.yaml"
        flow.write_text(FLOW, encoding="utf-8")
        secrets = tmp_path / "secrets.yaml"
        secrets.write_text(f"SHOP_PASSWORD: {PASSWORD}\n", encoding="utf-8")
        monkeypatch.setenv("SHOP_URL", url)
        code, out, err = await asyncio.to_thread(
            baton, "run", str(flow), "--secrets", str(secrets), "--events", "ndjson"
        )
        assert code == 1, err
        lines = lines_of(out)
        tokens = [ln["event"] for ln in lines if ln["type"] == "AuthTokenUpdated"]
        assert tokens and all(token["value"] == MASK for token in tokens)
        assert_nothing_leaks(issued(shop), {"the ndjson stream": out, "stderr": err})
    finally:
        await shop.cleanup()


def test_lines_are_written_as_the_events_happen(env: dict[str, str], tmp_path: Path) -> None:
    """The first lines arrive while a slow test is still waiting for its answer."""
    flow = tmp_path / "slow.yaml"
    flow.write_text(
        'name: slow\nbase_url: "{{ env.SHOP_URL }}"\n'
        "tests:\n  wait:\n    request: {url: /slow, params: {ms: 3000}}\n",
        encoding="utf-8",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "run", str(flow), "--events", "ndjson"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **env},
    )
    assert process.stdout is not None
    try:
        first = json.loads(process.stdout.readline())
        assert first["type"] == "RunStarted"
        assert process.poll() is None, "the line came only when the run had ended"
        started = time.monotonic()
        rest = lines_of(process.stdout.read().decode())
        assert time.monotonic() - started > 1.0
        assert rest[-1]["type"] == "RunCompleted"
    finally:
        process.wait(timeout=30)
        process.stdout.close()
    assert process.returncode == 0


def test_ndjson_with_an_invalid_flow_is_the_same_error(env: dict[str, str], tmp_path: Path) -> None:
    flow = tmp_path / "broken.yaml"
    flow.write_text("name: broken\ntests:\n  a:\n    request: {url: /x, method: 7}\n")
    code, out, err = baton("run", str(flow), "--events", "ndjson")
    assert code == 2
    assert out == ""
    assert err.startswith(f"error: {flow}: tests.a.request.method")


def test_ndjson_refuses_a_queue(env: dict[str, str]) -> None:
    flow = EXAMPLES / "shop" / "checkout.yaml"
    code, _, err = baton("run", str(flow), "--events", "ndjson", "--queue", "redis://x")
    assert code == 2
    assert "--queue and --events" in err


def example_flows() -> list[Path]:
    """Every flow file of examples/ (not environments, not CI files)."""
    found = [p for p in sorted(EXAMPLES.rglob("*.yaml")) if "env" not in p.parts]
    assert len(found) >= 12
    return found


@pytest.mark.parametrize("path", example_flows(), ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_the_flow_schema_accepts_every_example(path: Path) -> None:
    load_flow(path)  # the loader accepts it, so must the schema
    # as an editor reads it: YAML, dates as text
    document = msgspec.to_builtins(decode_yaml(path.read_bytes(), str(path)))
    errors = list(validator("flow.schema.json").iter_errors(document))
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors]


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("name: x\ntests:\n  a:\n    request: {url: /, method: 7}\n", ["tests", "a", "request"]),
        ("name: x\ntests:\n  a:\n    request: {url: /}\n    retires: 2\n", ["tests", "a"]),
        ("tests: {}\n", []),
        ("name: x\ntests:\n  a:\n    request: {url: /}\n    retries: -1\n", ["tests", "a"]),
    ],
)
def test_the_flow_schema_rejects_what_the_loader_rejects(
    text: str, where: list[str], tmp_path: Path
) -> None:
    flow = tmp_path / "bad.yaml"
    flow.write_text(text, encoding="utf-8")
    with pytest.raises(UsageError):
        load_flow(flow)
    document = decode_yaml(text.encode(), "bad.yaml")
    errors = list(validator("flow.schema.json").iter_errors(document))
    assert errors
    assert any(list(e.absolute_path)[: len(where)] == where for e in errors)
