"""What a user's runs leave in the read tables, and a rebuild giving back the same rows.
The projector's own guarantees are in test_projector.py, a PostgreSQL restart mid-run in
test_postgres_restart.py."""

from __future__ import annotations

import asyncio
import json
import shutil
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
from tests.cli import baton
from tests.conftest import SHOP

ROOT = Path(__file__).resolve().parent.parent
FAILING_FLOW = """\
name: shop failing
base_url: "{{ env.SHOP_URL }}"
services:
  shop: {base_url: "{{ env.SHOP_URL }}", health: /health}
tests:
  health:
    request: {url: /health}
    expect: {status: 500}
  after_health:
    depends_on: [health]
    request: {url: /health}
"""


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
    fails (its service health-checked, in a test session), a run by tag; then the
    projector caught up."""
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
        code, out, err = baton("session", "create", "a user's day")
        assert code == 0, out + err
        for command in commands[2:4]:
            command += ["--session", out.split()[0]]
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
