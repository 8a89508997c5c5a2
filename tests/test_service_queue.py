"""The service's runs on the worker queue for real: a service with BATON_QUEUE_URL (a private
redis-server), ``baton worker`` subprocesses, the demo shop, a database of the module's own.
What happened is counted in the events table and read from Redis itself."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from context_service import queued as queued_module
from context_service.keys import create_key
from context_service.queued import QueuedRuns
from events.settings import Settings
from orchestrator.queue import GROUP, STREAM
from tests.conftest import (
    LOOPBACK,
    LiveService,
    Org,
    RedisServer,
    free_port,
    private_database,
)
from tests.test_service_runs import RERUN_FLOW, SLOW_FLOW, _all_events, _clear_token, _project
from tests.test_service_runs import _suite as _upload


def _key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


@contextlib.contextmanager
def _service(dsn: str, queue: str, key: str) -> Iterator[LiveService]:
    home = Path(tempfile.mkdtemp(prefix="baton-test-home-"))
    settings = Settings(
        allowed_targets=LOOPBACK, database_url=dsn, home=home, secret_key=key, queue_url=queue
    )
    service = LiveService(settings)
    service.start()
    try:
        yield service
    finally:
        service.stop()
        shutil.rmtree(home, ignore_errors=True)


class Worker:
    """``baton worker`` in a process of its own, its log in a file (shown if a test fails)."""

    def __init__(self, dsn: str, queue: str, key: str, folder: Path, *args: str) -> None:
        env = {**os.environ, "BATON_DATABASE_URL": dsn, "BATON_SECRET_KEY": key}
        env["BATON_HOME"] = str(folder / "home")
        for inherited in ("BATON_ALLOWED_TARGETS", "BATON_QUEUE_URL", "BATON_REDIS_URL"):
            env.pop(inherited, None)  # the restrictions are the service's, carried by the job
        self.log = folder / f"worker-{len(list(folder.glob('worker-*')))}.log"
        self._log = self.log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "worker", "--queue", queue, *args],
            cwd=folder,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        self.consumer = f"{socket.gethostname()}:{self.process.pid}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        sys.stderr.write(self.log.read_text())  # pytest shows it for a failed test


@pytest.fixture(scope="module")
def queue_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def secret_key() -> str:
    return _key()


@pytest.fixture(scope="module")
def queued_service(
    service_database: str, queue_redis: RedisServer, secret_key: str
) -> Iterator[LiveService]:
    with _service(service_database, queue_redis.url, secret_key) as service:
        yield service


@pytest.fixture(scope="module")
def worker(
    queued_service: LiveService,
    service_database: str,
    queue_redis: RedisServer,
    secret_key: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Worker]:
    folder = tmp_path_factory.mktemp("worker")
    started = Worker(service_database, queue_redis.url, secret_key, folder, "-c", "8")
    yield started
    started.stop()


@pytest.fixture(scope="module")
async def acme(queued_service: LiveService, worker: Worker) -> AsyncIterator[Org]:
    key = await create_key(
        queued_service.settings, organization="acme", scopes=["read", "run", "admin"], name="ci"
    )
    org = Org(queued_service, key)
    yield org
    await org.http.aclose()


@pytest.fixture
async def queue(queue_redis: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(queue_redis.url)
    yield client
    await client.aclose()


async def _fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def _stored(dsn: str, run_id: str) -> list[str]:
    """The run's events as the table holds them (JSON text), in order."""
    rows = await _fetch(
        dsn,
        "SELECT type || ' ' || data::text FROM events WHERE stream = $1 ORDER BY version",
        f"run-{run_id}",
    )
    return [row[0] for row in rows]


async def _jobs(queue: Redis) -> list[bytes]:
    """Every entry of the job stream, raw, as any reader of Redis sees it."""
    entries = await queue.xrange(STREAM)
    return [value for _, fields in entries for value in fields.values()]


async def _state(dsn: str, run_id: str) -> tuple[str, str]:
    rows = await _fetch(dsn, "SELECT state, error FROM service_runs WHERE id = $1::uuid", run_id)
    return rows[0][0], rows[0][1]


async def _until(check: Any, within: float = 15) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "never happened"
        await asyncio.sleep(0.05)


