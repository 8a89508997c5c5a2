"""schema.sql: versioned steps applied once each, the read model's constraints, and row-level
security by organization, on a database of the test's own."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from datetime import UTC, datetime

import asyncpg
import pytest

from events.migrations import migrate, parse_steps, schema_sql, schema_status
from events.postgres import PostgresEventStore
from events.projections import DEFAULT_ORGANIZATION_ID, READ_TABLES
from events.store import NewEvent, StoreUnavailable, StreamAppend
from events.types import TestStarted

# The digest of every step as it was released. A step that was applied somewhere must never
# change: a schema change is a new step. Add the new step's digest here; never edit one.
RELEASED = {
    1: "ef92b8b65d447d691bfc8371554801ab950eb76452bd84265464be62d7e0786a",
    2: "aa7b7a91ea1dd5a9c0c7a7d380839bf1dc184005907c8c0afc010e8ef14058e3",
    3: "569a0707101897af72ba30423f618d377430ed2da843f96f8935658ec140ddea",
    4: "1b7af99024c620656de3ca7b0d18af00d07663b8aeaa9722e8df15590cfb428b",
    5: "c204e6b84f44c0fe43d2dd3810467aaabe3596c9af47d7c605a5431de6387eb1",
    6: "8976fc6fc60f189052baf9e7382149c9e9ddeb8e1cd11eccd8acb2ad4bccb185",
    7: "04907efb7ee15a9ed260a35f182d6216c69495ad441761e1a624790a69f1675c",
    8: "f0a1e6b4bc6186c4fb0d093dc102bd9477734055db3fa4855af5658bad9147e2",
    9: "282f9e312a033449693fc96d9dead8a0eaa701308b86d5fa6aa2b116db45b8bd",
    10: "0035db928a94fb4ed5221539ddc5432267c33f406aeca3a610277a0b0d0c7d52",
    11: "9eda7a4bfe7a9585d5f4719d9dfc4e865dc60d98fcfcdc1798ce0021463fdf65",
    12: "3d6c1db79e820b921e26860550350c66264a15b4217da6a91cfe8b17aa23cb3c",
    13: "1e74beb41066f2528c69a96cbdf7c8db5c03f1d765df617b6742079fd8761451",
    14: "042b3c9389dc8993ffc0b531ea024e95244c6ceea1dd54f25c02ae81a350a001",
    15: "8d60ab88dc528034ecc788aceda33b7fdde0f203f1ea8bf6dd31493ce90204e9",
}
STEP_NAMES = [
    "event store",
    "projection checkpoints and change notification",
    "read model",
    "row-level security by organization",
    "service tables and role",
    "Supabase Realtime publication",
    "log positions of decided executions",
    "newest executions first, in a fixed order",
    "events record when they happened",
    "run owners and their heartbeats",
    "service health checks and test sessions",
    "daily rollups of runs and failures",
    "retention policies and monthly metrics",
    "queued service runs for every instance",
    "the jobs of queued service runs",
]


def test_released_steps_are_never_edited() -> None:
    _, steps = parse_steps(schema_sql())
    assert {step.number: step.digest for step in steps if step.number in RELEASED} == RELEASED
    assert [step.number for step in steps] == list(range(1, len(steps) + 1))
    assert set(RELEASED) == {step.number for step in steps}, "pin the new step's digest"


async def test_migrate_applies_each_step_once_and_status_shows_it(
    fresh_database_dsn: str,
) -> None:
    before = await schema_status(fresh_database_dsn)
    assert (before.current, before.latest) == (0, len(STEP_NAMES))
    assert [step.name for step in before.pending] == STEP_NAMES

    applied = await migrate(fresh_database_dsn)
    assert [(step.number, step.name) for step in applied] == list(enumerate(STEP_NAMES, 1))
    status = await schema_status(fresh_database_dsn)
    assert status.current == status.latest == len(STEP_NAMES)
    assert status.pending == []
    assert [(step.number, step.name) for step in status.applied] == list(enumerate(STEP_NAMES, 1))
    assert all(step.applied_at <= datetime.now(UTC) for step in status.applied)

    assert await migrate(fresh_database_dsn) == []
    assert (await schema_status(fresh_database_dsn)).applied == status.applied


async def test_the_whole_file_run_twice_without_baton_changes_nothing(
    fresh_database_dsn: str,
) -> None:
    """As ``psql -f schema.sql`` would: every statement is idempotent, guarded or not."""
    conn = await asyncpg.connect(fresh_database_dsn)
    try:
        await conn.execute("SET client_min_messages = warning")
        await conn.execute(schema_sql())
        first = await conn.fetch("SELECT step, name, applied_at FROM baton_schema_version")
        policies = await conn.fetchval("SELECT count(*) FROM pg_policies")
        await conn.execute(schema_sql())
        assert await conn.fetch("SELECT step, name, applied_at FROM baton_schema_version") == first
        assert await conn.fetchval("SELECT count(*) FROM pg_policies") == policies
    finally:
        await conn.close()
    assert [row["name"] for row in first] == STEP_NAMES
    assert await migrate(fresh_database_dsn) == []


async def test_a_database_at_step_1_is_migrated_in_place(fresh_database_dsn: str) -> None:
    """A database made by the first release (the event store only) keeps its events and
    gains the later steps, including the notification after each append."""
    preamble, steps = parse_steps(schema_sql())
    conn = await asyncpg.connect(fresh_database_dsn)
    try:
        await conn.execute(preamble + steps[0].sql)
        await conn.execute(
            "SELECT baton_append($1, $2, $3, $4, $5, $6::text[]::jsonb[])",
            ["run-old"],
            [0],
            [1],
            [uuid.uuid4()],
            ["TestStarted"],
            ['{"type": "TestStarted", "test": "old"}'],
        )
        applied = await migrate(fresh_database_dsn)
        assert [step.number for step in applied] == list(range(2, len(STEP_NAMES) + 1))

        notices: asyncio.Queue[str] = asyncio.Queue()
        await conn.add_listener("baton_events", lambda *args: notices.put_nowait(args[3]))
        store = await PostgresEventStore.connect(fresh_database_dsn)
        try:
            [[position]] = await store.append(
                [StreamAppend("run-new", [NewEvent(TestStarted(test="new"))])]
            )
            assert [r.event for r in await store.read_stream("run-old")] == [
                TestStarted(test="old")
            ]
        finally:
            await store.aclose()
        assert await asyncio.wait_for(notices.get(), 5) == str(position)
    finally:
        await conn.close()


async def test_processes_starting_together_apply_each_step_once(fresh_database_dsn: str) -> None:
    results = await asyncio.gather(*(migrate(fresh_database_dsn) for _ in range(4)))
    assert sorted(len(applied) for applied in results) == [0, 0, 0, len(STEP_NAMES)]
    stores = await asyncio.gather(
        *(PostgresEventStore.connect(fresh_database_dsn) for _ in range(3))
    )
    for store in stores:
        await store.aclose()
    status = await schema_status(fresh_database_dsn)
    assert [step.number for step in status.applied] == list(range(1, len(STEP_NAMES) + 1))


async def test_migrate_names_an_unreachable_server_without_its_password() -> None:
    with pytest.raises(StoreUnavailable) as caught:
        await migrate("postgresql://baton:s3cret-pw@127.0.0.1:1/baton")
    assert "s3cret-pw" not in str(caught.value)
    assert "postgresql://baton:***@127.0.0.1:1/baton" in str(caught.value)


@pytest.fixture
async def migrated(fresh_database_dsn: str) -> str:
    await migrate(fresh_database_dsn)
    return fresh_database_dsn


async def test_every_read_table_is_scoped_by_organization(migrated: str) -> None:
    conn = await asyncpg.connect(migrated)
    try:
        rows = await conn.fetch(
            "SELECT c.relname, c.relrowsecurity, p.qual, p.with_check"
            " FROM pg_class c LEFT JOIN pg_policies p ON p.tablename = c.relname"
            " WHERE c.relname = ANY($1) AND c.relkind = 'r'",
            [*READ_TABLES, "organizations"],
        )
    finally:
        await conn.close()
    assert len(rows) == len(READ_TABLES) + 1
    for row in rows:
        column = "id" if row["relname"] == "organizations" else "organization_id"
        assert row["relrowsecurity"], row["relname"]
        assert row["qual"] == f"({column} = baton_current_organization())", row["relname"]
        assert row["with_check"] == row["qual"], row["relname"]


async def test_a_role_sees_and_writes_only_its_organizations_rows(migrated: str) -> None:
    """What the service will do per request: a role that does not own the tables, and the
    organization set for the transaction only."""
    role = f"baton_reader_{secrets.token_hex(4)}"
    other = uuid.uuid4()
    now = datetime.now(UTC)
    conn = await asyncpg.connect(migrated)
    await conn.execute(f"CREATE ROLE {role} NOLOGIN")
    try:
        await conn.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
        await conn.execute(f"GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA public TO {role}")
        await conn.execute(
            "INSERT INTO organizations (id, slug, name) VALUES ($1, 'acme', 'Acme')", other
        )
        for org, name in ((DEFAULT_ORGANIZATION_ID, "ours"), (other, "theirs")):
            await conn.execute(
                "INSERT INTO projects VALUES ($1, $2, $3, $4, $4)", uuid.uuid4(), org, name, now
            )

        async def as_role(org: uuid.UUID | None, query: str, *args: object) -> list[str]:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL ROLE {role}")
                if org is not None:
                    await conn.execute(
                        "SELECT set_config('baton.organization_id', $1, true)", str(org)
                    )
                return [row[0] for row in await conn.fetch(query, *args)]

        assert await as_role(DEFAULT_ORGANIZATION_ID, "SELECT name FROM projects") == ["ours"]
        assert await as_role(other, "SELECT name FROM projects") == ["theirs"]
        assert await as_role(other, "SELECT slug FROM organizations") == ["acme"]
        # the setting ended with its transaction: the next one on this connection sees nothing
        assert await as_role(None, "SELECT name FROM projects") == []
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
            await as_role(
                other,
                "INSERT INTO projects VALUES ($1, $2, 'sneaky', now(), now()) RETURNING name",
                uuid.uuid4(),
                DEFAULT_ORGANIZATION_ID,
            )
        # the owner (the projector) is not restricted
        assert sorted(r[0] for r in await conn.fetch("SELECT name FROM projects")) == [
            "ours",
            "theirs",
        ]
    finally:
        await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE {role}")
        await conn.close()


async def test_constraints_refuse_rows_the_model_does_not_allow(migrated: str) -> None:
    org = DEFAULT_ORGANIZATION_ID
    project, suite, env, case = (uuid.uuid4() for _ in range(4))
    now = datetime.now(UTC)
    conn = await asyncpg.connect(migrated)
    try:
        await conn.execute("INSERT INTO projects VALUES ($1, $2, 'p', $3, $3)", project, org, now)
        await conn.execute(
            "INSERT INTO environments VALUES ($1, $2, $3, 'default', $4)", env, org, project, now
        )
        await conn.execute(
            "INSERT INTO test_suites VALUES ($1, $2, $3, 's', 'd', 'f.yaml', $4, $4)",
            suite,
            org,
            project,
            now,
        )
        await conn.execute(
            "INSERT INTO test_cases VALUES ($1, $2, $3, 't', 'h', $4, $4)", case, org, suite, now
        )
        run = (
            "INSERT INTO test_runs (id, organization_id, project_id, suite_id, environment_id,"
            " stream, suite_digest, source, status, total_tests, started_at, ended_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, 'd', 'f.yaml', $7, 1, $8, $9)"
        )
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(
                run, uuid.uuid4(), org, project, suite, env, "run-a", "exploded", now, now
            )
        with pytest.raises(asyncpg.CheckViolationError):  # a running run has not ended
            await conn.execute(
                run, uuid.uuid4(), org, project, suite, env, "run-b", "running", now, now
            )
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(
                "INSERT INTO test_dependencies VALUES ($1, $2, $2, 'order')", org, case
            )
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await conn.execute(
                "INSERT INTO test_dependencies VALUES ($1, $2, $3, 'data')", org, case, uuid.uuid4()
            )
        with pytest.raises(asyncpg.UniqueViolationError):  # one suite name per project
            await conn.execute(
                "INSERT INTO test_suites VALUES ($1, $2, $3, 's', 'd2', 'g.yaml', $4, $4)",
                uuid.uuid4(),
                org,
                project,
                now,
            )
        tagged = await conn.fetchval(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'test_runs_tags'"
        )
        assert "USING gin (tags)" in tagged
    finally:
        await conn.close()
