"""PostgreSQL restarted or down in the middle of a run (a private server the test may stop):
the runs pause while the store is unreachable and resume when it is back, the log and the
read tables lose and double nothing, and beyond BATON_STORE_WAIT the run stops with exit 3
and one line, having shown nothing as passed that is not stored."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
from aiohttp import web

from events.projections import project
from examples.shop.server import create_app
from tests.conftest import SHOP


def _postgres_bin() -> Path:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    assert candidates, "PostgreSQL server binaries (pg_ctl, initdb) are needed for this test"
    return candidates[-1].parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PrivateServer:
    """A PostgreSQL server of the test's own, which it may restart."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="baton-pg-"))
        self.data = self.base / "data"
        self.port = _free_port()
        self.bin = _postgres_bin()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        # as root, the server must run as another user
        self.prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.prefix:
            shutil.chown(self.base, "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync")

    def _run(self, tool: str, *args: str, check: bool = True) -> None:
        subprocess.run(
            [*self.prefix, str(self.bin / tool), *args], check=check, capture_output=True
        )

    def pg_ctl(self, action: str, *args: str) -> None:
        options = f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl", action, "-D", str(self.data), "-l", str(self.base / "log"), "-w",
            "-o", options, *args,
        )  # fmt: skip


@pytest.fixture
def private_server() -> Iterator[PrivateServer]:
    server = PrivateServer()
    server.pg_ctl("start")
    yield server
    try:
        server._run("pg_ctl", "stop", "-D", str(server.data), "-m", "immediate", check=False)
    finally:
        shutil.rmtree(server.base, ignore_errors=True)


async def _count_events(dsn: str, of_type: str | None = None) -> int:
    try:
        conn = await asyncpg.connect(dsn)
    except (OSError, asyncpg.PostgresError):
        return 0
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM events WHERE $1::text IS NULL OR type = $1", of_type
        )
        return count
    except asyncpg.UndefinedTableError:
        return 0
    finally:
        await conn.close()


SHOP_BATCH_TESTS = msgspec.yaml.decode((SHOP / "batch.yaml").read_bytes())["tests"]
"""The tests of a run of batch.yaml."""


class CountingShop:
    """The demo shop in a thread of its own, counting the requests it receives."""

    def __init__(self) -> None:
        self.requests = 0
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)

        @web.middleware
        async def count(request: web.Request, handler: web.Handler) -> web.StreamResponse:
            self.requests += 1
            return await handler(request)

        app = create_app()
        app.middlewares.insert(0, count)
        runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        self._runner = runner
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    def __enter__(self) -> CountingShop:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *_: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture
def counting_shop() -> Iterator[CountingShop]:
    with CountingShop() as shop:
        yield shop


