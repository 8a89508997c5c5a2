"""PostgreSQL restarted in the middle of a run (a private server the test may restart): the
run finishes, and the log and the read tables lose and double nothing."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from events.projections import project
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


async def _count_events(dsn: str) -> int:
    try:
        conn = await asyncpg.connect(dsn)
    except (OSError, asyncpg.PostgresError):
        return 0
    try:
        count: int = await conn.fetchval("SELECT count(*) FROM events")
        return count
    except asyncpg.UndefinedTableError:
        return 0
    finally:
        await conn.close()


@pytest.mark.parametrize("outage", ["restart", "down"])
def test_postgres_restarted_mid_run_loses_and_doubles_nothing(
    outage: str, private_server: PrivateServer, shop_url: str, tmp_path: Path
) -> None:
    """A restart: the run rides it out (the writer re-sends with the same event ids).
    A server that stays down longer than the writer retries: one clear line, exit 3."""
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
        if outage == "restart":
            private_server.pg_ctl("restart", "-m", "immediate")
            assert process.poll() is None, "the run ended before the restart: make it longer"
            out, err = process.communicate(timeout=60)
        else:
            private_server.pg_ctl("stop", "-m", "immediate")
            out, err = process.communicate(timeout=60)
            private_server.pg_ctl("start")
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    errors = [line for line in err.splitlines() if line.strip()]
    # finished (and said nothing on stderr: no driver traceback), or one clear line
    assert (process.returncode, errors) == (0, []) or (
        process.returncode == 3 and len(errors) == 1 and "event store" in errors[0]
    ), (process.returncode, out, err)
    if outage == "down":
        assert process.returncode == 3
        assert errors[0].startswith("error: event store failed during the run: PostgreSQL at")

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
