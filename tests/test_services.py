"""Services a flow declares: rate limits shared by every run of a process, health checked
before a run (skip or abort), recorded as events and projected for the service's API."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from events.memory import MemoryEventStore
from events.secrets import Cipher
from events.writer import BatchingWriter
from orchestrator.execution import Options, make_transport, prepare
from orchestrator.runner import Runner
from tests.cli import baton


class Api:
    """A small API on a free port: /health answers ``health_status`` after ``health_delay``
    seconds, any other path 200. Records when (by ``clock``) each request arrived."""

    def __init__(self, clock: Any = None) -> None:
        self.clock = clock
        self.health_status = 200
        self.health_delay = 0.0
        self.received: list[tuple[float, str]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/health":
                    time.sleep(api.health_delay)
                    status = api.health_status
                else:
                    api.received.append((api.clock.now() if api.clock else 0.0, self.path))
                    status = 200
                body = b'{"ok": true}'
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class StepClock:
    """Time that passes only when the limiter sleeps, and only once the server has received
    every request granted before it (``per_minute`` per window): what the server records
    is then the time each request was sent at, without waiting a real minute."""

    def __init__(self, api: Api, per_minute: int) -> None:
        self.t = 0.0
        self.api = api
        self.per_minute = per_minute
        self.sleeps = 0

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        deadline = time.monotonic() + 10
        while len(self.api.received) < self.sleeps * self.per_minute:
            assert time.monotonic() < deadline, "the granted requests never arrived"
            await asyncio.sleep(0.001)
        self.t += seconds


@pytest.fixture
def api() -> Iterator[Api]:
    served = Api()
    yield served
    served.close()


LIMITED = """
name: limited
base_url: "{{{{ api }}}}"
services:
  api: {{base_url: "{{{{ api }}}}", rate_limit: {limit}}}
tests:
  first: {{request: {{url: /first}}, expect: {{status: 200}}}}
  second: {{request: {{url: /second}}, depends_on: [first], expect: {{status: 200}}}}
  third: {{request: {{url: "{{{{ api }}}}/third"}}, expect: {{status: 200}}}}
"""


async def test_a_rate_limit_holds_across_the_rows_of_a_batch_run_concurrently(
    api: Api, tmp_path: Path
) -> None:
    limit = 4
    clock = StepClock(api, limit)
    api.clock = clock
    flow = tmp_path / "limited.yaml"
    flow.write_text(LIMITED.format(limit=limit))
    rows = tmp_path / "rows.csv"
    rows.write_text("n\n1\n2\n3\n")
    [job] = prepare(Options(paths=[flow], variables={"api": api.url}, data_file=rows), {})
    store = MemoryEventStore()
    writer = BatchingWriter(store)
    transport = make_transport(10)
    runner = Runner(writer=writer, cipher=Cipher(os.urandom(32)), transport=transport, clock=clock)
    try:
        results = await asyncio.gather(*(runner.run(job.plan, inputs) for inputs in job.runs))
    finally:
        await writer.aclose()
        await transport.aclose()

    assert [result.status for result in results] == ["passed"] * 3
    times = sorted(at for at, _ in api.received)
    assert len(times) == 9  # 3 rows x 3 tests, no request lost or repeated
    for at in times:
        in_window = [other for other in times if at <= other < at + 60]
        assert len(in_window) <= limit, times
    # 9 requests at 4 a minute: the third minute had to begin
    assert times[-1] >= 120, times


HEALTH = """
name: checked
project: health-{tag}
base_url: "{{{{ env.API_URL }}}}"
services:
  api:
    base_url: "{{{{ env.API_URL }}}}"
    health: /health
    timeout: 2s
    retries: 1
    on_unhealthy: {action}
tests:
  ping: {{request: {{url: /ping}}, expect: {{status: 200}}}}
  after: {{request: {{url: /after}}, depends_on: [ping], expect: {{status: 200}}}}
  elsewhere: {{request: {{url: "{{{{ env.OTHER_URL }}}}/x"}}, expect: {{status: 200}}}}
