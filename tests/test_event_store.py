"""The PostgreSQL event store's own behaviour, on the server and on the embedded default:
the schema, an unreachable or unstartable server, the embedded server's lifecycle, settings.
The contract every backend keeps is test_store_contract.py."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import asyncpg
import pytest

from events import Settings, mask_dsn, open_store
from events.postgres import PostgresEventStore, apply_schema, schema_sql
from events.settings import SettingsError
from events.store import NewEvent, StoreUnavailable, StreamAppend
from events.types import TestStarted

REPO = Path(__file__).resolve().parent.parent


def fresh_stream(kind: str = "run") -> str:
    return f"{kind}-{uuid.uuid4()}"


def started(test: str = "login") -> NewEvent:
    return NewEvent(TestStarted(test=test))


async def test_schema_applies_twice_without_change(
    store: PostgresEventStore, store_dsn: str
) -> None:
    stream = fresh_stream()
    await store.append([StreamAppend(stream, [started()])])
    conn = await asyncpg.connect(store_dsn)
    try:
        before = await conn.fetch("SELECT step, name, applied_at FROM baton_schema_version")
        await apply_schema(conn)
        await conn.execute(schema_sql())  # as psql -f would: no lock, no transaction
        after = await conn.fetch("SELECT step, name, applied_at FROM baton_schema_version")
    finally:
        await conn.close()
    assert [tuple(r) for r in after] == [tuple(r) for r in before]
    assert (after[0]["step"], after[0]["name"]) == (1, "event store")
    assert "-- step 1: event store" in schema_sql()
    assert await store.stream_version(stream) == 1
    # processes starting together all apply the schema at once, without tripping over it
    stores = await asyncio.gather(*(PostgresEventStore.connect(store_dsn) for _ in range(4)))
    for opened in stores:
        await opened.aclose()


async def test_unreachable_server_is_store_unavailable_without_password() -> None:
    dsn = "postgresql://baton:s3cret-pw@127.0.0.1:1/baton"
    for attempt in (
        PostgresEventStore.connect(dsn),
        open_store(Settings(database_url=dsn)),
    ):
        with pytest.raises(StoreUnavailable) as caught:
            await attempt
        message = str(caught.value)
        assert "s3cret-pw" not in message
        assert "postgresql://baton:***@127.0.0.1:1/baton" in message


async def test_open_store_without_database_url_uses_the_embedded_server(
    embedded_home: Path, embedded_dsn: str
) -> None:
    stream = fresh_stream()
    opened = await open_store(Settings(home=embedded_home))  # joins the running server
    await opened.append([StreamAppend(stream, [started()])])
    await opened.aclose()
    other = await PostgresEventStore.connect(embedded_dsn)
    assert await other.stream_version(stream) == 1
    await other.aclose()
    assert opened.dsn == embedded_dsn


def test_embedded_server_is_quiet_and_stops_with_the_last_process(
    fresh_baton_home: Path,
) -> None:
    script = textwrap.dedent(
        """
        import asyncio, os, signal, sys
        from events import Settings, StreamAppend, NewEvent, open_store
        from events.types import TestStarted

        async def main():
            store = await open_store(Settings.from_env())
            await store.append([StreamAppend("run-1", [NewEvent(TestStarted(test="t"))])])
            print(await store.stream_version("run-1"), flush=True)
            if sys.argv[1:] == ["crash"]:
                os.kill(os.getpid(), signal.SIGKILL)
            await store.aclose()

        asyncio.run(main())
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATON_", "XDG_"))}
    env |= {"BATON_HOME": str(fresh_baton_home), "PYTHONPATH": str(REPO)}
    running = fresh_baton_home / "pgdata" / "postmaster.pid"
    # initdb on first use; a crash that skips the exit handlers; a start of the existing data
    for version, how in enumerate(["first", "crash", "again"], start=1):
        done = subprocess.run(
            [sys.executable, "-c", script, how], env=env, capture_output=True, text=True, timeout=60
        )
        assert (done.returncode, done.stderr) == (-9 if how == "crash" else 0, "")
        assert done.stdout.split() == [str(version)]
        # the server stops with the last process using it, even after an earlier crash
        assert running.exists() == (how == "crash")


async def test_embedded_start_failure_is_store_unavailable(fresh_baton_home: Path) -> None:
    from events.embedded import start_embedded

    (fresh_baton_home / "pgdata").mkdir()
    (fresh_baton_home / "pgdata" / "not-a-cluster.txt").write_text("left by someone else")
    with pytest.raises(StoreUnavailable) as caught:
        await start_embedded(fresh_baton_home)
    message = str(caught.value)
    assert "could not start the embedded PostgreSQL" in message
    assert "not empty" in message
    assert "BATON_DATABASE_URL" in message


def test_settings_from_env() -> None:
    env = {"BATON_DATABASE_URL": "postgresql://u:pw@db:5432/baton", "BATON_REDIS_URL": ""}
    env |= {"BATON_HOME": "state", "BATON_SECRET_KEY": "k3y"}
    settings = Settings.from_env(env, cwd=Path("/srv/app"))
    assert settings.database_url == "postgresql://u:pw@db:5432/baton"
    assert settings.redis_url is None
    assert settings.home == Path("/srv/app/state")
    assert settings.pgdata == Path("/srv/app/state/pgdata")
    assert "pw" not in repr(settings) and "k3y" not in repr(settings)
    assert Settings.from_env({}, cwd=Path("/w")).home == Path("/w/.baton")
    with pytest.raises(AttributeError):
        settings.home = Path("/elsewhere")  # type: ignore[misc]


def test_the_store_wait_and_the_owner_timeout_are_seconds_the_owner_s_the_longer() -> None:
    defaults = Settings.from_env({})
    assert (defaults.store_wait, defaults.owner_timeout) == (60.0, 90.0)
    chosen = Settings.from_env({"BATON_STORE_WAIT": "5", "BATON_OWNER_TIMEOUT": "7.5"})
    assert (chosen.store_wait, chosen.owner_timeout) == (5.0, 7.5)
    for value in ("soon", "0", "-3", "inf"):
        with pytest.raises(SettingsError, match=r"BATON_STORE_WAIT=.*a number of seconds"):
            Settings.from_env({"BATON_STORE_WAIT": value})
    with pytest.raises(SettingsError, match=r"BATON_OWNER_TIMEOUT \(60 s\) must be longer"):
        Settings.from_env({"BATON_OWNER_TIMEOUT": "60"})


def test_a_bad_setting_is_one_line_and_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.cli import baton

    monkeypatch.setenv("BATON_STORE_WAIT", "a minute")
    code, _, err = baton("runs")
    assert code == 2
    assert (
        err == "error: BATON_STORE_WAIT='a minute': expected a number of seconds above 0, like 60\n"
    )


@pytest.mark.parametrize(
    ("dsn", "masked"),
    [
        ("postgresql://u:pw@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("redis://:pw@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("pg://u@h/d?password=pw&ssl=1", "pg://u@h/d?password=***&ssl=1"),
        ("host=h user=u password=pw dbname=d", "host=h user=u password=*** dbname=d"),
    ],
)
def test_mask_dsn_hides_the_password(dsn: str, masked: str) -> None:
    assert mask_dsn(dsn) == masked