async def test_a_run_started_through_the_api_runs_on_a_worker_with_its_secrets_sealed(
    acme: Org, shop_url: str, worker: Worker, queue: Redis, queued_service: LiveService
) -> None:
    ids = await _project(acme, "queued", shop_url, EXPECTED_USER="alice")
    suite = await _upload(acme, ids["project"], RERUN_FLOW)
    started = await acme.ok(
        "POST", "/api/v1/runs", 202, json={"suite_id": suite, "environment_id": ids["environment"]}
    )
    assert started["status"] == "queued"
    run = await acme.finished(started["id"], within=30)
    assert (run["status"], run["passed_tests"], run["total_tests"]) == ("passed", 3, 3)
    results = await acme.ok("GET", f"/api/v1/runs/{run['id']}/results")
    assert sorted((r["test"], r["status"]) for r in results["items"]) == [
        ("echo", "passed"),
        ("login", "passed"),
        ("profile", "passed"),
    ]

    # the worker took it from the workers' stream and group, and acknowledged it (just
    # after its end was stored: the read tables may show the end a moment before)
    async def acknowledged() -> bool:
        consumers = await queue.xinfo_consumers(STREAM, GROUP)
        return [c["pending"] for c in consumers if c["name"].decode() == worker.consumer] == [0]

    await _until(acknowledged)
    dsn = queued_service.settings.database_url or ""

    async def recorded() -> bool:
        return await _state(dsn, run["id"]) == ("finished", "")

    await _until(recorded)  # the service's own record of the run, as the launcher's on_done
    # nothing of the environment's secret, nor of the token the run captured, is in clear
    token = await _clear_token(queued_service, run["id"])
    jobs = await _jobs(queue)
    assert jobs and not any(b"secret-alice" in job or token.encode() in job for job in jobs)
    stored = await _stored(queued_service.settings.database_url or "", run["id"])
    assert stored and not any("secret-alice" in e or token in e for e in stored)
    context = await acme.ok("GET", f"/api/v1/runs/{run['id']}/context")
    assert context["auth"] == {"token": "***"}
    health = await acme.ok("GET", "/health")
    [queue_health] = [d for d in health["dependencies"] if d["name"] == "queue"]
    assert queue_health["status"] == "ok" and "runs go to baton worker" in queue_health["detail"]


async def test_a_rerun_runs_on_a_worker_with_the_captured_token_masked(
    acme: Org, shop_url: str, queued_service: LiveService
) -> None:
    ids = await _project(acme, "queued-rerun", shop_url, EXPECTED_USER="bob")
    suite = await _upload(acme, ids["project"], RERUN_FLOW)
    first = await acme.ok(
        "POST", "/api/v1/runs", 202, json={"suite_id": suite, "environment_id": ids["environment"]}
    )
    first = await acme.finished(first["id"], within=30)
    assert (first["status"], first["passed_tests"], first["failed_tests"]) == ("failed", 1, 1)
    await acme.ok(
        "PATCH",
        f"/api/v1/environments/{ids['environment']}",
        json={"variables": [{"name": "EXPECTED_USER", "value": "alice"}]},
    )
    again = await acme.ok("POST", f"/api/v1/runs/{first['id']}/rerun", 202)
    again = await acme.finished(again["id"], within=30)
    assert (again["status"], again["total_tests"], again["passed_tests"]) == ("passed", 2, 2)
    events = await _all_events(acme, again["id"])
    urls = [e["data"]["url"] for e in events if e["type"] == "RequestSent"]
    assert urls and not any(url.endswith("/auth/login") for url in urls)
    # the reused token reached the shop (profile passed) and is masked where echo sent it
    token = await _clear_token(queued_service, first["id"])
    stored = await _stored(queued_service.settings.database_url or "", again["id"])
    assert any("/echo" in e and "***" in e for e in stored if e.startswith("RequestSent"))
    assert not any(token in e for e in stored)


