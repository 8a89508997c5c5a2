"""The read tables: kept from the log by the projector, exactly once, never skipping an
event, rebuildable to the same rows; and a PostgreSQL restart in the middle of a run."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest

from events.context import fold
from events.postgres import PostgresEventStore
from events.projections import READ_TABLES, Projector, project, rebuild
from events.secrets import Cipher, load_key
from events.store import NewEvent, StreamAppend
from events.types import (
    AssertionEvaluated,
    AuthTokenUpdated,
    Event,
    PlannedTest,
    RecordedEvent,
    RequestSent,
    ResponseReceived,
    RunCompleted,
    RunStarted,
    TestFailed,
    TestPassed,
    TestSkipped,
    TestStarted,
    Timings,
    VariableCaptured,
)
from tests.cli import baton

ROOT = Path(__file__).resolve().parent.parent
SHOP = ROOT / "examples" / "shop"
FAILING_FLOW = """\
name: shop failing
base_url: "{{ env.SHOP_URL }}"
tests:
  health:
    request: {url: /health}
    expect: {status: 500}
  after_health:
    depends_on: [health]
    request: {url: /health}
"""


def start_shop() -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, str(SHOP / "server.py"), "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith("shop API on "), line
    return process, line.split()[-1]


@pytest.fixture(scope="module")
def shop_url() -> Iterator[str]:
    process, url = start_shop()
    yield url
    process.terminate()
    process.wait(timeout=10)
    if process.stdout is not None:
        process.stdout.close()


async def _create_database() -> str:
    from tests.conftest import PG_ADMIN_DSN, _with_database

    name = f"baton_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return _with_database(PG_ADMIN_DSN, name)


async def _drop_database(dsn: str) -> None:
    from tests.conftest import PG_ADMIN_DSN

    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{dsn.rsplit("/", 1)[1]}" WITH (FORCE)')
    finally:
        await admin.close()


class Projected(msgspec.Struct):
    dsn: str
    home: Path
    reports: list[dict[str, Any]]


@pytest.fixture(scope="module")
def projected(shop_url: str) -> Iterator[Projected]:
    """A database after a user's day: every example flow, a batch, a flow run twice that
    fails, a run by tag; then the projector caught up."""
    dsn = asyncio.run(_create_database())
    work = Path(tempfile.mkdtemp(prefix="baton-projections-"))
    (work / "failing.yaml").write_text(FAILING_FLOW)
    (work / "rows.csv").write_text("username,password\nuser001,pw-user001\nuser002,pw-user002\n")
    (work / "secrets.yaml").write_text("SHOP_PASSWORD: secret-alice\n")
    commands = [
        [str(SHOP), "--secrets", str(work / "secrets.yaml")],
        [str(SHOP / "batch.yaml"), "--data", str(work / "rows.csv"), "--env", "local"],
        [str(work / "failing.yaml")],
        [str(work / "failing.yaml")],
        [str(SHOP / "checkout.yaml"), "--tag", "smoke", "--secrets", str(work / "secrets.yaml")],
    ]
    reports = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SHOP_URL", shop_url)
        patch.setenv("BATON_DATABASE_URL", dsn)
        patch.setenv("BATON_HOME", str(work / "home"))
        patch.delenv("BATON_SECRET_KEY", raising=False)
        for index, command in enumerate(commands):
            report = work / f"report-{index}.json"
            code, out, err = baton("run", *command, "--json", str(report), "-q")
            assert code in (0, 1), out + err
            reports.append(json.loads(report.read_text()))
    asyncio.run(project(dsn))
    yield Projected(dsn=dsn, home=work / "home", reports=reports)
    asyncio.run(_drop_database(dsn))
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
async def db(projected: Projected) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(projected.dsn)
    yield conn
    await conn.close()


async def snapshot(conn: asyncpg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Every read table's rows, in a stable order."""
    tables: dict[str, list[tuple[Any, ...]]] = {}
    for table in READ_TABLES:
        rows = [tuple(row) for row in await conn.fetch(f"SELECT * FROM {table}")]
        tables[table] = sorted(rows, key=repr)
    return tables


async def log(conn: asyncpg.Connection) -> list[tuple[str, str, dict[str, Any]]]:
    rows = await conn.fetch("SELECT stream, type, data FROM events ORDER BY position")
    return [(row[0], row[1], json.loads(row[2])) for row in rows]


# ---- what a user's runs leave in the read tables ---------------------------------------------


