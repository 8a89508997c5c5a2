"""The runner in process, on the in-memory store: what a run records is the run, whatever
backend keeps it (the contract tests hold every backend to the same reads)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from events import types as ev
from events.context import fold
from events.memory import MemoryEventStore
from events.secrets import Cipher
from events.writer import BatchingWriter
from orchestrator.execution import Options, make_transport, prepare
from orchestrator.runner import Runner

CHECKOUT = Path(__file__).parent.parent / "examples" / "shop" / "checkout.yaml"


class InProcess:
    def __init__(self, store: MemoryEventStore, runner: Runner) -> None:
        self.store = store
        self.runner = runner


@pytest.fixture
async def in_process() -> AsyncIterator[InProcess]:
    store = MemoryEventStore()
    writer = BatchingWriter(store)
    transport = make_transport(10)
    runner = Runner(writer=writer, cipher=Cipher(os.urandom(32)), transport=transport)
    yield InProcess(store, runner)
    await writer.aclose()
    await transport.aclose()


async def test_a_chain_records_its_captures_and_keeps_the_token_encrypted(
    in_process: InProcess, shop_url: str
) -> None:
    [job] = prepare(Options(paths=[CHECKOUT]), {"SHOP_URL": shop_url})
    result = await in_process.runner.run(job.plan, job.runs[0])
    await in_process.runner.writer.flush()

    assert result.status == "passed", [(t.name, t.status) for t in result.tests]
    recorded = await in_process.store.read_stream(ev.run_stream(result.run_id))
    assert [r.version for r in recorded] == list(range(1, len(recorded) + 1))
    assert recorded[0].type == "RunStarted" and recorded[-1].type == "RunCompleted"

    context = fold(recorded)
    assert context.status == "passed"
    assert context.order == job.plan.order
    assert {"login", "checkout"} <= context.captured.keys()
    assert context.auth and all(token.startswith("enc:v1:") for token in context.auth.values())
    log = b"".join(msgspec.json.encode(r.event) for r in recorded)
    for token in context.auth.values():
        assert in_process.runner.cipher.decrypt(token).encode() not in log


async def test_a_failed_expectation_fails_its_test_and_skips_what_needs_it(
    in_process: InProcess, shop_url: str, tmp_path: Path
) -> None:
    flow = tmp_path / "wrong.yaml"
    flow.write_text(
        f"""
name: wrong password
base_url: {shop_url}
tests:
  login:
    request:
      method: POST
      url: /auth/login
      json: {{username: alice, password: not-hers}}
    expect: {{status: 200}}
    capture: {{auth.token: {{json: $.access_token}}}}
  profile:
    request:
      url: /me
      headers: {{Authorization: "Bearer {{{{ auth.token }}}}"}}
    expect: {{status: 200}}
"""
    )
    [job] = prepare(Options(paths=[flow]), {})
    result = await in_process.runner.run(job.plan, job.runs[0])
    await in_process.runner.writer.flush()

    assert result.status == "failed"
    assert {t.name: t.status for t in result.tests} == {"login": "failed", "profile": "skipped"}
    recorded = await in_process.store.read_stream(ev.run_stream(result.run_id))
    assert [r.type for r in recorded if r.type in {"TestFailed", "TestSkipped"}] == [
        "TestFailed",
        "TestSkipped",
    ]
    assert fold(recorded).status == "failed"