async def test_a_run_to_a_refused_target_fails_on_the_worker_too(acme: Org) -> None:
    ids = await _project(acme, "refused", "http://169.254.169.254")
    suite = await _upload(acme, ids["project"], SLOW_FLOW)
    run = await acme.ok(
        "POST", "/api/v1/runs", 202, json={"suite_id": suite, "environment_id": ids["environment"]}
    )
    run = await acme.finished(run["id"], within=30)
    assert run["status"] == "failed"
    results = await acme.ok("GET", f"/api/v1/runs/{run['id']}/results")
    nap = next(r for r in results["items"] if r["test"] == "nap")
    assert "refused target: 169.254.169.254 is a link-local address" in nap["message"]


async def test_a_running_queued_run_is_cancelled_through_the_api(
    acme: Org, shop_url: str, queued_service: LiveService
) -> None:
    ids = await _project(acme, "queued-slow", shop_url)
    suite = await _upload(acme, ids["project"], SLOW_FLOW)
    run = await acme.ok(
        "POST", "/api/v1/runs", 202, json={"suite_id": suite, "environment_id": ids["environment"]}
    )

    async def sent() -> bool:
        page = await acme.ok("GET", f"/api/v1/runs/{run['id']}/events")
        return any(e["type"] == "RequestSent" for e in page["items"])

    await _until(sent)
    cancelled = await acme.ok("POST", f"/api/v1/runs/{run['id']}/cancel", 202)
    assert (cancelled["status"], cancelled["message"]) == ("cancelled", "cancelled through the API")
    events = await _all_events(acme, run["id"])
    assert events[-1] == {**events[-1], "type": "RunCancelled"}
    assert events[-1]["data"]["reason"] == "cancelled through the API"
    assert not any(e["type"] in ("TestPassed", "RunCompleted") for e in events)
    dsn = queued_service.settings.database_url or ""
    assert await _state(dsn, run["id"]) == ("cancelled", "")
    again = await acme.http.post(f"/api/v1/runs/{run['id']}/cancel")
    assert again.status_code == 409 and "ended" in again.json()["detail"]


async def test_fifty_runs_at_once_each_end_exactly_once(
    acme: Org, shop_url: str, queued_service: LiveService
) -> None:
    ids = await _project(acme, "queued-many", shop_url, EXPECTED_USER="alice")
    suite = await _upload(acme, ids["project"], RERUN_FLOW)
    body = {"suite_id": suite, "environment_id": ids["environment"]}
    started = await asyncio.gather(
        *(acme.ok("POST", "/api/v1/runs", 202, json=body) for _ in range(50))
    )
    run_ids = [run["id"] for run in started]
    assert len(set(run_ids)) == 50
    ended = [await acme.finished(run_id, within=120) for run_id in run_ids]
    assert {run["status"] for run in ended} == {"passed"}
    dsn = queued_service.settings.database_url or ""
    counts = await _fetch(
        dsn,
        "SELECT stream, count(*) FILTER (WHERE type = 'RunStarted'),"
        " count(*) FILTER (WHERE type IN ('RunCompleted', 'RunCancelled'))"
        " FROM events WHERE stream = ANY($1::text[]) GROUP BY stream",
        [f"run-{run_id}" for run_id in run_ids],
    )
    assert len(counts) == 50 and {(row[1], row[2]) for row in counts} == {(1, 1)}

    async def recorded() -> bool:
        states = await _fetch(
            dsn, "SELECT state FROM service_runs WHERE id = ANY($1::uuid[])", run_ids
        )
        return [row[0] for row in states] == ["finished"] * 50

    await _until(recorded)


