"""Services a flow declares: rate limits shared by every run of a process, health checked
before a run (skip or abort), recorded as events and projected for the service's API."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from context_service.keys import create_key
from events.memory import MemoryEventStore
from events.projections import DEFAULT_ORGANIZATION_ID, derive
from events.secrets import Cipher
from events.writer import BatchingWriter
from orchestrator.execution import Options, make_transport, prepare
from orchestrator.runner import Runner
from orchestrator.services import Limiters
from tests.cli import baton
from tests.conftest import SHOP, LiveService, Org


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
                if self.path.endswith("/health"):
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
        # a short poll: shutdown() waits for it, at every test's end
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
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


@pytest.mark.parametrize("runners", ["one for every run", "one per run (service, worker)"])
async def test_a_rate_limit_holds_across_the_rows_of_a_batch_run_concurrently(
    api: Api, tmp_path: Path, runners: str
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
    cipher = Cipher(os.urandom(32))
    limiters = Limiters(clock)

    def runner() -> Runner:
        return Runner(writer=writer, cipher=cipher, transport=transport, limiters=limiters)

    shared = runner()
    try:
        results = await asyncio.gather(
            *(
                (shared if runners == "one for every run" else runner()).run(job.plan, inputs)
                for inputs in job.runs
            )
        )
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


def test_a_health_check_that_times_out_skips_and_hides_the_secret_in_its_url(
    shell: Api, api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pg_server_dsn: str
) -> None:
    token = "tenant-" + os.urandom(8).hex()
    monkeypatch.setenv("TENANT_TOKEN", token)
    api.health_delay = 1.0
    (tmp_path / "slow.yaml").write_text(
        "name: timing out\nproject: timeout-" + token[-6:] + "\n"
        "base_url: '{{ env.API_URL }}'\n"
        "services:\n"
        "  api: {base_url: '{{ env.API_URL }}/t/{{ secrets.TENANT_TOKEN }}', health: /health,"
        " timeout: 200ms, retries: 0}\n"
        "tests:\n"
        "  ping: {request: {url: '/t/{{ secrets.TENANT_TOKEN }}/ping'}}\n"
    )
    code, out, err = baton("run", "slow.yaml")
    assert code == 0, out + err
    assert f"service unhealthy: api: GET {api.url}/t/***/health: no answer within 0.2 s" in out
    assert token not in out + err
    assert api.received == []

    async def rows() -> list[Any]:
        import asyncpg

        conn = await asyncpg.connect(pg_server_dsn)
        try:
            project = derive("project", DEFAULT_ORGANIZATION_ID, "timeout-" + token[-6:])
            return list(
                await conn.fetch(
                    "SELECT status, url, error, status_code FROM service_health_checks "
                    "WHERE project_id = $1",
                    project,
                )
            )
        finally:
            await conn.close()

    [row] = asyncio.run(rows())
    assert (row["status"], row["status_code"]) == ("timeout", None)
    assert row["url"] == f"{api.url}/t/***/health" and token not in row["error"]


@pytest.fixture
async def default_org(live_service: LiveService, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The service's API as the organization of the command line's runs, and ``baton run``
    recording into the service's database."""
    monkeypatch.setenv("BATON_DATABASE_URL", live_service.settings.database_url)
    key = await create_key(live_service.settings, organization="default", scopes=["read"], name="t")
    org = Org(live_service, key)
    yield org
    await org.http.aclose()


async def test_health_checks_are_recorded_projected_and_served(
    shell: Api, api: Api, tmp_path: Path, default_org: Org
) -> None:
    flow, project = _flow(tmp_path, "skip")
    code, out, err = await asyncio.to_thread(baton, "run", flow)
    assert code == 0, out + err
    api.health_status = 503
    code, out, err = await asyncio.to_thread(baton, "run", flow)
    assert code == 0, out + err
    api.health_status, api.health_delay = 200, 0.3
    (tmp_path / flow).write_text(
        (tmp_path / flow)
        .read_text()
        .replace("timeout: 2s", "timeout: 2s\n    degraded_after: 0.1s")
    )
    code, out, err = await asyncio.to_thread(baton, "run", flow)
    assert code == 0, out + err
    assert "service unhealthy" not in out  # a degraded service's tests run

    project_id = derive("project", DEFAULT_ORGANIZATION_ID, project)
    found = await default_org.ok("GET", f"/api/v1/projects/{project_id}/services/health")
    [service] = found["services"]
    assert (service["service"], service["status"]) == ("api", "degraded")
    history = [(c["status"], c["status_code"], c["attempts"]) for c in service["history"]]
    assert history == [("degraded", 200, 1), ("unhealthy", 503, 2), ("healthy", 200, 1)]
    degraded, unhealthy, healthy = service["history"]
    assert degraded["response_time_ms"] >= 300 and "over 100 ms" in degraded["error"]
    assert unhealthy["error"] == f"GET {api.url}/health answered 503 (after 2 attempts)"
    assert healthy["url"] == f"{api.url}/health" and healthy["error"] == ""
    only_one = await default_org.ok(
        "GET", f"/api/v1/projects/{project_id}/services/health", params={"history": 1}
    )
    assert [c["status"] for c in only_one["services"][0]["history"]] == ["degraded"]