async def test_runs_and_results_are_what_the_reports_say(
    projected: Projected, db: asyncpg.Connection
) -> None:
    reported = [run for report in projected.reports for run in report["runs"]]
    assert len(reported) == 9
    for run in reported:
        row = await db.fetchrow(
            "SELECT r.status, r.passed_tests, r.failed_tests, r.skipped_tests, r.total_tests,"
            " r.batch_row, e.name AS environment, s.name AS suite, p.name AS project"
            " FROM test_runs r JOIN environments e ON e.id = r.environment_id"
            " JOIN test_suites s ON s.id = r.suite_id JOIN projects p ON p.id = r.project_id"
            " WHERE r.id = $1",
            uuid.UUID(run["run_id"]),
        )
        assert row is not None, run["suite"]
        statuses = Counter(test["status"] for test in run["tests"])
        assert (row["status"], row["suite"], row["project"]) == (
            run["status"],
            run["suite"],
            "default",
        )
        assert (row["passed_tests"], row["failed_tests"], row["skipped_tests"]) == (
            statuses["passed"],
            statuses["failed"],
            statuses["skipped"],
        )
        assert row["total_tests"] == len(run["tests"])
        assert row["batch_row"] == run.get("row")
        assert row["environment"] == ("local" if run.get("row") else "default")
        results = await db.fetch(
            "SELECT test_name, status, attempts, category FROM test_results WHERE run_id = $1",
            uuid.UUID(run["run_id"]),
        )
        assert {r["test_name"]: (r["status"], r["attempts"], r["category"]) for r in results} == {
            test["name"]: (test["status"], test.get("attempts", 0), test.get("category"))
            for test in run["tests"]
        }


async def test_context_rows_are_the_fold_of_each_runs_stream(
    projected: Projected, db: asyncpg.Connection
) -> None:
    store = await PostgresEventStore.connect(projected.dsn)
    cipher = Cipher(load_key(None, projected.home))
    try:
        rows = await db.fetch(
            "SELECT r.stream, c.* FROM test_execution_context c JOIN test_runs r ON r.id = c.run_id"
        )
        assert len(rows) == 9
        for row in rows:
            context = fold(await store.read_stream(row["stream"]))
            assert (row["status"], row["version"], row["position"]) == (
                context.status,
                context.version,
                context.position,
            )
            assert json.loads(row["shared_auth_tokens"]) == context.auth
            assert json.loads(row["shared_variables"]) == context.variables
            assert json.loads(row["captured_data"]) == context.captured
            assert json.loads(row["statuses"]) == context.statuses
            assert list(row["test_order"]) == context.order
            # tokens are stored sealed, and open with the run's key
            for sealed in context.auth.values():
                assert len(cipher.decrypt(sealed)) >= 16
    finally:
        await store.aclose()


async def test_details_hold_every_exchange_and_never_a_secret(db: asyncpg.Connection) -> None:
    kinds = {
        "RequestSent": "request",
        "ResponseReceived": "response",
        "AssertionEvaluated": "assertion",
        "VariableCaptured": "capture",
        "AuthTokenUpdated": "capture",
    }
    logged = Counter(kinds[kind] for _, kind, _ in await log(db) if kind in kinds)
    stored = await db.fetch("SELECT kind, count(*) FROM test_result_details GROUP BY kind")
    assert {row[0]: row[1] for row in stored} == dict(logged)
    captures = [
        json.loads(row[0])
        for row in await db.fetch("SELECT data FROM test_result_details WHERE kind = 'capture'")
    ]
    secret = [c for c in captures if c.get("secret") or c["type"] == "AuthTokenUpdated"]
    assert {c["name"] for c in secret} >= {"auth.token", "session_id"}
    assert {c["value"] for c in secret} == {"***"}
    dump = " ".join(str(row) for rows in (await snapshot(db)).values() for row in rows)
    assert "secret-alice" not in dump