def _batch(
    tmp_path: Path, server: PrivateServer, shop: str, rows: int, *, quiet: bool = True, **env: str
) -> Any:
    data = tmp_path / "rows.csv"
    data.write_text(
        "username,password\n" + "".join(f"user{n:03},pw-user{n:03}\n" for n in range(1, rows + 1))
    )
    return subprocess.Popen(
        [
            sys.executable, "-c", "from orchestrator.cli import main; main()",
            "run", str(SHOP / "batch.yaml"), "--data", str(data), "-c", "16",
            *(["-q"] if quiet else []), "--json", str(tmp_path / "report.json"),
        ],
        env={
            **os.environ,
            "SHOP_URL": shop,
            "BATON_DATABASE_URL": server.dsn,
            "BATON_HOME": str(tmp_path / "home"),
            **env,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def _wait_for_events(
    server: PrivateServer, process: Any, count: int, of_type: str | None = None
) -> None:
    while asyncio.run(_count_events(server.dsn, of_type)) < count:
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)


async def _stored(dsn: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch("SELECT event_id, stream, version, type, data FROM events")
    finally:
        await conn.close()


@pytest.mark.timeout(150)
@pytest.mark.parametrize("down_for", [5, 30])
def test_runs_pause_while_postgres_is_down_and_lose_nothing(
    down_for: int, private_server: PrivateServer, counting_shop: CountingShop, tmp_path: Path
) -> None:
    """Stopped mid-batch for 5 s and for 30 s (within the default BATON_STORE_WAIT of 60 s):
    no request goes out while the store is down, every request the shop saw is in the log,
    every run passes and the report is written."""
    process = _batch(tmp_path, private_server, counting_shop.url, rows=160)
    try:
        _wait_for_events(private_server, process, 500)
        private_server.pg_ctl("stop", "-m", "immediate")
        # requests in flight when it stopped finish (on a loaded machine one second was
        # seen to be too short for the last of them)
        time.sleep(2)
        paused_at = counting_shop.requests
        time.sleep(down_for - 2.5)
        sent_while_down = counting_shop.requests - paused_at
        assert process.poll() is None, "the run ended while the store was down"
        private_server.pg_ctl("start")
        out, err = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert (process.returncode, err) == (0, ""), out
    assert sent_while_down == 0
    events = asyncio.run(_stored(private_server.dsn))
    assert len({row["event_id"] for row in events}) == len(events)
    sent = [row for row in events if row["type"] == "RequestSent"]
    # every request the shop saw is in the log, once (order_shipped polls: several a run)
    assert len(sent) == counting_shop.requests >= 160 * len(SHOP_BATCH_TESTS)
    types = Counter(row["type"] for row in events)
    assert types["RunCompleted"] == 160 and types["TestPassed"] == 160 * len(SHOP_BATCH_TESTS)
    report = msgspec.json.decode((tmp_path / "report.json").read_bytes())
    assert [run["status"] for run in report["runs"]] == ["passed"] * 160


@pytest.mark.timeout(120)
def test_beyond_the_store_wait_the_run_stops_with_exit_3_and_shows_only_what_is_stored(
    private_server: PrivateServer, counting_shop: CountingShop, tmp_path: Path
) -> None:
    """BATON_STORE_WAIT=3 and the server down for longer: exit 3 with one line, no report,
    no run printed as passed whose completion is not stored; the next baton run ends the
    runs left open as interrupted once their owner has stopped beating."""
    # not quiet: a line for every run that passed
    process = _batch(
        tmp_path, private_server, counting_shop.url, rows=160, quiet=False, BATON_STORE_WAIT="3"
    )
    try:
        _wait_for_events(private_server, process, 10, "RunCompleted")
        private_server.pg_ctl("stop", "-m", "immediate")
        stopped = time.monotonic()
        out, err = process.communicate(timeout=60)
        took = time.monotonic() - stopped
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    private_server.pg_ctl("start")
    errors = [line for line in err.splitlines() if line.strip()]
    assert process.returncode == 3 and len(errors) == 1, (out, err)
    assert errors[0].startswith("error: event store failed during the run: the event store was")
    assert "unreachable for 3 s (BATON_STORE_WAIT)" in errors[0]
    assert 3 <= took < 20, took
    assert not (tmp_path / "report.json").exists()

    events = asyncio.run(_stored(private_server.dsn))
    completed = {
        msgspec.json.decode(row["data"])["run_id"]
        for row in events
        if row["type"] == "RunStarted"
        and any(e["stream"] == row["stream"] and e["type"] == "RunCompleted" for e in events)
    }
    printed = [line for line in out.splitlines() if line.startswith("✓ ")]
    rows = {int(line.split("[row ")[1].split("]")[0]) for line in printed}
    stored_rows = {
        msgspec.json.decode(row["data"])["row"]
        for row in events
        if row["type"] == "RunStarted" and msgspec.json.decode(row["data"])["run_id"] in completed
    }
    assert rows and rows <= stored_rows, (sorted(rows - stored_rows), out)
    open_runs = {row["stream"] for row in events if row["type"] == "RunStarted"} - {
        row["stream"] for row in events if row["type"] in ("RunCompleted", "RunCancelled")
    }
    assert open_runs, "the outage came too late to leave a run open: make the batch longer"

    # the next baton run (any flow) ends them, once their owner has been quiet 1 s
    time.sleep(1.5)
    done = subprocess.run(
        [sys.executable, "-c", "from orchestrator.cli import main; main()", "run",
         str(SHOP / "batch.yaml"), "-q"],
        env={**os.environ, "SHOP_URL": counting_shop.url, "BATON_DATABASE_URL": private_server.dsn,
             "BATON_HOME": str(tmp_path / "home"), "BATON_OWNER_TIMEOUT": "1",
             "BATON_STORE_WAIT": "0.5"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    events = asyncio.run(_stored(private_server.dsn))
    ends = {
        row["stream"]: msgspec.json.decode(row["data"]).get("reason")
        for row in events
        if row["type"] == "RunCancelled"
    }
    assert open_runs <= set(ends) and {ends[stream] for stream in open_runs} == {"interrupted"}


def test_postgres_restarted_mid_run_loses_and_doubles_nothing(
    private_server: PrivateServer, shop_url: str, tmp_path: Path
) -> None:
    """A restart: the run rides it out (the writer re-sends with the same event ids)."""
    rows = tmp_path / "rows.csv"
    rows.write_text(
        "username,password\n" + "".join(f"user{n:03},pw-user{n:03}\n" for n in range(1, 161))
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from orchestrator.cli import main; main()",
            "run",
            str(SHOP / "batch.yaml"),
            "--data",
            str(rows),
            "-c",
            "16",
            "-q",
        ],
        env={
            **os.environ,
            "SHOP_URL": shop_url,
            "BATON_DATABASE_URL": private_server.dsn,
            "BATON_HOME": str(tmp_path / "home"),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while asyncio.run(_count_events(private_server.dsn)) < 500:
            assert process.poll() is None, process.communicate()
        private_server.pg_ctl("restart", "-m", "immediate")
        assert process.poll() is None, "the run ended before the restart: make it longer"
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    # finished, and said nothing on stderr: no driver traceback
    assert (process.returncode, err) == (0, ""), out

    async def check() -> None:
        conn = await asyncpg.connect(private_server.dsn)
        try:
            events = await conn.fetch("SELECT event_id, stream, version, type FROM events")
        finally:
            await conn.close()
        assert len({row["event_id"] for row in events}) == len(events)
        by_stream: dict[str, list[asyncpg.Record]] = {}
        for row in events:
            by_stream.setdefault(row["stream"], []).append(row)
        for stream, rows in by_stream.items():
            versions = sorted(row["version"] for row in rows)
            assert versions == list(range(1, len(rows) + 1)), stream
            types = Counter(row["type"] for row in rows)
            head = min(rows, key=lambda row: row["version"])
            if stream.startswith("run-"):
                assert head["type"] == "RunStarted" and types["RunStarted"] == 1, stream
                assert types["RunCompleted"] <= 1
                if process.returncode == 0:
                    assert types["RunCompleted"] == 1 and types["TestPassed"] == 5, stream
        if process.returncode == 0:
            assert sum(stream.startswith("run-") for stream in by_stream) == 160
        await project(private_server.dsn)
        conn = await asyncpg.connect(private_server.dsn)
        try:
            runs = await conn.fetch("SELECT status, count(*) FROM test_runs GROUP BY status")
        finally:
            await conn.close()
        statuses = {row[0]: row[1] for row in runs}
        if process.returncode == 0:
            assert statuses == {"passed": 160}

    asyncio.run(check())


@pytest.mark.timeout(120)
async def test_a_service_run_the_store_drops_beyond_its_wait_ends_as_interrupted(
    private_server: PrivateServer, shop_url: str, tmp_path: Path
) -> None:
    """baton serve with BATON_STORE_WAIT=2: PostgreSQL down for 6 s under a run. The run's
    writer gives up; once the store is back, the service ends that run as interrupted
    (its own heartbeat sweeps it), and the next run passes."""
    import base64

    from context_service.keys import create_key
    from events.settings import Settings
    from tests.conftest import Org
    from tests.test_owners import _events, _slow_suite, _wait_for
    from tests.test_service_load import _Live, start_service, stop_service

    settings = Settings(
        database_url=private_server.dsn,
        home=tmp_path / "home",
        secret_key=base64.urlsafe_b64encode(os.urandom(32)).decode(),
    )
    served = start_service(
        settings, tmp_path / "service.log", BATON_STORE_WAIT="2", BATON_OWNER_TIMEOUT="3"
    )
    org: Org | None = None
    try:
        runner_only, suite, environment = await _slow_suite(served, shop_url)
        await runner_only.http.aclose()
        # the naps are run variables, which only an admin key may set (issue: exfiltration)
        key = await create_key(
            settings, organization="load", scopes=["read", "run", "admin"], name="naps"
        )
        org = Org(_Live(served.url), key)
        run = await org.start(suite, environment, nap_ms="3000")
        await _wait_for(private_server.dsn, f"run-{run}", "RequestSent")
        private_server.pg_ctl("stop", "-m", "immediate")
        await asyncio.sleep(6)
        private_server.pg_ctl("start")
        await _wait_for(private_server.dsn, f"run-{run}", "RunCancelled", within=30)
        events = await _events(private_server.dsn, f"run-{run}")
        assert events[-1] == ("RunCancelled", "interrupted")
        assert "TestPassed" not in [t for t, _ in events]
        again = await org.start(suite, environment, nap_ms="10")
        assert (await org.finished(again, within=30))["status"] == "passed"
    finally:
        if org is not None:
            await org.http.aclose()
        stop_service(served)


@pytest.mark.timeout(60)
async def test_a_subscription_beats_through_a_stopped_server_and_resumes_where_it_was(
    private_server: PrivateServer,
) -> None:
    """PostgreSQL stopped for 2 s under a subscription (idle 0.3 s): it yields heartbeats
    meanwhile and raises nothing; once the server is back it yields what was appended,
    after the last event it yielded, without repeating it."""
    from contextlib import aclosing

    from events.postgres import PostgresEventStore
    from events.store import NewEvent, StreamAppend
    from events.types import TestStarted
    from tests.test_store_contract import append_once_it_answers

    store = await PostgresEventStore.connect(private_server.dsn)
    try:
        [[first]] = await store.append([StreamAppend("run-before", [NewEvent(TestStarted("a"))])])
        async with aclosing(store.subscribe(0, idle=0.3)) as pages:
            assert [r.position for r in await anext(pages)] == [first]
            await asyncio.to_thread(private_server.pg_ctl, "stop", "-m", "immediate")
            loop = asyncio.get_running_loop()
            down_until = loop.time() + 2
            heartbeats = 0
            while loop.time() < down_until:
                assert await asyncio.wait_for(anext(pages), 5) == []
                heartbeats += 1
            assert heartbeats >= 4
            await asyncio.to_thread(private_server.pg_ctl, "start")
            appended = StreamAppend("run-after", [NewEvent(TestStarted("b"))])
            [later] = await append_once_it_answers(store, appended)
            seen = []
            while not seen:
                seen = await asyncio.wait_for(anext(pages), 5)
            assert [r.position for r in seen] == [later]
    finally:
        await store.aclose()