async def test_a_run_still_waiting_in_the_queue_is_cancelled_without_ever_starting(
    shop_url: str, private_redis: RedisServer, tmp_path: Path
) -> None:
    key = _key()
    async with private_database() as dsn:
        with _service(dsn, private_redis.url, key) as service:  # and no worker yet
            api_key = await create_key(
                service.settings, organization="acme", scopes=["read", "run", "admin"], name="ci"
            )
            org = Org(service, api_key)
            try:
                ids = await _project(org, "waiting", shop_url)
                suite = await _upload(org, ids["project"], SLOW_FLOW)
                body = {"suite_id": suite, "environment_id": ids["environment"]}
                run = await org.ok("POST", "/api/v1/runs", 202, json=body)
                assert (await org.ok("GET", f"/api/v1/runs/{run['id']}"))["status"] == "queued"
                cancelled = await org.ok("POST", f"/api/v1/runs/{run['id']}/cancel", 202)
                assert cancelled["status"] == "cancelled"
                assert cancelled["message"] == "cancelled through the API"
                # a worker that comes now finds the run ended: it only acknowledges its job
                started = Worker(dsn, private_redis.url, key, tmp_path)
                queue = Redis.from_url(private_redis.url)
                try:

                    async def acknowledged() -> bool:
                        groups = await queue.xinfo_groups(STREAM)
                        return bool(groups[0]["entries-read"] == 1 and groups[0]["pending"] == 0)

                    await _until(acknowledged, within=30)
                finally:
                    await queue.aclose()
                    started.stop()
                stored = await _stored(dsn, run["id"])
                assert [e.split(" ", 1)[0] for e in stored] == ["RunStarted", "RunCancelled"]
                assert "cancelled through the API" in stored[1]
                assert await _state(dsn, run["id"]) == ("cancelled", "")
            finally:
                await org.http.aclose()


async def test_a_worker_without_the_services_key_ends_the_run_saying_so(
    shop_url: str, private_redis: RedisServer, tmp_path: Path
) -> None:
    async with private_database() as dsn:
        with _service(dsn, private_redis.url, _key()) as service:
            api_key = await create_key(
                service.settings, organization="acme", scopes=["read", "run", "admin"], name="ci"
            )
            org = Org(service, api_key)
            started = Worker(dsn, private_redis.url, _key(), tmp_path)  # another key
            try:
                ids = await _project(org, "other-key", shop_url)
                suite = await _upload(org, ids["project"], SLOW_FLOW)
                body = {"suite_id": suite, "environment_id": ids["environment"]}
                run = await org.ok("POST", "/api/v1/runs", 202, json=body)
                stored: list[str] = []

                async def ended() -> bool:
                    stored[:] = await _stored(dsn, run["id"])
                    return bool(stored) and stored[-1].startswith("RunCancelled")

                await _until(ended, within=30)
                assert "cannot be read with this worker's secret key" in stored[-1]
                assert not any(e.startswith("RequestSent") for e in stored)
                # the run is still the organization's, in its project, saying why it ended
                shown = await org.finished(run["id"])
                assert (shown["status"], shown["suite"]) == ("cancelled", "slow")
                assert shown["project_id"] == ids["project"]
                assert "cannot be read with this worker's secret key" in shown["message"]
                listed = await org.ok("GET", "/api/v1/runs")
                assert [r["id"] for r in listed["items"]] == [run["id"]]
            finally:
                started.stop()
                await org.http.aclose()


async def test_with_the_queue_down_a_run_is_refused_with_503_and_health_says_so(
    shop_url: str, private_redis: RedisServer
) -> None:
    async with private_database() as dsn:
        with _service(dsn, private_redis.url, _key()) as service:
            api_key = await create_key(
                service.settings, organization="acme", scopes=["read", "run", "admin"], name="ci"
            )
            org = Org(service, api_key)
            try:
                ids = await _project(org, "queue-down", shop_url)
                suite = await _upload(org, ids["project"], SLOW_FLOW)
                private_redis.kill()
                body = {"suite_id": suite, "environment_id": ids["environment"]}
                response = await org.http.post("/api/v1/runs", json=body)
                assert response.status_code == 503
                assert "the worker queue is unreachable" in response.json()["detail"]
                runs = await org.ok("GET", "/api/v1/runs")
                assert [(r["status"], r["message"]) for r in runs["items"]] == [
                    ("error", "the worker queue was unreachable: the run did not start")
                ]
                health = await org.ok("GET", "/health")
                assert health["status"] == "degraded"
                [queue] = [d for d in health["dependencies"] if d["name"] == "queue"]
                assert queue["status"] == "degraded" and "cannot be started" in queue["detail"]
            finally:
                await org.http.aclose()