async def test_failures_are_categorised_grouped_and_measured(db: asyncpg.Connection) -> None:
    failures = await db.fetch(
        "SELECT c.name, f.category, f.fingerprint, f.message FROM failure_analysis f"
        " JOIN test_cases c ON c.id = f.test_case_id ORDER BY c.name"
    )
    assert [(f["name"], f["category"]) for f in failures] == [
        ("after_health", "dependency_skipped"),
        ("after_health", "dependency_skipped"),
        ("health", "assertion"),
        ("health", "assertion"),
    ]
    # the same failure in two runs has one fingerprint
    assert failures[2]["fingerprint"] == failures[3]["fingerprint"] != failures[0]["fingerprint"]
    history = await db.fetch(
        "SELECT c.name, h.status, h.category FROM test_run_history h"
        " JOIN test_cases c ON c.id = h.test_case_id JOIN test_suites s ON s.id = c.suite_id"
        " WHERE s.name = 'shop failing' ORDER BY c.name"
    )
    assert [tuple(h) for h in history] == [
        ("after_health", "skipped", "dependency_skipped"),
        ("after_health", "skipped", "dependency_skipped"),
        ("health", "failed", "assertion"),
        ("health", "failed", "assertion"),
    ]
    metrics = await db.fetch(
        "SELECT c.name, m.total_runs, m.successful_runs, m.success_rate FROM performance_metrics m"
        " JOIN test_cases c ON c.id = m.test_case_id JOIN test_suites s ON s.id = c.suite_id"
        " WHERE s.name = 'shop failing'"
    )
    # a test skipped because its dependency failed is not an execution
    assert [tuple(m) for m in metrics] == [("health", 2, 0, 0)]


def percentile(values: Sequence[float], fraction: float) -> float:
    """As percentile_cont, rounded as PostgreSQL rounds a float8 to 3 decimals."""
    ordered = sorted(values)
    at = fraction * (len(ordered) - 1)
    low = int(at)
    high = min(low + 1, len(ordered) - 1)
    value = ordered[low] + (ordered[high] - ordered[low]) * (at - low)
    return float(Decimal(f"{value:.15g}").quantize(Decimal("0.001"), ROUND_HALF_UP))


async def test_daily_metrics_are_computed_over_the_days_results(db: asyncpg.Connection) -> None:
    rows = await db.fetch(
        "SELECT m.*, c.name FROM performance_metrics m JOIN test_cases c ON c.id = m.test_case_id"
    )
    assert rows
    for metric in rows:
        times = [
            r[0]
            for r in await db.fetch(
                "SELECT response_time_ms FROM test_results WHERE test_case_id = $1"
                " AND environment_id = $2 AND status IN ('passed', 'failed')",
                metric["test_case_id"],
                metric["environment_id"],
            )
        ]
        assert metric["total_runs"] == len(times), metric["name"]
        assert metric["p50_response_time_ms"] == percentile(times, 0.5)
        assert metric["p95_response_time_ms"] == percentile(times, 0.95)
        assert metric["p99_response_time_ms"] == percentile(times, 0.99)
        assert metric["avg_response_time_ms"] == pytest.approx(sum(times) / len(times), abs=1e-3)
    # checkout.yaml's login ran twice (all tests, then --tag smoke) in one environment
    login = [m for m in rows if m["name"] == "login" and m["total_runs"] == 2]
    assert login and float(login[0]["success_rate"]) == 100.0


async def test_dependencies_are_typed_as_the_plan_says(db: asyncpg.Connection) -> None:
    edges = await db.fetch(
        "SELECT a.name, b.name, d.dependency_type FROM test_dependencies d"
        " JOIN test_cases a ON a.id = d.dependent_test_id"
        " JOIN test_cases b ON b.id = d.required_test_id"
        " JOIN test_suites s ON s.id = a.suite_id WHERE s.name = 'shop checkout'"
    )
    found = {(a, b): kind for a, b, kind in edges}
    assert found[("order_history", "order_shipped")] == "order"
    assert found[("login", "health")] == "order"
    assert found[("catalog", "login")] == "token"
    assert found[("checkout", "add_to_cart")] == "data"


async def test_rebuild_gives_back_the_same_rows(
    projected: Projected, db: asyncpg.Connection
) -> None:
    before = await snapshot(db)
    assert all(before[table] for table in READ_TABLES), "every table has rows to compare"
    events = await db.fetchval("SELECT count(*) FROM events")
    assert await rebuild(projected.dsn) == events
    assert await snapshot(db) == before
    # small pages cut every run in pieces: the rows do not depend on where pages begin
    store = await PostgresEventStore.connect(projected.dsn)
    try:
        assert await Projector(store, page_size=7).rebuild() == events
    finally:
        await store.aclose()
    assert await snapshot(db) == before


# ---- the projector's guarantees, on events written by the test -------------------------------


