"""Runs whose process is killed (SIGKILL, no goodbye) are ended as interrupted by the next
process that starts on the database, and only those: a live instance's runs go on."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from events.owners import Owner
from events.postgres import PostgresEventStore
from events.settings import Settings
from events.store import NewEvent, StreamAppend
from events.types import RunStarted, new_id, run_stream
from tests.conftest import Org, private_database
from tests.test_service_load import Served, _Live, _org, start_service, stop_service

SLOW = """
name: slow chain
base_url: "{{ env.SHOP_URL }}"
variables: {nap_ms: 6000}
tests:
  nap:
    request: {url: /slow, params: {ms: "{{ nap_ms }}"}, timeout: 30s}
  after:
    depends_on: [nap]
    request: {url: /health}
"""
QUICK = {"BATON_OWNER_TIMEOUT": "1", "BATON_STORE_WAIT": "0.5"}
"""An owner quiet for 1 s is gone (the default is 90 s); it must outlast the store wait."""


async def _events(dsn: str, stream: str) -> list[tuple[str, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT type, data->>'reason' FROM events WHERE stream = $1 ORDER BY version", stream
        )
    finally:
        await conn.close()
    return [(row[0], row[1]) for row in rows]


async def _wait_for(dsn: str, stream: str, event_type: str, within: float = 20) -> None:
    deadline = time.monotonic() + within
    while event_type not in [t for t, _ in await _events(dsn, stream)]:
        assert time.monotonic() < deadline, f"{stream}: no {event_type}"
        await asyncio.sleep(0.05)


def _spawn(command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def _first_request(dsn: str, within: float = 30) -> str:
    """The stream of the first run that has sent a request (the log may not exist yet)."""
    deadline = time.monotonic() + within
    while True:
        conn = await asyncpg.connect(dsn)
        try:
            if await conn.fetchval("SELECT to_regclass('events') IS NOT NULL"):
                stream: str | None = await conn.fetchval(
                    "SELECT stream FROM events WHERE type = 'RequestSent' LIMIT 1"
                )
                if stream is not None:
                    return stream
        finally:
            await conn.close()
        assert time.monotonic() < deadline, "no run sent a request"
        await asyncio.sleep(0.05)


@pytest.fixture
async def settings(tmp_path: Path) -> AsyncIterator[Settings]:
    async with private_database() as dsn:
        yield Settings(
            database_url=dsn,
            home=tmp_path / "home",
            secret_key=base64.urlsafe_b64encode(os.urandom(32)).decode(),
        )


async def _slow_suite(served: Served, shop_url: str) -> tuple[Org, str, str]:
    org, _, environment = await _org(served, shop_url)
    project = (await org.ok("GET", "/api/v1/projects"))["items"][0]["id"]
    admin = await _admin(served)
    async with httpx.AsyncClient(
        base_url=served.url, headers={"Authorization": f"Bearer {admin}"}, timeout=30
    ) as http:
        suite = await http.post("/api/v1/suites", json={"project_id": project, "content": SLOW})
        assert suite.status_code == 201, suite.text
    return org, str(suite.json()["id"]), environment


async def _admin(served: Served) -> str:
    from context_service.keys import create_key

    return await create_key(
        served.settings, organization="load", scopes=["admin"], name="admin again"
    )


@pytest.mark.timeout(120)
async def test_a_killed_service_s_runs_end_as_interrupted_and_a_live_one_s_go_on(
    settings: Settings, shop_url: str, tmp_path: Path
) -> None:
    first = start_service(settings, tmp_path / "first.log", **QUICK)
    second = start_service(settings, tmp_path / "second.log", **QUICK)
    try:
        org, suite, environment = await _slow_suite(first, shop_url)
        on_second = Org(_Live(second.url), org.key)
        killed = await org.start(suite, environment)
        alive = await on_second.start(suite, environment)
        assert settings.database_url is not None
        for run in (killed, alive):
            await _wait_for(settings.database_url, f"run-{run}", "RequestSent")
        first.process.kill()  # SIGKILL: no RunCancelled, no goodbye
        first.process.wait()
        # the second instance sweeps as it beats; a restarted first one sweeps at start
        restarted = start_service(settings, tmp_path / "first.log", **QUICK)
        try:
            await _wait_for(settings.database_url, f"run-{killed}", "RunCancelled")
            events = await _events(settings.database_url, f"run-{killed}")
            assert events[-1] == ("RunCancelled", "interrupted")
            shown = await on_second.finished(killed, within=10)
            assert (shown["status"], shown["message"]) == ("cancelled", "interrupted")
            # the live instance's run was not touched: it finishes and passes
            finished = await on_second.finished(alive, within=30)
            assert finished["status"] == "passed"
            assert "RunCancelled" not in [
                t for t, _ in await _events(settings.database_url, f"run-{alive}")
            ]
        finally:
            stop_service(restarted)
    finally:
        await org.http.aclose()
        await on_second.http.aclose()
        stop_service(first)
        stop_service(second)


@pytest.mark.timeout(120)
async def test_a_killed_baton_run_s_runs_are_ended_by_the_next_baton_run(
    settings: Settings, shop_url: str, tmp_path: Path
) -> None:
    flow = tmp_path / "slow.yaml"
    flow.write_text(SLOW)
    assert settings.database_url is not None
    env = {
        **os.environ,
        "SHOP_URL": shop_url,
        "BATON_DATABASE_URL": settings.database_url,
        "BATON_HOME": str(settings.home),
        **QUICK,
    }
    command = [sys.executable, "-c", "from orchestrator.cli import main; main()", "run"]
    killed = _spawn([*command, str(flow)], env)
    try:
        stream = await _first_request(settings.database_url)
    finally:
        killed.kill()
        killed.wait()
    assert [t for t, _ in await _events(settings.database_url, stream)][-1] == "RequestSent"
    await asyncio.sleep(1.5)  # its owner has been quiet for longer than BATON_OWNER_TIMEOUT
    again = await asyncio.to_thread(
        subprocess.run,
        [*command, str(flow), "--var", "nap_ms=10"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert (await _events(settings.database_url, stream))[-1] == ("RunCancelled", "interrupted")
    conn = await asyncpg.connect(settings.database_url)
    try:
        statuses = dict(await conn.fetch("SELECT stream, status FROM test_runs"))
        claims = await conn.fetchval("SELECT count(*) FROM baton_run_owners")
    finally:
        await conn.close()
    assert statuses[stream] == "cancelled" and sorted(statuses.values()) == ["cancelled", "passed"]
    assert claims == 0


async def test_a_run_adopted_from_a_silent_owner_is_not_swept_and_its_other_runs_are(
    fresh_store: PostgresEventStore,
) -> None:
    """A worker killed mid-job goes silent; the worker that claims its job adopts the run,
    so the sweep ends only the runs nobody took over."""
    gone = Owner(fresh_store, timeout=0.5)
    await gone.start()
    taken, left = (str(new_id()) for _ in range(2))
    await gone.append(
        [
            StreamAppend(
                run_stream(run),
                [NewEvent(RunStarted(run_id=run, suite="s", suite_digest="", plan=[]))],
                0,
            )
            for run in (taken, left)
        ]
    )
    await gone.stop()  # silent from now on, as if killed: its row stays
    heir = Owner(fresh_store, timeout=0.5)
    await heir.start()
    try:
        assert await heir.adopt(run_stream(taken))
        await asyncio.sleep(0.8)  # the heir's beats sweep meanwhile
        await heir.sweep()
        last = await fresh_store.last_events([run_stream(taken), run_stream(left)])
        assert type(last[run_stream(taken)].event).__name__ == "RunStarted"
        assert type(last[run_stream(left)].event).__name__ == "RunCancelled"
        assert not await heir.adopt(run_stream(left))  # ended: nobody's to adopt
    finally:
        await heir.aclose()