async def test_a_restarted_service_records_the_end_of_runs_queued_before(
    shop_url: str, private_redis: RedisServer, tmp_path: Path
) -> None:
    key = _key()
    async with private_database() as dsn:
        with _service(dsn, private_redis.url, key) as service:  # no worker yet
            api_key = await create_key(
                service.settings, organization="acme", scopes=["read", "run", "admin"], name="ci"
            )
            org = Org(service, api_key)
            try:
                ids = await _project(org, "restart", shop_url, EXPECTED_USER="alice")
                suite = await _upload(org, ids["project"], RERUN_FLOW)
                body = {"suite_id": suite, "environment_id": ids["environment"]}
                run = await org.ok("POST", "/api/v1/runs", 202, json=body)
            finally:
                await org.http.aclose()
        assert await _state(dsn, run["id"]) == ("queued", "")
        with _service(dsn, private_redis.url, key) as service:
            org = Org(service, api_key)
            started = Worker(dsn, private_redis.url, key, tmp_path)
            try:
                ended = await org.finished(run["id"], within=30)
                assert ended["status"] == "passed"

                async def recorded() -> bool:
                    return await _state(dsn, run["id"]) == ("finished", "")

                await _until(recorded)
            finally:
                started.stop()
                await org.http.aclose()


async def test_a_run_whose_instance_died_before_queuing_it_is_queued_by_another(
    shop_url: str, private_redis: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Instance A records the run and dies before its job reaches the queue; instance B
    notices the queued run with no job and queues it again: it runs, once."""
    key = _key()

    async def killed(*_: object) -> None:
        raise RuntimeError("the instance was killed here")  # as if: nothing after it runs

    async with private_database() as dsn:
        with _service(dsn, private_redis.url, key) as a:
            api_key = await create_key(
                a.settings, organization="acme", scopes=["read", "run", "admin"], name="ci"
            )
            org = Org(a, api_key)
            try:
                ids = await _project(org, "orphan", shop_url, EXPECTED_USER="alice")
                suite = await _upload(org, ids["project"], RERUN_FLOW)
                body = {"suite_id": suite, "environment_id": ids["environment"]}
                monkeypatch.setattr(QueuedRuns, "start", killed)
                response = await org.http.post("/api/v1/runs", json=body)
                assert response.status_code == 500
            finally:
                await org.http.aclose()
        monkeypatch.undo()
        [(run_id,)] = await _fetch(dsn, "SELECT id::text FROM service_runs")
        assert await _state(dsn, run_id) == ("queued", "")
        queue = Redis.from_url(private_redis.url)
        try:
            assert await _jobs(queue) == []
            monkeypatch.setattr(queued_module, "_GRACE", 0.5)
            with _service(dsn, private_redis.url, key) as b:
                org = Org(b, api_key)
                started = Worker(dsn, private_redis.url, key, tmp_path)
                try:
                    ended = await org.finished(run_id, within=30)
                    assert (ended["status"], ended["passed_tests"]) == ("passed", 3)

                    async def recorded() -> bool:
                        return await _state(dsn, run_id) == ("finished", "")

                    await _until(recorded)
                finally:
                    started.stop()
                    await org.http.aclose()
            assert [run_id.encode() in job for job in await _jobs(queue)] == [True]
            # ended: its job, secrets sealed in it, is not kept in the database any longer
            assert await _fetch(dsn, "SELECT job FROM service_runs") == [("",)]
        finally:
            await queue.aclose()


NAP_FLOW = """
name: nap
base_url: "{{ env.SHOP_URL }}"
tests:
  nap:
    request: {url: /slow, params: {ms: 4000}}
  after_nap:
    depends_on: [nap]
    request: {url: /health}
"""


class Serve:
    """``baton serve`` in a process of its own (to SIGKILL), its log in a file."""

    def __init__(self, dsn: str, queue: str, key: str, folder: Path) -> None:
        folder.mkdir()
        env = {**os.environ, "BATON_DATABASE_URL": dsn, "BATON_SECRET_KEY": key}
        env |= {"BATON_QUEUE_URL": queue, "BATON_ALLOWED_TARGETS": LOOPBACK}
        env["BATON_HOME"] = str(folder / "home")
        env.pop("BATON_REDIS_URL", None)
        self.log = folder / "serve.log"
        self._log = self.log.open("w")
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "serve", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )

    async def ready(self) -> None:
        async with httpx.AsyncClient(base_url=self.url) as client:
            for _ in range(300):
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get("/health")).status_code == 200:
                        return
                assert self.process.poll() is None, self.log.read_text()
                await asyncio.sleep(0.1)
        pytest.fail(f"baton serve did not answer: {self.log.read_text()}")

    def client(self, key: str) -> httpx.AsyncClient:  # as LiveService's, for Org
        return httpx.AsyncClient(
            base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        self._log.close()
        sys.stderr.write(self.log.read_text())  # pytest shows it for a failed test


async def test_either_instance_serves_any_run_and_outlives_the_one_that_queued_it(
    shop_url: str, private_redis: RedisServer, tmp_path: Path
) -> None:
    """Two ``baton serve`` behind one load balancer: A (a process, to SIGKILL) queues two
    runs and is killed, one in flight on the worker, one waiting behind it. B answers for
    both: it cancels the waiting one at once, streams the other to its end, and records
    both ends."""
    key = _key()
    async with private_database() as dsn:
        a = Serve(dsn, private_redis.url, key, tmp_path / "a")
        started = Worker(dsn, private_redis.url, key, tmp_path, "-c", "1")
        try:
            await a.ready()
            with _service(dsn, private_redis.url, key) as b:
                await _two_instances(a, b, dsn, private_redis.url, shop_url)
        finally:
            started.stop()
            a.stop()


async def _two_instances(a: Serve, b: LiveService, dsn: str, queue_url: str, shop: str) -> None:
    api_key = await create_key(
        b.settings, organization="acme", scopes=["read", "run", "admin"], name="ci"
    )
    on_a, on_b = Org(a, api_key), Org(b, api_key)  # type: ignore[arg-type]
    try:
        ids = await _project(on_a, "two-instances", shop)
        suite = await _upload(on_a, ids["project"], NAP_FLOW)
        body = {"suite_id": suite, "environment_id": ids["environment"]}
        flying = (await on_a.ok("POST", "/api/v1/runs", 202, json=body))["id"]

        async def sent() -> bool:
            page = await on_b.ok("GET", f"/api/v1/runs/{flying}/events")
            return any(e["type"] == "RequestSent" for e in page["items"])

        await _until(sent)
        waiting = (await on_a.ok("POST", "/api/v1/runs", 202, json=body))["id"]
        streamed = asyncio.create_task(_sse(on_b, flying))
        a.process.kill()
        a.process.wait()
        assert (await on_b.ok("GET", f"/api/v1/runs/{waiting}"))["status"] == "queued"
        cancelled = await on_b.ok("POST", f"/api/v1/runs/{waiting}/cancel", 202)
        assert (cancelled["status"], cancelled["message"]) == (
            "cancelled",
            "cancelled through the API",
        )
        # at once: not when the worker, busy with the other run, takes its job
        assert (await on_b.ok("GET", f"/api/v1/runs/{flying}"))["status"] == "running"
        ended = await on_b.finished(flying, within=30)
        assert (ended["status"], ended["passed_tests"]) == ("passed", 2)
        sse = await asyncio.wait_for(streamed, 30)
        assert "event: RunCompleted" in sse  # the stream ended with the run

        async def recorded() -> bool:
            states = [await _state(dsn, run) for run in (flying, waiting)]
            return states == [("finished", ""), ("cancelled", "")]

        await _until(recorded)
        # the worker finds the cancelled run ended when it takes its job: only acknowledges it
        queue = Redis.from_url(queue_url)
        try:

            async def acknowledged() -> bool:
                groups = await queue.xinfo_groups(STREAM)
                return bool(groups[0]["entries-read"] == 2 and groups[0]["pending"] == 0)

            await _until(acknowledged)
        finally:
            await queue.aclose()
        stored = await _stored(dsn, waiting)
        assert [e.split(" ", 1)[0] for e in stored] == ["RunStarted", "RunCancelled"]
    finally:
        for org in (on_a, on_b):
            await org.http.aclose()


async def _sse(org: Org, run_id: str) -> str:
    async with org.http.stream("GET", f"/api/v1/runs/{run_id}/stream") as response:
        assert response.status_code == 200
        return "\n".join([line async for line in response.aiter_lines()])