def run_events(run_id: str, *, fail: bool = False, response_ms: float = 10.0) -> list[Event]:
    """A run of two tests: login (fails if asked) and profile, which needs its token."""
    plan = [
        PlannedTest("login", definition_hash="h-login"),
        PlannedTest("profile", {"login": "token"}, "h-profile"),
    ]
    events: list[Event] = [
        RunStarted(run_id=run_id, suite="synthetic", suite_digest="d1", plan=plan),
        TestStarted(test="login"),
        RequestSent(test="login", attempt=1, method="POST", url="http://api/login"),
        ResponseReceived(
            test="login",
            attempt=1,
            status=200,
            headers={},
            body_excerpt="{}",
            timings=Timings(total_ms=response_ms),
        ),
        AssertionEvaluated(
            test="login",
            attempt=1,
            subject="status",
            predicate="equals",
            expected=200,
            actual=500 if fail else 200,
            passed=not fail,
        ),
    ]
    if fail:
        return [
            *events,
            TestFailed(
                test="login",
                attempts=1,
                duration_ms=12.0,
                category="assertion",
                message=f"status: expected 200, got 500 (request {run_id[:8]})",
            ),
            TestSkipped(test="profile", reason="depends on login", category="dependency_skipped"),
            RunCompleted(status="failed", passed=0, failed=1, skipped=1, duration_ms=20.0),
        ]
    return [
        *events,
        AuthTokenUpdated(test="login", name="auth.token", value="sealed-token"),
        VariableCaptured(test="login", name="user_id", value=7),
        TestPassed(test="login", attempts=1, duration_ms=12.0),
        TestStarted(test="profile"),
        TestPassed(test="profile", attempts=1, duration_ms=3.0),
        RunCompleted(status="passed", passed=2, failed=0, skipped=0, duration_ms=20.0),
    ]


def appended(events: Sequence[Event], run_id: str | None = None) -> StreamAppend:
    run_id = run_id or str(uuid.uuid4())
    return StreamAppend(f"run-{run_id}", [NewEvent(event) for event in events])


async def write_runs(store: PostgresEventStore, count: int, **kwargs: Any) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in range(count)]
    await store.append([appended(run_events(run_id, **kwargs), run_id) for run_id in ids])
    return ids


@pytest.fixture
async def store(fresh_database_dsn: str) -> AsyncIterator[PostgresEventStore]:
    opened = await PostgresEventStore.connect(fresh_database_dsn, max_size=4)
    yield opened
    await opened.aclose()


async def test_projector_never_passes_an_append_that_commits_late(
    store: PostgresEventStore, fresh_database_dsn: str
) -> None:
    projector = Projector(store)
    await write_runs(store, 1)
    first = await projector.catch_up()
    slow = await asyncpg.connect(fresh_database_dsn)
    try:
        transaction = slow.transaction()
        await transaction.start()
        slow_run = str(uuid.uuid4())
        # an append that has drawn its positions but not committed yet
        await slow.execute(
            "SELECT baton_append($1, $2, $3, $4, $5, $6::text[]::jsonb[])",
            [f"run-{slow_run}"],
            [0],
            [1],
            [uuid.uuid4()],
            ["RunStarted"],
            [msgspec.json.encode(run_events(slow_run)[0]).decode()],
        )
        later = asyncio.create_task(write_runs(store, 2))
        await asyncio.sleep(0.2)
        assert await projector.catch_up() == 0
        assert await projector.position() == first
        await transaction.commit()
    finally:
        await slow.close()
    later_ids = await later
    assert await projector.catch_up() == 1 + 2 * len(run_events("x"))
    conn = await asyncpg.connect(fresh_database_dsn)
    try:
        runs = {str(row[0]): row[1] for row in await conn.fetch("SELECT id, status FROM test_runs")}
        head = await conn.fetchval("SELECT max(position) FROM events")
    finally:
        await conn.close()
    assert runs[slow_run] == "running"
    assert [runs[run_id] for run_id in later_ids] == ["passed", "passed"]
    assert await projector.position() == head


async def test_a_failed_page_changes_nothing_and_the_next_attempt_finishes_it(
    store: PostgresEventStore, fresh_database_dsn: str
) -> None:
    await write_runs(store, 3)
    await Projector(store).catch_up()
    conn = await asyncpg.connect(fresh_database_dsn)
    try:
        before = await snapshot(conn)
        await write_runs(store, 2, fail=True)
        checkpoint = await Projector(store).position()

        async def crash(_: asyncpg.Connection, page: Sequence[RecordedEvent]) -> None:
            raise RuntimeError("the projector died here")

        with pytest.raises(RuntimeError, match="died here"):
            await Projector(store, handlers=[crash]).catch_up()
        assert await snapshot(conn) == before
        assert await Projector(store).position() == checkpoint
        assert await Projector(store).behind() == 2 * len(run_events("x", fail=True))

        assert await Projector(store).catch_up() == 2 * len(run_events("x", fail=True))
        assert await Projector(store).behind() == 0
        after = await snapshot(conn)
        assert len(after["failure_analysis"]) == 4  # per run: login failed, profile skipped
        assert await Projector(store).rebuild() > 0
        assert await snapshot(conn) == after
    finally:
        await conn.close()