"""


@pytest.fixture
def shell(
    monkeypatch: pytest.MonkeyPatch, pg_server_dsn: str, api: Api, tmp_path: Path
) -> Iterator[Api]:
    other = Api()
    monkeypatch.setenv("API_URL", api.url)
    monkeypatch.setenv("OTHER_URL", other.url)
    monkeypatch.setenv("BATON_DATABASE_URL", pg_server_dsn)
    monkeypatch.setenv("BATON_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    yield other
    other.close()


def _flow(tmp_path: Path, action: str) -> tuple[str, str]:
    tag = os.urandom(4).hex()
    (tmp_path / "checked.yaml").write_text(HEALTH.format(tag=tag, action=action))
    return "checked.yaml", f"health-{tag}"


async def _health_rows(dsn: str, project: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(
            "SELECT h.* FROM service_health_checks h JOIN projects p ON p.id = h.project_id "
            "WHERE p.name = $1 ORDER BY h.checked_at",
            project,
        )
    finally:
        await conn.close()


def test_an_unhealthy_service_skips_its_tests_and_only_those(
    shell: Api, api: Api, tmp_path: Path
) -> None:
    api.health_status = 503
    flow, _ = _flow(tmp_path, "skip")
    code, out, err = baton("run", flow)
    assert code == 0, out + err
    reason = f"service unhealthy: api: GET {api.url}/health answered 503 (after 2 attempts)"
    assert reason in out, out
    assert "depends on ping, which was skipped" in out
    assert [path for _, path in api.received] == []  # no test sent anything to it
    assert [path for _, path in shell.received] == ["/x"]  # the other service's test ran


def test_an_unhealthy_service_with_abort_exits_3_before_any_test(
    shell: Api, api: Api, tmp_path: Path
) -> None:
    api.health_status = 500
    flow, _ = _flow(tmp_path, "abort")
    code, out, err = baton("run", flow)
    assert code == 3, out + err
    assert "service unhealthy: api: GET" in err and "no test was run (on_unhealthy: abort)" in err
    assert api.received == [] and shell.received == []


async def test_health_checks_are_recorded_and_projected(
    shell: Api, api: Api, tmp_path: Path, pg_server_dsn: str
) -> None:
    flow, project = _flow(tmp_path, "skip")
    api.health_delay = 0.0
    code, out, err = await asyncio.to_thread(baton, "run", flow)
    assert code == 0, out + err
    api.health_status = 503
    code, out, err = await asyncio.to_thread(baton, "run", flow)
    assert code == 0, out + err

    rows = await _health_rows(pg_server_dsn, project)
    assert [(r["service"], r["status"], r["status_code"], r["attempts"]) for r in rows] == [
        ("api", "healthy", 200, 1),
        ("api", "unhealthy", 503, 2),
    ]
    assert rows[0]["response_time_ms"] >= 0 and rows[1]["error"].endswith("(after 2 attempts)")


def test_a_slow_health_check_is_degraded_and_its_tests_run(
    shell: Api, api: Api, tmp_path: Path
) -> None:
    api.health_delay = 0.3
    (tmp_path / "slow.yaml").write_text(
        HEALTH.format(tag="slow", action="skip").replace(
            "timeout: 2s", "timeout: 2s\n    degraded_after: 100ms"
        )
    )
    code, out, err = baton("run", "slow.yaml")
    assert code == 0, out + err
    assert sorted(path for _, path in api.received) == ["/after", "/ping"]
    code, out, err = baton("events", _last_run(out))
    assert code == 0, out + err


def _last_run(out: str) -> str:
    for word in out.split():
        if len(word) == 36 and word.count("-") == 4:
            return word
    raise AssertionError(f"no run id in {out!r}")


def test_a_test_naming_an_undeclared_service_is_refused_with_its_place(
    shell: Api, tmp_path: Path
) -> None:
    (tmp_path / "typo.yaml").write_text(
        "name: typo\nservices:\n  api: {base_url: 'http://127.0.0.1:1', rate_limit: 0}\n"
        "tests:\n  a: {request: {url: 'http://127.0.0.1:1/a'}, service: apl}\n"
    )
    code, out, err = baton("run", "typo.yaml")
    assert code == 2, out + err
    assert "typo.yaml: tests.a.service: no service 'apl' in the flow's services" in err
    assert "typo.yaml: services.api.rate_limit: 0 is out of range" in err