def test_a_test_naming_an_undeclared_service_is_refused_with_its_place(
    shell: Api, tmp_path: Path
) -> None:
    (tmp_path / "typo.yaml").write_text(
        "name: typo\nservices:\n  api: {base_url: 'http://127.0.0.1:1'}\n"
        "tests:\n  a: {request: {url: 'http://127.0.0.1:1/a'}, service: apl}\n"
    )
    code, out, err = baton("run", "typo.yaml")
    assert code == 2, out + err
    assert "typo.yaml: tests.a.service: no service 'apl' among the declared services (api)" in err
    (tmp_path / "range.yaml").write_text(
        "name: range\nservices:\n  api: {base_url: 'http://127.0.0.1:1', rate_limit: 0}\n"
        "tests:\n  a: {request: {url: 'http://127.0.0.1:1/a'}}\n"
    )
    code, out, err = baton("run", "range.yaml")
    assert code == 2, out + err
    assert "range.yaml: services.api.rate_limit: 0 is out of range" in err


def test_an_environment_file_declares_services_over_the_flows(
    shell: Api, api: Api, tmp_path: Path
) -> None:
    flow, _ = _flow(tmp_path, "skip")
    (tmp_path / "env").mkdir()
    (tmp_path / "env" / "strict.yaml").write_text(
        "services:\n  api:\n    base_url: '{{ env.API_URL }}'\n    health: /health\n"
        "    retries: 0\n    on_unhealthy: abort\n"
    )
    (tmp_path / "env" / "typo.yaml").write_text(
        "services:\n  api: {base_url: x, health: /h, on_unhealty: abort}\n"
    )
    api.health_status = 503
    code, out, err = baton("run", flow, "--env", "strict")
    assert code == 3, out + err
    assert f"service unhealthy: api: GET {api.url}/health answered 503;" in err
    assert api.received == []
    code, out, err = baton("run", flow, "--env", "typo")
    assert code == 2, out + err
    assert (
        "typo.yaml: services.api: unknown field 'on_unhealty' (did you mean 'on_unhealthy'?)" in err
    )


def test_serve_waits_for_a_checked_service_before_its_health_check(
    shell: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("LATE_URL", f"http://127.0.0.1:{port}")
    (tmp_path / "late.yaml").write_text(
        "name: late\nbase_url: '{{ env.LATE_URL }}'\n"
        "services:\n  shop: {base_url: '{{ env.LATE_URL }}', health: /health, retries: 0}\n"
        "tests:\n  up: {request: {url: /health}, expect: {status: 200}}\n"
    )
    server = f"{sys.executable} {SHOP / 'server.py'} --port {port}"
    code, out, err = baton("run", "late.yaml", "--serve", f"sh -c 'sleep 0.5; exec {server}'")
    assert code == 0, out + err
    assert out.splitlines()[-1].startswith("1 passed in "), out


async def test_the_services_runs_check_health_first_and_skip_or_abort(
    live_service: LiveService, api: Api
) -> None:
    other = Api()
    key = await create_key(
        live_service.settings, organization="umbrella", scopes=["read", "run", "admin"], name="h"
    )
    org = Org(live_service, key)
    try:
        project = await org.ok("POST", "/api/v1/projects", 201, json={"name": "checked"})
        variables = [
            {"name": "API_URL", "value": api.url},
            {"name": "OTHER_URL", "value": other.url},
        ]
        environment = await org.ok(
            "POST",
            "/api/v1/environments",
            201,
            json={"project_id": project["id"], "name": "local", "variables": variables},
        )
        api.health_status = 503
        reasons = {}
        for action in ("skip", "abort"):
            content = (
                HEALTH.format(tag="x", action=action)
                .replace("project: health-x\n", "")
                .replace("name: checked", f"name: checked {action}")
            )
            suite = await org.ok(
                "POST",
                "/api/v1/suites",
                201,
                json={
                    "project_id": project["id"],
                    "content": content,
                    "filename": f"{action}.yaml",
                },
            )
            started = await org.start(suite["id"], environment["id"])
            # skipped tests do not fail a run; an aborted one fails
            expected = "passed" if action == "skip" else "failed"
            assert (await org.finished(started))["status"] == expected
            results = await org.ok("GET", f"/api/v1/runs/{started}/results?limit=10")
            reasons[action] = {r["test"]: (r["status"], r["message"]) for r in results["items"]}
        unhealthy = f"service unhealthy: api: GET {api.url}/health answered 503 (after 2 attempts)"
        assert reasons["skip"] == {
            "ping": ("skipped", unhealthy),
            "after": ("skipped", "depends on ping, which was skipped"),
            "elsewhere": ("passed", ""),
        }
        aborted = f"{unhealthy}; no test was run (on_unhealthy: abort)"
        assert set(reasons["abort"].values()) == {("skipped", aborted)}
        assert api.received == [] and [path for _, path in other.received] == ["/x"]
        health = await org.ok("GET", f"/api/v1/projects/{project['id']}/services/health")
        assert [c["status"] for c in health["services"][0]["history"]] == ["unhealthy"] * 2
    finally:
        await org.http.aclose()
        other.close()