async def test_projectors_running_at_once_apply_each_event_once(
    store: PostgresEventStore, fresh_database_dsn: str
) -> None:
    applied: list[int] = []

    async def note(_: asyncpg.Connection, page: Sequence[RecordedEvent]) -> None:
        applied.extend(recorded.position for recorded in page)

    for _ in range(5):
        await write_runs(store, 4)
    others = [await PostgresEventStore.connect(fresh_database_dsn, max_size=2) for _ in range(3)]
    try:
        counts = await asyncio.gather(
            *(Projector(s, page_size=10, handlers=[note]).catch_up() for s in [store, *others])
        )
    finally:
        for other in others:
            await other.aclose()
    total = 20 * len(run_events("x"))
    assert sum(counts) == total
    assert sorted(applied) == sorted(set(applied)) and len(applied) == total


async def test_serve_wakes_when_an_append_commits(store: PostgresEventStore) -> None:
    projector = Projector(store)
    stop = asyncio.Event()
    # a fallback far beyond the test's patience: only the notification can wake it
    serving = asyncio.create_task(projector.serve(fallback=60.0, stop=stop))
    try:
        await asyncio.sleep(0.2)
        for _ in range(2):
            await write_runs(store, 1)
            last = await store.pool.fetchval("SELECT max(position) FROM events")
            for _ in range(150):  # 3 s
                if await projector.position() >= last:
                    break
                await asyncio.sleep(0.02)
            else:
                pytest.fail("the projector did not wake up on the notification")
    finally:
        stop.set()
        await asyncio.wait_for(serving, 5)


async def test_a_test_decided_again_in_its_run_keeps_only_the_last_verdict(
    store: PostgresEventStore, fresh_database_dsn: str
) -> None:
    run_id = str(uuid.uuid4())
    stream = f"run-{run_id}"
    await store.append([appended(run_events(run_id, fail=True)[:-1], run_id)])
    await Projector(store).catch_up()
    await store.append(
        [
            StreamAppend(
                stream,
                [
                    NewEvent(TestStarted(test="login", attempt=1)),
                    NewEvent(TestPassed(test="login", attempts=1, duration_ms=5.0)),
                ],
            )
        ]
    )
    await Projector(store).catch_up()
    conn = await asyncpg.connect(fresh_database_dsn)
    try:
        result = await conn.fetchrow(
            "SELECT status, category, message FROM test_results WHERE test_name = 'login'"
        )
        case = await conn.fetchval("SELECT id FROM test_cases WHERE name = 'login'")
        failures = await conn.fetchval(
            "SELECT count(*) FROM failure_analysis WHERE test_case_id = $1", case
        )
        metric = await conn.fetchrow(
            "SELECT total_runs, successful_runs FROM performance_metrics WHERE test_case_id = $1",
            case,
        )
    finally:
        await conn.close()
    assert tuple(result) == ("passed", None, "")
    assert failures == 0
    assert tuple(metric) == (1, 1)


async def test_runs_are_found_by_tag_through_the_gin_index(
    store: PostgresEventStore, fresh_database_dsn: str
) -> None:
    tagged, plain = str(uuid.uuid4()), str(uuid.uuid4())
    first, *rest = run_events(tagged)
    assert isinstance(first, RunStarted)
    await store.append(
        [
            appended([msgspec.structs.replace(first, tags=["smoke", "nightly"]), *rest], tagged),
            appended(run_events(plain), plain),
        ]
    )
    await project(store)
    conn = await asyncpg.connect(fresh_database_dsn)
    try:
        query = "SELECT id FROM test_runs WHERE tags @> $1::jsonb"
        assert [str(row[0]) for row in await conn.fetch(query, '["smoke"]')] == [tagged]
        assert await conn.fetch(query, '["smoke", "weekly"]') == []
        await conn.execute("SET enable_seqscan = off")
        plan = "\n".join(row[0] for row in await conn.fetch(f"EXPLAIN {query}", '["smoke"]'))
        assert "test_runs_tags" in plan
    finally:
        await conn.close()


# ---- PostgreSQL restarted in the middle of a run ---------------------------------------------


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
